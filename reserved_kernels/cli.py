"""``reserved-kernels info|plan|demo``: the command-line entry point."""

from __future__ import annotations

import argparse
import sys


def info() -> str:
    """Versions, and which backends are available here (and why not)."""
    import platform

    import torch

    import reserved_kernels
    from reserved_kernels import _backend

    lines = [
        f"reserved-kernels {reserved_kernels.__version__}",
        f"python {platform.python_version()}, torch {torch.__version__} (CUDA build {torch.version.cuda})",
        f"triton: {_backend.triton_status()[1]}",
        f"CUDA devices: {torch.cuda.device_count()}"
        + (f" ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else ""),
        f"{_backend.ENV_VAR}={_backend.forced_backend() or '(unset: automatic)'}",
        "backends:",
    ]
    ext_ok, ext_why = _backend.cuda_extension_status()
    lines.append(f"  cuda extension built: {'yes, ' + ext_why if ext_ok else 'no: ' + ext_why}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        for backend in _backend.BACKENDS:
            ok, why = _backend.availability(backend, torch.device(device))
            lines.append(f"  {device:4s} {backend:6s} {'available' if ok else 'unavailable'}: {why}")
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


def plan(args: argparse.Namespace) -> str:
    """Assign the terms of ``args.terms`` to reserved slots, save the tokenizer and plan, return the table."""
    from reserved_kernels.vocab import ReservedVocab, default_tokenizer_path

    vocab = ReservedVocab.from_file(args.tokenizer or default_tokenizer_path(),
                                    plan=args.plan if args.plan else None)
    result = vocab.assign(read_terms(args.terms))
    tok_path, plan_path = vocab.save(args.out)
    rows = [("term", "id", "replaced", "source pieces")]
    rows += [(e.term, str(e.id), e.piece, " ".join(vocab.piece(i) for i in e.source_ids)) for e in result.entries]
    widths = [max(len(r[c]) for r in rows) for c in range(3)]
    lines = ["  ".join(r[c].ljust(widths[c]) for c in range(3)) + "  " + r[3] for r in rows]
    lines.append(f"{len(vocab.free_ids)} of {len(vocab.reserved_ids)} reserved slots still free; "
                 f"wrote {tok_path} and {plan_path}")
    return "\n".join(lines)


def demo(args: argparse.Namespace) -> None:
    """A runnable example: train three reserved rows of a small table, check every other row is untouched."""
    import torch

    from reserved_kernels import ReservedEmbedding, _backend

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    vocab, dim = 256_000, 256
    reserved = [7, 8, 9]  # Gemma 1/2's <unused0>..<unused2>
    table = torch.nn.Embedding(vocab, dim, device=device)
    embedding = ReservedEmbedding.from_embedding(table, reserved, scale=dim**0.5)
    # Initialise each new row from the mean of three "description" rows.
    embedding.init_reserved_([[1000, 2000, 3000], [4000, 5000], [6000]])
    before = embedding.weight.detach().clone()
    target = torch.randn(3, dim, device=device)
    optimizer = torch.optim.AdamW(embedding.parameters(), lr=1e-2, weight_decay=0.1)
    print(f"backend: {_backend.select('gather', device)} on {device}; training {len(reserved)} of {vocab} rows")
    for step in range(args.steps):
        ids = torch.randint(0, vocab, (8, 64), device=device)
        ids[:, :3] = torch.tensor(reserved, device=device)
        out = embedding(ids)
        loss = (out[:, :3] - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % max(1, args.steps // 5) == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}")
    unchanged = torch.equal(before, embedding.weight)
    print(f"frozen rows bit-identical: {unchanged}; gradient held: {tuple(embedding.reserved_weight.grad.shape)}")
    if not unchanged:
        sys.exit("frozen rows changed")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="reserved-kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions and available backends")
    p_plan = sub.add_parser("plan", help="assign new terms to reserved <unusedN> slots")
    p_plan.add_argument("--tokenizer", help="tokenizer.model or tokenizer.json (default: the embedded one)")
    p_plan.add_argument("--terms", required=True, help="one term per line, optionally term<TAB>description")
    p_plan.add_argument("--out", required=True, help="folder for the renamed tokenizer and reserved_plan.json")
    p_plan.add_argument("--plan", help="an earlier reserved_plan.json to extend")
    p_demo = sub.add_parser("demo", help="train a few reserved rows end to end")
    p_demo.add_argument("--steps", type=int, default=50)
    p_demo.add_argument("--seed", type=int, default=0)
    p_demo.add_argument("--device", default="cuda" if _cuda_available() else "cpu")
    args = parser.parse_args(argv)
    if args.command == "info":
        print(info())
    elif args.command == "plan":
        from reserved_kernels.vocab import PlanError

        try:
            print(plan(args))
        except (PlanError, OSError) as exc:
            sys.exit(f"reserved-kernels plan: {exc}")
    elif args.command == "demo":
        demo(args)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
