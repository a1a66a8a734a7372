"""``reserved-kernels info|plan|demo|bench``: the command-line entry point."""

from __future__ import annotations

import argparse
import os
import sys

DEBUG_ENV_VAR = "RESERVED_KERNELS_DEBUG"


def info() -> str:
    """Versions, and which backends are available here (and why not)."""
    import os
    import platform

    import torch

    import reserved_kernels
    from reserved_kernels import _backend, ops

    lines = [
        f"reserved-kernels {reserved_kernels.__version__}",
        f"python {platform.python_version()}, torch {torch.__version__} (CUDA build {torch.version.cuda})",
        f"triton: {_backend.triton_status()[1]}",
        f"CUDA devices: {torch.cuda.device_count()}"
        + (f" ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else ""),
        f"{_backend.ENV_VAR}={os.environ.get(_backend.ENV_VAR) or '(unset: automatic)'}",
        "backends (* serves the device now):",
    ]
    ext_ok, ext_why = _backend.cuda_extension_status()
    lines.append(f"  compiled extension built: {'yes, ' + ext_why if ext_ok else 'no: ' + ext_why}")
    for device in ("cpu", "cuda"):
        active = ops.active(device)
        for backend in _backend.BACKENDS:
            ok, why = _backend.availability(backend, device)
            star = "*" if backend == active else " "
            lines.append(f"  {device:4s} {backend:8s} {star} {'available' if ok else 'unavailable'}: {why}")
    lines.append("the fused loss (GEMMs around a per-tile step) runs on: "
                 + ", ".join(f"{d} {ops.active(d, 'linear_cross_entropy')}" for d in ("cpu", "cuda")))
    return "\n".join(lines)


def read_terms(path: str) -> dict[str, str | None]:
    """One term per line, optionally ``term<TAB>description``; blank lines and ``#`` comments are skipped."""
    terms: dict[str, str | None] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            term, _, description = line.partition("\t")
            terms[term] = description or None
    return terms


def _width(text: str) -> int:
    """Terminal columns of ``text``: East Asian wide and full-width characters take two."""
    import unicodedata

    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def plan(args: argparse.Namespace) -> str:
    """Assign the terms of ``args.terms`` to reserved slots, save the tokenizer and plan, return the table."""
    from reserved_kernels.vocab import ReservedVocab, default_tokenizer_path

    vocab = ReservedVocab.from_file(args.tokenizer or default_tokenizer_path(),
                                    plan=args.plan if args.plan else None)
    result = vocab.assign(read_terms(args.terms))
    tok_path, plan_path = vocab.save(args.out)
    rows = [("term", "id", "replaced", "source pieces")]
    rows += [(e.term, str(e.id), e.piece, " ".join(vocab.piece(i) for i in e.source_ids)) for e in result.entries]
    widths = [max(_width(r[c]) for r in rows) for c in range(3)]
    lines = ["  ".join(r[c] + " " * (widths[c] - _width(r[c])) for c in range(3)) + "  " + r[3] for r in rows]
    lines.append(f"{len(vocab.free_ids)} of {len(vocab.reserved_ids)} reserved slots still free; "
                 f"wrote {tok_path} and {plan_path}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="reserved-kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions and available backends")
    p_plan = sub.add_parser("plan", help="assign new terms to reserved <unusedN> slots")
    p_plan.add_argument("--tokenizer", help="tokenizer.model or tokenizer.json (default: the embedded one)")
    p_plan.add_argument("--terms", required=True, help="one term per line, optionally term<TAB>description")
    p_plan.add_argument("--out", required=True, help="folder for the renamed tokenizer and reserved_plan.json")
    p_plan.add_argument("--plan", help="an earlier reserved_plan.json to extend")
    p_demo = sub.add_parser("demo", help="plan three terms and train only their rows of a Gemma model")
    from reserved_kernels.demo import add_arguments

    add_arguments(p_demo)
    p_bench = sub.add_parser("bench", help="the benchmark matrix, side by side with the peers")
    p_bench.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p_bench.add_argument("--quick", action="store_true", help="one shape per workload")
    p_bench.add_argument("--smoke", action="store_true", help="tiny shapes: checks that everything runs")
    p_bench.add_argument("--host", action="store_true", help="only the host time per call (N=16, V=1,000, D=64)")
    p_bench.add_argument("--loss", action="store_true", help="only the loss alone, fused beside unfused "
                                                               "(V=262,144, D=640, N=2,048), each in a fresh process")
    p_bench.add_argument("--model", help="only the training step (2 x 512 tokens, 16 rows) of 'gemma-3-270m' or a "
                                         "Hugging Face checkpoint folder (any family): ours, PEFT, the hook recipe and "
                                         "the body alone, each in a fresh process")
    p_bench.add_argument("--out", default="bench/results", help="folder for <device>-<date>.json/.md/.png")
    p_bench.add_argument("--readme", metavar="README", nargs="?", const="README.md",
                         help="only regenerate README's Results section from the files in --out")
    args = parser.parse_args(argv)
    try:
        _run(args)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # one line, no traceback: a user's error is not a crash (DEBUG_ENV_VAR=1 shows it)
        if os.environ.get(DEBUG_ENV_VAR) == "1":
            raise
        message = " ".join(str(exc).split())
        sys.exit(f"reserved-kernels {args.command}: error: {type(exc).__name__}: {message}")


def _run(args: argparse.Namespace) -> None:
    if args.command == "info":
        print(info())
    elif args.command == "plan":
        print(plan(args))
    elif args.command == "bench":
        if args.readme:
            from reserved_kernels.benchmarks.report import update_readme

            update_readme(args.readme, args.out)
            print(f"updated {args.readme} from {args.out}")
        elif args.loss:
            from reserved_kernels.benchmarks.loss import main as loss_main

            loss_main(["--device", args.device, "--out", args.out])
        elif args.host:
            from reserved_kernels.benchmarks.host import main as host_main

            host_main(["--device", args.device, "--out", args.out])
        elif args.model:
            from reserved_kernels.benchmarks.train_step import main as step_main

            step_main(["--device", args.device, "--model", args.model, "--head", "--slots", "16", "--tokens", "1024",
                       "--repeat", "3", "--out", args.out])
        else:
            from reserved_kernels.benchmarks.suite import main as bench_main

            bench_main(args)
    elif args.command == "demo":
        from reserved_kernels.demo import run

        run(args)

if __name__ == "__main__":
    main()
