"""The loss alone, forward and backward: the fused linear cross-entropy beside the unfused path, each in a fresh
process.

    python -m reserved_kernels.benchmarks.loss [--device cpu|cuda] [--vocab 262144] [--dim 640] [--tokens 2048]
        [--slots 16] [--dtype float32] [--softcap 30] [--out bench/results]
    reserved-kernels bench loss [--device cpu|cuda]

Implementations, all computing the cross-entropy of ``hidden @ merged.T`` over a tied table with K
trainable rows, and the gradients of ``hidden`` and the rows:

* ``fused`` (ours): ``ReservedLMHead(hidden, targets)`` — :func:`reserved_kernels.linear_cross_entropy`;
* ``unfused``: the same head's logits, then ``F.cross_entropy`` on them upcast to fp32 (what a patched
  model without the fused loss does, and what transformers' loss does with any head);
* ``liger`` and ``cce`` (GPU, where installed): Liger-Kernel's fused linear cross-entropy and Apple's Cut
  Cross-Entropy on the frozen table alone — they train no K rows, so they do less than ours.

Memory is beyond the inputs (table, rows, hidden states, targets), the gradients' own storage included (the
same for every implementation): on a CPU the peak RSS over two steps after the set-up (the high-water
mark reset, glibc's mmap threshold fixed: see ``harness.MEASURING_ENV``); on CUDA ``max_memory_allocated``.
Each implementation runs in its own process, so no allocator state carries over.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os

IMPLS = ("fused", "unfused", "liger", "cce")
CONFIG_KEYS = ("device", "vocab", "dim", "tokens", "slots", "dtype", "softcap", "repeat")


def available(device: str) -> list[str]:
    """The implementations that can run here: ours and the unfused path always; the peers on CUDA where installed."""
    peers = {"liger": "liger_kernel", "cce": "cut_cross_entropy"}
    return [i for i in IMPLS if i not in peers or (device == "cuda" and importlib.util.find_spec(peers[i]))]


def _setup(args):
    import torch

    import reserved_kernels as rk

    torch.manual_seed(0)
    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    table = (torch.randn(args.vocab, args.dim, device=dev) * (3 / args.dim ** 0.5)).to(dtype)
    emb = rk.ReservedEmbedding.from_embedding(table, list(range(6, 6 + args.slots)))
    head = rk.ReservedLMHead.tied_to(emb)
    hidden = torch.randn(args.tokens, args.dim, device=dev, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, args.vocab, (args.tokens,), device=dev)
    targets[: args.slots] = torch.arange(6, 6 + args.slots)  # every reserved row is a target somewhere
    return torch, head, hidden, targets


def _loss_fn(args, torch, head, hidden, targets):
    import torch.nn.functional as TF

    from reserved_kernels._table import softcapped

    cap = args.softcap
    if args.impl == "fused":
        return lambda: head(hidden, targets, softcap=cap)
    if args.impl == "unfused":
        def unfused():
            logits = head(hidden)
            return TF.cross_entropy((softcapped(logits, cap) if cap is not None else logits).float(), targets)

        return unfused
    if args.impl == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        loss = LigerFusedLinearCrossEntropyLoss(softcap=cap)
        return lambda: loss(head.weight, hidden, targets)
    from cut_cross_entropy import linear_cross_entropy

    return lambda: linear_cross_entropy(hidden, head.weight, targets, softcap=cap)


def child(args) -> None:
    from reserved_kernels.benchmarks.harness import measure_step

    torch, head, hidden, targets = _setup(args)
    loss_fn = _loss_fn(args, torch, head, hidden, targets)
    rows = head.reserved_weight

    def step():
        hidden.grad, rows.grad = None, None
        loss_fn().backward()

    print(json.dumps(dict(impl=args.impl, **measure_step(step, torch.device(args.device), args.measure, args.repeat))))


def run_one(impl: str, memory_runs: int = 3, **config) -> dict:
    """One implementation in fresh subprocesses: memory (on a CPU the median of ``memory_runs`` processes) and time."""
    from reserved_kernels.benchmarks.harness import child_command, run_measured

    cmd = child_command("reserved_kernels.benchmarks.loss", config, CONFIG_KEYS, impl=impl)
    return run_measured(cmd, config.get("device", "cpu"), memory_runs)


def table(payload: dict) -> str:
    """Markdown: each implementation's time and memory, and the unfused path's over ours."""
    rows = {r["impl"]: r for r in payload["results"]}
    ours = rows["fused"]
    lines = ["| implementation | median ms (p20–p80) | memory beyond inputs | ÷ fused: time, memory |",
             "|---|---|---|---|"]
    for impl, r in rows.items():
        vs = "" if impl == "fused" else (f"{r['median_ms'] / ours['median_ms']:.2f}×, "
                                         f"{r['extra_bytes'] / max(ours['extra_bytes'], 1):,.1f}×")
        label = "**fused (ours)**" if impl == "fused" else impl
        lines.append(f"| {label} | {r['median_ms']:,.1f} ({r['p20_ms']:,.1f}–{r['p80_ms']:,.1f}) | "
                     f"{r['extra_bytes'] / 2**20:,.1f} MiB | {vs} |")
    return "\n".join(lines)


def caption(payload: dict) -> str:
    from reserved_kernels.benchmarks.harness import machine_phrase, processes_phrase

    c, env = payload["config"], payload["environment"]
    where = machine_phrase(env)
    cap = f", soft-cap {c['softcap']:g}" if c.get("softcap") else ""
    return (f"{where}; {c['dtype']}, V={c['vocab']:,}, D={c['dim']:,}, N={c['tokens']:,}, K={c['slots']}{cap}; "
            f"forward + backward; {processes_phrase(c)}; torch {env['torch']}; {env['date']}, "
            f"commit {env.get('commit')}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--vocab", type=int, default=262_144)
    parser.add_argument("--dim", type=int, default=640)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--softcap", type=float, default=None)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--memory-runs", type=int, default=3,
                        help="CPU: memory processes per implementation (the median counts)")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.add_argument("--out", default="bench/results", help="folder for loss-<device>-<date>.json/.md")
    parser.add_argument("--impl", choices=IMPLS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--measure", default="both", choices=["memory", "time", "both"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return {}
    from reserved_kernels.benchmarks.harness import environment, write_report

    config = {k: getattr(args, k) for k in CONFIG_KEYS}
    results = []
    for impl in available(args.device):
        r = run_one(impl, args.memory_runs, **config)
        results.append(r)
        print(f"{impl:8s} {r['median_ms']:10.1f} ms (p20 {r['p20_ms']:.1f}, p80 {r['p80_ms']:.1f})   "
              f"{r['extra_bytes'] / 2**20:10.1f} MiB beyond the inputs", flush=True)
    payload = dict(environment=environment(), config={**config, "memory_runs": args.memory_runs}, results=results)
    if args.out:
        path = os.path.join(args.out, f"loss-{args.device}-{datetime.date.today().isoformat()}.json")
        write_report(path, payload, caption(payload), table(payload))
    print(table(payload))
    return payload


if __name__ == "__main__":
    main()
