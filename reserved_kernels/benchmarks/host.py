"""Host time per call: what a forward (and a forward + backward) costs beyond the arithmetic, beside plain PyTorch.

    python -m reserved_kernels.benchmarks.host [--device cpu|cuda] [--out bench/results]
        [--tokens 16 --vocab 1000 --dim 64 --dtype float32]
    reserved-kernels bench host [--device cpu|cuda]

The default shapes are tiny (N=16 tokens, V=1,000, D=64), so a call's time is the host's: Python,
dispatch, autograd, allocation, launch. Each recipe does the same work per call:

* ``ours``: a ``ReservedEmbedding`` (scale fused) — forward; forward + backward into its K×D rows;
* ``F.embedding*scale``: the functional lookup, then the scale multiply (the path Gemma's models take);
* ``nn.Embedding*scale``: the module, then the scale; forward + backward into its (trainable) table.

Recipes are timed round-robin, many calls per sample, and the median over samples is reported, so a
noisy machine slows every recipe alike. On CUDA, ``host_us`` is the wall time of issuing the calls
(the GPU trails behind: tiny kernels finish faster than the host issues them) and ``cuda_us`` the
CUDA-event time per call.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time

import torch
import torch.nn.functional as TF
from torch import nn

VOCAB, DIM, TOKENS = 1000, 64, 16


def _recipes(device: torch.device, tokens: int, vocab: int, dim: int, dtype: torch.dtype) -> dict:
    import reserved_kernels as rk

    torch.manual_seed(0)
    weight = torch.randn(vocab, dim, device=device, dtype=dtype)
    scale = dim ** 0.5
    scale_t = torch.tensor(scale, device=device, dtype=dtype)
    ids = torch.randint(0, vocab, (tokens,), device=device)
    ids[:4] = torch.arange(7, 11)
    grad = torch.randn(tokens, dim, device=device, dtype=dtype)
    ours = rk.ReservedEmbedding.from_embedding(weight.clone(), list(range(7, 106)), scale=scale)
    plain = nn.Embedding.from_pretrained(weight.clone(), freeze=False)

    def ours_step():
        ours.reserved_weight.grad = None
        ours(ids).backward(grad)

    def plain_step():
        plain.weight.grad = None
        (plain(ids) * scale_t).backward(grad)

    return {
        ("forward", "ours"): lambda: ours(ids),
        ("forward", "F.embedding*scale"): lambda: TF.embedding(ids, weight) * scale_t,
        ("forward", "nn.Embedding*scale"): lambda: plain(ids) * scale_t,
        ("forward+backward", "ours"): ours_step,
        ("forward+backward", "nn.Embedding*scale"): plain_step,
    }


def measure(device: str = "cpu", calls: int = 500, samples: int = 21, tokens: int = TOKENS, vocab: int = VOCAB,
            dim: int = DIM, dtype: torch.dtype = torch.float32) -> dict:
    """Median microseconds per call of every recipe (and CUDA-event time on a GPU)."""
    dev = torch.device(device)
    recipes = _recipes(dev, tokens, vocab, dim, dtype)
    host = {key: [] for key in recipes}
    gpu = {key: [] for key in recipes}
    for fn in recipes.values():  # warm-up: first calls allocate, compile, load
        for _ in range(20):
            fn()
    for _ in range(samples):
        for key, fn in recipes.items():
            if dev.type == "cuda":
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            host[key].append((time.perf_counter() - t0) / calls * 1e6)
            if dev.type == "cuda":
                end.record()
                end.synchronize()
                gpu[key].append(start.elapsed_time(end) / calls * 1e3)
    rows = []
    for (op, impl), times in host.items():
        row = dict(op=op, impl=impl, host_us=statistics.median(times),
                   host_p20_us=statistics.quantiles(times, n=5)[0], host_p80_us=statistics.quantiles(times, n=5)[3])
        if dev.type == "cuda":
            row["cuda_us"] = statistics.median(gpu[(op, impl)])
        rows.append(row)
    return dict(device=dev.type, vocab=vocab, dim=dim, tokens=tokens, dtype=str(dtype).removeprefix("torch."),
                calls=calls, samples=samples, rows=rows)


def table(payload: dict) -> str:
    """Markdown: per op, each recipe's median µs per call and the ratio of ours to it."""
    lines = ["| op | implementation | µs per call (p20–p80) | ours ÷ this |", "|---|---|---|---|"]
    if payload["device"] == "cuda":
        lines = ["| op | implementation | host µs per call (p20–p80) | CUDA-event µs | ours ÷ this (host) |",
                 "|---|---|---|---|---|"]
    ours = {r["op"]: r["host_us"] for r in payload["rows"] if r["impl"] == "ours"}
    for r in payload["rows"]:
        label = f"**{r['impl']}**" if r["impl"] == "ours" else r["impl"]
        ratio = "" if r["impl"] == "ours" else f"{ours[r['op']] / r['host_us']:.2f}×"
        cells = [r["op"], label, f"{r['host_us']:.1f} ({r['host_p20_us']:.1f}–{r['host_p80_us']:.1f})"]
        if payload["device"] == "cuda":
            cells.append(f"{r['cuda_us']:.1f}")
        lines.append("| " + " | ".join(cells + [ratio]) + " |")
    return "\n".join(lines) + "\n"


def run(device: str, out: str, **shape) -> tuple[dict, str]:
    """Measure, write ``<out>/host-<device>-<date>.json`` and ``.md``; return (payload, json path)."""
    from reserved_kernels.benchmarks.harness import environment, write_results

    payload = dict(environment=environment(), **measure(device, **shape))
    path = os.path.join(out, f"host-{device}-{datetime.date.today().isoformat()}.json")
    write_results(path, payload)
    with open(path.removesuffix(".json") + ".md", "w", encoding="utf-8") as f:
        f.write(table(payload))
    return payload, path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--tokens", type=int, default=TOKENS)
    parser.add_argument("--vocab", type=int, default=VOCAB)
    parser.add_argument("--dim", type=int, default=DIM)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args(argv)
    payload, path = run(args.device, args.out, tokens=args.tokens, vocab=args.vocab, dim=args.dim,
                        dtype=getattr(torch, args.dtype))
    print(table(payload))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
