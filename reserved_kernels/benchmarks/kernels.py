"""Kernel matrix: forward and backward of every backend beside the plain-PyTorch peers.

    python -m reserved_kernels.benchmarks.kernels --out DIR [--quick]            # GPU: Triton and CUDA
    python -m reserved_kernels.benchmarks.kernels --device cpu --smoke --out DIR  # tiny CPU run (CI)

Peers: ``F.embedding`` then the scale multiply (forward), ``nn.Embedding``'s dense backward
(``embedding_dense_backward``, V×D), and both together. Ideal bytes: ids + rows read + rows written
(forward); ids + reserved tokens' gradient rows + the K×D fp32 result (backward). Id distributions:
uniform, Zipf (reserved ids first: a control token in every sequence, terms often) and one-hot-row
(every token the same reserved id).
"""

from __future__ import annotations

import argparse
import itertools
import os

import torch

import reserved_kernels as rk
from reserved_kernels import _backend, ops
from reserved_kernels.benchmarks.harness import copy_bandwidth_gbs, cpu_median, environment, gpu_median, write_results

VOCAB = 262_144


def _ids(dist: str, reserved_ids: torch.Tensor, vocab: int, n: int) -> torch.Tensor:
    """Token ids of one distribution: uniform, zipf (P(rank r) ∝ 1/r, reserved ids ranked first) or one-hot-row."""
    dev = reserved_ids.device
    if dist == "uniform":
        return torch.randint(0, vocab, (n,), device=dev)
    if dist == "one-hot-row":  # every token is the same reserved id (worst case for contention)
        return reserved_ids[:1].repeat(n)
    others = torch.ones(vocab, dtype=torch.bool, device=dev)
    others[reserved_ids] = False
    order = torch.cat([reserved_ids, others.nonzero().squeeze(-1)])
    weights = 1.0 / torch.arange(1, vocab + 1, device=dev, dtype=torch.float64)
    return order[torch.multinomial(weights, n, replacement=True)]


def run(dims, tokens, slots, dists, out_dir, rep_ms, device="cuda", vocab=VOCAB):
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    copy_gbs = copy_bandwidth_gbs(device=dev)
    print(f"copy bandwidth: {copy_gbs:.0f} GB/s", flush=True)
    if dev.type == "cuda":
        backends = [b for b in ("triton", "compiled") if _backend.availability(b, "cuda")[0]]

        def timer(fn):
            return gpu_median(fn, rep_ms=rep_ms)
    else:
        backends = ["torch"]

        def timer(fn):
            return cpu_median(fn, warmup=1, repeat=3)
    rows = []
    for dim in dims:
        weight = torch.randn(vocab, dim, device=dev, dtype=dtype)
        scale = torch.tensor(dim ** 0.5, dtype=dtype, device=dev)
        for k, n, dist in itertools.product(slots, tokens, dists):
            reserved_ids = torch.randperm(vocab, device=dev)[:k]
            emb = rk.ReservedEmbedding.from_embedding(weight, reserved_ids, scale=dim ** 0.5)
            ids = _ids(dist, reserved_ids, vocab, n)
            grad = torch.randn(n, dim, device=dev, dtype=dtype)
            reserved_tokens = int((emb.slot_map[ids] >= 0).sum())
            fwd_bytes = n * 8 + 2 * n * dim * weight.element_size()
            bwd_bytes = n * 8 + reserved_tokens * dim * weight.element_size() + k * dim * 4
            case = dict(dim=dim, tokens=n, slots=k, dist=dist)

            def record(name, op, ms, nbytes):
                gbs = nbytes / ms["median_ms"] / 1e6
                rows.append(dict(case, impl=name, op=op, gbs=gbs, pct_copy=100 * gbs / copy_gbs, **ms))

            base_fwd = timer(lambda: torch.nn.functional.embedding(ids, weight) * scale)
            record("F.embedding*scale", "forward", base_fwd, fwd_bytes)
            base_bwd = timer(lambda: torch.ops.aten.embedding_dense_backward(grad, ids, vocab, -1, False))
            record("nn.Embedding dense", "backward", base_bwd, n * 8 + (n + vocab) * dim * weight.element_size())
            for backend in backends:
                with ops.forced(backend):
                    record(backend, "forward", timer(lambda: emb(ids)), fwd_bytes)
                    ms = timer(lambda: rk.ops.scatter_grad(grad, ids, emb.slot_map, k, 1.0, torch.float32))
                    record(backend, "backward", ms, bwd_bytes)
            print(f"D={dim} N={n} K={k} {dist}: done", flush=True)
        weight = emb = grad = None  # free this width's table before the next is made
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    payload = dict(environment=environment(), device=dev.type, copy_gbs=copy_gbs, dtype=str(dtype), vocab=vocab,
                   rows=rows)
    write_results(os.path.join(out_dir, f"kernels_{dev.type}.json"), payload)
    return payload


def table(payload) -> str:
    """Markdown: per case, forward and backward medians and the ratios against the peers."""
    from collections import defaultdict

    by_case = defaultdict(dict)
    for r in payload["rows"]:
        by_case[(r["dim"], r["tokens"], r["slots"], r["dist"])][(r["impl"], r["op"])] = r
    impls = sorted({r["impl"] for r in payload["rows"] if r["impl"] in ("torch", "triton", "compiled")})
    head = "| D | N | K | ids | peer fwd µs | " + " | ".join(
        f"{i} fwd µs (%copy, ×peer)" for i in impls) + " | dense bwd µs | " + " | ".join(
        f"{i} bwd µs (×dense)" for i in impls) + " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for (d, n, k, dist), cell in sorted(by_case.items()):
        pf = cell[("F.embedding*scale", "forward")]["median_ms"]
        pb = cell[("nn.Embedding dense", "backward")]["median_ms"]
        parts = [str(d), str(n), str(k), dist, f"{pf * 1e3:.1f}"]
        for i in impls:
            f = cell[(i, "forward")]
            parts.append(f"{f['median_ms'] * 1e3:.1f} ({f['pct_copy']:.0f}%, {pf / f['median_ms']:.2f}×)")
        parts.append(f"{pb * 1e3:.1f}")
        for i in impls:
            b = cell[(i, "backward")]
            parts.append(f"{b['median_ms'] * 1e3:.1f} ({pb / b['median_ms']:.0f}×)")
        lines.append("| " + " | ".join(parts) + " |")
    env = payload["environment"]
    where = f"GPU {env.get('gpu')} (driver {env.get('driver')})" if payload["device"] == "cuda" else f"CPU {env['cpu']}"
    return (f"{where}, torch {env['torch']}, Triton {env['triton']}, "
            f"CUDA {env['cuda']}, {env['date']}; {payload['dtype']}, V={payload['vocab']}; copy bandwidth "
            f"{payload['copy_gbs']:.0f} GB/s\n\n" + "\n".join(lines) + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="a few shapes only")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (V=4,096): checks the suite runs")
    parser.add_argument("--rep-ms", type=int, default=25)
    args = parser.parse_args(argv)
    dists = ["uniform", "zipf", "one-hot-row"]
    if args.smoke:
        payload = run([64, 123], [256], [16], dists, args.out, args.rep_ms, args.device, vocab=4096)
    elif args.quick:
        payload = run([3840], [2048, 8192, 32768], [1024], dists, args.out, args.rep_ms, args.device)
    else:
        payload = run([2048, 3840, 5376], [2048, 8192, 32768, 131072], [128, 1024], dists, args.out, args.rep_ms,
                      args.device)
    text = table(payload)
    with open(os.path.join(args.out, f"kernels_{payload['device']}.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
