"""``reserved-kernels bench``: the matrix, our backends beside the tools users pick instead, in one run.

Workloads (Gemma shapes): embedding forward; forward + backward; a whole training step (embedding
only, and embedding + tied head + AdamW) in a fresh process per recipe; mean initialisation of K
rows; forward over a gemma_pytorch-style int8 table. Peers: ``F.embedding`` then the scale (the
plain lookup), ``torch.compile`` of the reference, the dense ``nn.Embedding`` + gradient-hook recipe
(restoring frozen rows after each step), PEFT's trainable tokens, transformers'
``resize_token_embeddings(mean_resizing=True)`` and a per-token Python loop for initialisation,
dequantising the whole int8 table. Results: ``<out>/<device>-<date>.json`` and ``.md`` (and
``.png`` when matplotlib is installed).
"""

from __future__ import annotations

import datetime
import importlib.util
import itertools
import os
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as TF
from torch import nn

import reserved_kernels as rk
from reserved_kernels import _backend, ops, reference
from reserved_kernels._table import dequantised
from reserved_kernels.benchmarks import baselines, train_step
from reserved_kernels.benchmarks.harness import (
    copy_bandwidth_gbs,
    cpu_median,
    environment,
    gpu_median,
    head_only_gemma,
    write_results,
)

MATRICES = {
    "cpu": dict(vocab=256_000, dims=(2048, 3072), dtypes=("float32", "bfloat16"), slots=(99, 1024), tokens=4096,
                step_tokens=4096, head_tokens=512, int8_tokens=512, init_slots=1024),
    "cuda": dict(vocab=262_144, dims=(2048, 3072, 3840), dtypes=("bfloat16",), slots=(99, 1024), tokens=8192,
                 step_tokens=8192, head_tokens=8192, int8_tokens=512, init_slots=1024),
}
QUICK = dict(dims=(2048,), dtypes=None, slots=(99,))  # dtypes None: the device's first
SMOKE = dict(vocab=4096, dims=(64,), slots=(9,), tokens=256, step_tokens=256, head_tokens=64, int8_tokens=64,
             init_slots=32)
# Recipes too slow to repeat many times on 2 CPU cores (each touches all V x D values) get fewer runs.
HEAVY_REPEAT = 3


class Runner:
    """Times callables on one device and collects result rows."""

    def __init__(self, device: torch.device, copy_gbs: float, log: Callable[[str], None]):
        self.device, self.copy_gbs, self.log, self.rows = device, copy_gbs, log, []

    def time(self, fn, heavy: bool = False) -> dict:
        if self.device.type == "cuda":
            return gpu_median(fn)
        return cpu_median(fn, warmup=1, repeat=HEAVY_REPEAT if heavy else 7)

    def record(self, workload: str, impl: str, case: dict, timing: dict, nbytes: int | None = None, **extra):
        row = dict(workload=workload, impl=impl, **case, **timing, **extra)
        if nbytes is not None:
            row["gbs"] = nbytes / timing["median_ms"] / 1e6
            row["pct_copy"] = 100 * row["gbs"] / self.copy_gbs
        self.rows.append(row)


def _ours(device: torch.device) -> list[str]:
    """Our backends that can run here (the reference always; the compiled kernels; Triton on a GPU)."""
    return [b for b in _backend.BACKENDS if _backend.availability(b, device.type)[0]]


def lookup_workloads(run: Runner, vocab: int, dim: int, dtype: torch.dtype, slots: int, tokens: int,
                     compiled_reference) -> None:
    """Forward, and forward + backward, for our backends and the peers."""
    dev = run.device
    case = dict(vocab=vocab, dim=dim, dtype=str(dtype).removeprefix("torch."), slots=slots, tokens=tokens)
    weight = torch.randn(vocab, dim, device=dev, dtype=dtype)
    reserved_ids = torch.arange(7, 7 + slots, device=dev)
    ids = torch.randint(0, vocab, (tokens,), device=dev)
    ids[:slots] = reserved_ids[: min(slots, tokens)]
    grad = torch.randn(tokens, dim, device=dev, dtype=dtype)
    scale = dim ** 0.5
    scale_t = torch.tensor(scale, dtype=dtype, device=dev)
    emb = rk.ReservedEmbedding.from_embedding(weight, reserved_ids, scale=scale)
    fwd_bytes = ids.numel() * ids.element_size() + 2 * tokens * dim * weight.element_size()

    for backend in _ours(dev):
        with ops.forced(backend):
            run.record("forward", backend, case, run.time(lambda: emb(ids)), fwd_bytes)

            def fwd_bwd():
                emb.reserved_weight.grad = None
                emb(ids).backward(grad)

            run.record("forward+backward", backend, case, run.time(fwd_bwd))
    run.record("forward", "F.embedding*scale", case, run.time(lambda: TF.embedding(ids, weight) * scale_t), fwd_bytes)
    if compiled_reference is not None:
        args = (ids, weight, emb.reserved_weight.detach(), emb.slot_map, None, reference.rounded_scale(scale, dtype))
        run.record("forward", "torch.compile(reference)", case, run.time(lambda: compiled_reference(*args)), fwd_bytes)

    hook_emb = nn.Embedding.from_pretrained(weight, freeze=False)  # a new Parameter over the same storage
    baselines.keep_gradient_rows(hook_emb.weight, reserved_ids)

    def hook_fwd_bwd():
        hook_emb.weight.grad = None
        (hook_emb(ids) * scale_t).backward(grad)

    run.record("forward+backward", "nn.Embedding+hook", case, run.time(hook_fwd_bwd, heavy=True))
    if importlib.util.find_spec("peft") is not None:
        holder = nn.Module()
        holder.embed = nn.Embedding.from_pretrained(weight, freeze=True)
        model = baselines.peft_trainable_tokens(holder, "embed", reserved_ids)
        peft_embed = model.base_model.model.embed
        delta = [p for p in model.parameters() if p.requires_grad]

        def peft_fwd_bwd():
            for p in delta:
                p.grad = None
            (peft_embed(ids) * scale_t).backward(grad)

        run.record("forward", "peft", case, run.time(lambda: peft_embed(ids) * scale_t, heavy=True), fwd_bytes)
        run.record("forward+backward", "peft", case, run.time(peft_fwd_bwd, heavy=True))


def int8_workload(run: Runner, vocab: int, dim: int, dtype: torch.dtype, tokens: int) -> None:
    """gemma_pytorch's int8 embedder dequantises all V rows per call; the fused gather only the rows it reads."""
    dev = run.device
    case = dict(vocab=vocab, dim=dim, dtype=str(dtype).removeprefix("torch."), slots=99, tokens=tokens)
    weight = torch.randint(-128, 128, (vocab, dim), dtype=torch.int8, device=dev)
    scaler = torch.rand(vocab, device=dev).to(dtype)
    ids = torch.randint(0, vocab, (tokens,), device=dev)
    emb = rk.ReservedEmbedding.from_embedding(weight, torch.arange(7, 106, device=dev), weight_scaler=scaler)
    for backend in _ours(dev):
        with ops.forced(backend):
            run.record("int8 forward", backend, case, run.time(lambda: emb(ids)))
    run.record("int8 forward", "dequantise table", case,
               run.time(lambda: TF.embedding(ids, dequantised(weight, scaler)), heavy=True))


def mean_init_workload(run: Runner, vocab: int, dim: int, dtype: torch.dtype, slots: int, with_resize: bool) -> None:
    """K rows, each the mean of 8 description sub-token rows: batched op vs a per-token loop (vs resizing)."""
    dev = run.device
    case = dict(vocab=vocab, dim=dim, dtype=str(dtype).removeprefix("torch."), slots=slots, tokens=8 * slots)
    weight = torch.randn(vocab, dim, device=dev, dtype=dtype)
    reserved_ids = torch.arange(7, 7 + slots, device=dev)
    src = torch.randint(200, vocab, (slots, 8), device=dev)
    offsets = torch.arange(0, 8 * slots + 1, 8, device=dev)
    emb = rk.ReservedEmbedding.from_embedding(weight, reserved_ids)
    for backend in _ours(dev):
        with ops.forced(backend):
            run.record("mean init", backend, case, run.time(lambda: emb.init_reserved_((offsets, src.reshape(-1)))))
    table = weight.clone()
    dst = reserved_ids.tolist()
    sources = [row for row in src]

    @torch.no_grad()
    def loop():
        for k in range(slots):
            table[dst[k]] = table[sources[k]].mean(0)

    run.record("mean init", "per-token loop", case, run.time(loop))
    if with_resize and importlib.util.find_spec("transformers") is not None:
        model = head_only_gemma(weight)

        def grow():
            model.resize_token_embeddings(vocab + slots, mean_resizing=True)
            model.resize_token_embeddings(vocab)  # back, so every timed call does the same work

        timing = gpu_median(grow) if dev.type == "cuda" else cpu_median(grow, warmup=0, repeat=1)
        run.record("mean init", "resize_token_embeddings(mean_resizing)", case, timing)


def step_workloads(run: Runner, vocab: int, dim: int, dtype: str, slots: int, tokens: int, head: bool) -> None:
    case = dict(vocab=vocab, dim=dim, dtype=dtype, slots=slots, tokens=tokens)
    name = "train step (embedding + tied head)" if head else "train step (embedding)"
    for recipe in train_step.available_recipes(head):
        # One memory process per recipe: the recipes here differ by one to two orders of magnitude.
        r = train_step.run_one(recipe, memory_runs=1, device=run.device.type, vocab=vocab, dim=dim, slots=slots,
                               tokens=tokens, dtype=dtype, repeat=HEAVY_REPEAT if run.device.type == "cpu" else 5,
                               head=head)
        run.record(name, recipe, case, {k: r[k] for k in ("median_ms", "p20_ms", "p80_ms")},
                   extra_bytes=r["extra_bytes"])
        run.log(f"  {name} {recipe}: {r['median_ms']:.1f} ms, {r['extra_bytes'] / 2**20:.0f} MiB beyond the table")


def run_matrix(device: str = "cpu", quick: bool = False, smoke: bool = False, out: str = "bench/results",
               log: Callable[[str], None] = print) -> tuple[dict, str]:
    """Run the matrix for ``device``; write ``<out>/<device>-<date>.json`` and ``.md``; return (payload, path)."""
    dev = torch.device(device)
    m = dict(MATRICES[dev.type])
    if quick:
        m.update({k: v for k, v in QUICK.items() if v is not None}, dtypes=m["dtypes"][:1])
    if smoke:
        m.update(SMOKE, dtypes=m["dtypes"][:1])
    copy_gbs = copy_bandwidth_gbs(device=dev)
    run = Runner(dev, copy_gbs, log)
    log(f"{device}: copy bandwidth {copy_gbs:.0f} GB/s; backends {_ours(dev)}")
    compiled = torch.compile(reference.scaled_rows, dynamic=True) if not smoke else None
    cases = list(itertools.product(m["dims"], m["dtypes"], m["slots"]))
    for i, (dim, dtype, slots) in enumerate(cases):
        log(f"[{i + 1}/{len(cases)}] lookups: D={dim} {dtype} K={slots} N={m['tokens']}")
        lookup_workloads(run, m["vocab"], dim, getattr(torch, dtype), slots, m["tokens"], compiled)
    dim, dtype = m["dims"][0], m["dtypes"][0]
    log(f"int8 forward and mean init: D={dim} {dtype}")
    int8_workload(run, m["vocab"], dim, getattr(torch, dtype), m["int8_tokens"])
    mean_init_workload(run, m["vocab"], dim, getattr(torch, dtype), m["init_slots"], with_resize=True)
    step_slots = m["slots"][0] if dev.type == "cpu" else m["slots"][-1]
    step_dim = dim if dev.type == "cpu" else m["dims"][-1]
    log(f"training steps (fresh process per recipe): D={step_dim} {dtype} K={step_slots}")
    step_workloads(run, m["vocab"], step_dim, dtype, step_slots, m["step_tokens"], head=False)
    step_workloads(run, m["vocab"], step_dim, dtype, step_slots, m["head_tokens"], head=True)
    payload = dict(environment=environment(), device=dev.type, copy_gbs=copy_gbs, matrix=m, quick=quick,
                   smoke=smoke, rows=run.rows)
    stamp = datetime.date.today().isoformat()
    path = os.path.join(out, f"{dev.type}{'-smoke' if smoke else '-quick' if quick else ''}-{stamp}.json")
    write_results(path, payload)
    from reserved_kernels.benchmarks.report import render_markdown, render_png

    with open(path.removesuffix(".json") + ".md", "w") as f:
        f.write(render_markdown(payload))
    render_png(payload, path.removesuffix(".json") + ".png")
    return payload, path


def main(args) -> None:
    payload, path = run_matrix(args.device, quick=args.quick, smoke=args.smoke, out=args.out,
                               log=lambda s: print(s, flush=True))
    from reserved_kernels.benchmarks.report import render_markdown

    print(render_markdown(payload))
    print(f"wrote {path} and {path.removesuffix('.json')}.md", file=sys.stderr)
