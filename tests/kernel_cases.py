"""Backend-agnostic checks of the three ops against the independent oracle.

Each check calls the public ops (``reserved_kernels.ops``) while one backend is forced, so the same
checks run the reference, the compiled CPU kernels, Triton in the interpreter, and Triton and the
compiled CUDA kernels on a GPU (``backend_suite.py`` binds them).
"""

from __future__ import annotations

import os

import pytest
import torch

import reserved_kernels as rk
from reserved_kernels import ops, reference
from tests.oracle import (
    assert_as_close_as_torch,
    assert_within,
    cross_entropy_oracle,
    embedding_oracle,
    frozen_lse_oracle,
    mean_oracle,
    merged_table,
    scatter_oracle,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DIMS = [1, 3, 37, 123]


def exact_casts(device: torch.device, dtype: torch.dtype) -> bool:
    """Triton's interpreter converts fp32 to bf16 by truncation, not round-to-nearest-even as the GPU does.

    So through the interpreter bf16 results may differ from PyTorch's in the last bit; on a GPU
    (and for fp32/fp16, which the interpreter converts with numpy) they must match bit for bit.
    """
    return not (device.type == "cpu" and dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1")


def assert_same_rounding(actual, expected, device, dtype):
    if exact_casts(device, dtype):
        assert torch.equal(actual, expected), f"max difference {(actual.float() - expected.float()).abs().max()}"
    else:  # each truncating conversion (master row, int8 dequantisation, output) loses < 1 ulp: allow three
        spacing = 3 * torch.finfo(dtype).eps * expected.float().abs()
        assert bool(((actual.float() - expected.float()).abs() <= spacing).all())


def make_case(*, device, dtype, vocab=97, dim=37, num_reserved=5, shape=(4, 13), int8=False, master=False, seed=0):
    """Fresh random table, reserved rows and ids (repeated and reserved ids always among them).

    ``master``: the reserved rows are float32 (a 16-bit table's master rows), with bits below the
    table dtype's resolution, so their rounding inside the kernels is exercised.
    """
    gen = torch.Generator().manual_seed(seed)
    if int8:
        weight = torch.randint(-128, 128, (vocab, dim), dtype=torch.int8, generator=gen)
        scaler = (torch.rand(vocab, generator=gen) + 0.01).to(dtype)
    else:
        weight, scaler = torch.randn(vocab, dim, generator=gen).to(dtype), None
    reserved_ids = torch.randperm(vocab, generator=gen)[:num_reserved]
    reserved_weight = torch.randn(num_reserved, dim, generator=gen)
    reserved_weight = reserved_weight if master else reserved_weight.to(dtype)
    ids = torch.randint(0, vocab, shape, generator=gen)
    flat = ids.view(-1)
    if flat.numel() >= 4 and num_reserved:
        flat[: min(num_reserved * 2, flat.numel())] = reserved_ids.repeat(2)[: min(num_reserved * 2, flat.numel())]
        flat[-1] = flat[0]  # a repeated id
    to = dict(device=device)
    return dict(weight=weight.to(**to), scaler=None if scaler is None else scaler.to(**to),
                reserved_ids=reserved_ids.to(**to), reserved_weight=reserved_weight.to(**to), ids=ids.to(**to),
                slot_map=rk.build_slot_map(reserved_ids, vocab, device))


def check_gather(device, dtype, dim, num_reserved, shape, int8=False, master=False, id_dtype=torch.int64, seed=0):
    c = make_case(device=device, dtype=dtype, dim=dim, num_reserved=num_reserved, shape=shape, int8=int8,
                  master=master, seed=seed)
    ids = c["ids"].to(id_dtype)
    scale = dim ** 0.5
    got = ops.gather(ids, c["weight"], c["reserved_weight"], c["slot_map"], c["scaler"], scale)
    rows = c["reserved_weight"].to(dtype)  # the master rows as the table dtype sees them
    expected = embedding_oracle(ids, merged_table(c["weight"], c["reserved_ids"], rows, c["scaler"]), scale)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    assert_same_rounding(got, expected, device, dtype)


def _check_scatter_against_oracle(grad, ids, c, num_reserved, scale, out_dtype):
    got = ops.scatter_grad(grad, ids, c["slot_map"], num_reserved, scale, out_dtype)
    assert got.shape == (num_reserved, grad.shape[-1]) and got.dtype == out_dtype
    exact, bound = scatter_oracle(grad, ids, c["reserved_ids"], scale)
    if out_dtype != torch.float32:  # then one more rounding, to out_dtype, of the fp32 sum
        bound = bound + torch.finfo(out_dtype).eps * exact.abs()
        if not exact_casts(grad.device, out_dtype):
            bound = bound * 2
    assert_within(got, exact, bound)
    again = ops.scatter_grad(grad, ids, c["slot_map"], num_reserved, scale, out_dtype)
    assert torch.equal(got, again), "the backward differs between two runs on the same input"
    return got


def check_scatter(device, dtype, dim, num_reserved, shape, out_dtype=torch.float32, seed=0):
    c = make_case(device=device, dtype=dtype, dim=dim, num_reserved=num_reserved, shape=shape, seed=seed)
    grad = torch.randn(*shape, dim, generator=torch.Generator().manual_seed(seed + 1)).to(device=device, dtype=dtype)
    _check_scatter_against_oracle(grad, c["ids"], c, num_reserved, 1.75, out_dtype)


def skewed_ids(kind: str, reserved_ids: torch.Tensor, vocab: int, num_tokens: int, seed: int = 0) -> torch.Tensor:
    """``one-hot-row``: every token is one reserved id; ``zipf``: ids drawn with P(rank r) ∝ 1/r over the
    vocabulary ordered with the reserved ids first (a control token in every sequence, terms often)."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "one-hot-row":
        return reserved_ids[1].cpu().repeat(num_tokens).to(reserved_ids.device)
    reserved = set(reserved_ids.tolist())
    order = torch.cat([reserved_ids.cpu(), torch.tensor([i for i in range(vocab) if i not in reserved])])
    weights = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)
    return order[torch.multinomial(weights, num_tokens, replacement=True, generator=gen)].to(reserved_ids.device)


def check_skewed_scatter(device, dtype, kind, num_tokens=1000, dim=33, num_reserved=3):
    """Skew is normal: one row hit by every token, or Zipf-distributed ids; runs cross many chunks."""
    c = make_case(device=device, dtype=dtype, dim=dim, num_reserved=num_reserved, shape=(num_tokens,))
    ids = skewed_ids(kind, c["reserved_ids"], 97, num_tokens)
    grad = torch.randn(num_tokens, dim, generator=torch.Generator().manual_seed(5)).to(device=device, dtype=dtype)
    got = _check_scatter_against_oracle(grad, ids, c, num_reserved, 1.0, torch.float32)
    if kind == "one-hot-row":
        assert torch.equal(got[0], torch.zeros_like(got[0])) and torch.equal(got[2], torch.zeros_like(got[2]))


def check_segment_mean(device, dtype, dim, int8=False, master=False, seed=0):
    c = make_case(device=device, dtype=dtype, dim=dim, num_reserved=6, int8=int8, master=master, seed=seed)
    gen = torch.Generator().manual_seed(seed + 2)
    lengths = [1, 3, 1, 200, 2]  # one long list crosses several blocks
    src = torch.randint(0, 97, (sum(lengths),), generator=gen)
    src[:3] = c["reserved_ids"][:3].cpu()  # some sources are reserved rows: read as the forward pass reads them
    offsets = torch.tensor([0] + lengths).cumsum(0)
    got = ops.segment_mean(c["weight"], c["reserved_weight"], c["slot_map"], c["scaler"], offsets.to(device),
                           src.to(device))
    merged = merged_table(c["weight"], c["reserved_ids"], c["reserved_weight"].to(dtype), c["scaler"])
    expected, bound = mean_oracle(merged, offsets, src.to(device))
    # Rows are rounded to the table dtype before summing (both sides do that); through the interpreter
    # that rounding truncates in bf16, which costs up to one ulp per row.
    if not exact_casts(device, dtype):
        bound = bound + torch.finfo(dtype).eps * mean_oracle(merged.abs(), offsets, src.to(device))[0]
    assert got.dtype == torch.float32 and got.shape == (len(lengths), dim)
    assert_within(got, expected, bound)


def check_empty(device, dtype):
    c = make_case(device=device, dtype=dtype, num_reserved=0, shape=(0,))
    out = ops.gather(c["ids"], c["weight"], c["reserved_weight"], c["slot_map"], None, 2.0)
    assert out.shape == (0, 37)
    grad = torch.randn(0, 37, device=device, dtype=dtype)
    assert ops.scatter_grad(grad, c["ids"], c["slot_map"], 0, 1.0, torch.float32).shape == (0, 37)
    offsets = torch.zeros(1, dtype=torch.int64, device=device)
    src = torch.zeros(0, dtype=torch.int64, device=device)
    assert ops.segment_mean(c["weight"], c["reserved_weight"], c["slot_map"], None, offsets, src).shape == (0, 37)
    # K = 0 with tokens present: behaves as a plain embedding, gradient is (0, D).
    c = make_case(device=device, dtype=dtype, num_reserved=0, shape=(5,))
    out = ops.gather(c["ids"], c["weight"], c["reserved_weight"], c["slot_map"], None, 1.0)
    assert torch.equal(out, c["weight"][c["ids"]])
    # Tokens but no hits: every reserved row's gradient is written as zero.
    c = make_case(device=device, dtype=dtype, num_reserved=3, shape=(9,))
    ids = torch.tensor([i for i in range(97) if i not in c["reserved_ids"].tolist()][:9], device=device)
    grad = torch.randn(9, 37, device=device, dtype=dtype)
    assert torch.equal(ops.scatter_grad(grad, ids, c["slot_map"], 3, 1.0, torch.float32),
                       torch.zeros(3, 37, device=device))


def check_bad_ids_raise(device, dtype, error=IndexError, names_value=True):
    """Out-of-range ids: a clear error naming the range (and, on CPU, the bad value); no output.

    A device-side assertion's message is a literal, so it names the range as ``[0, num_embeddings)``.
    """
    c = make_case(device=device, dtype=dtype, num_reserved=3, shape=(9,))
    args = (c["weight"], c["reserved_weight"], c["slot_map"], None, 1.0)
    for bad in (97, -1):
        ids = c["ids"].clone()
        ids[4] = bad
        pattern = rf"ids must lie in \[0, 97\), got {bad}" if names_value else r"ids must lie in \[0, num_embeddings\)"
        with pytest.raises(error, match=pattern):
            ops.gather(ids, *args)


def reference_agrees(device, dtype):
    """The backend and the reference give the same gather (checked against each other, not only the oracle)."""
    c = make_case(device=device, dtype=dtype, dim=123, num_reserved=7, shape=(3, 31), master=True)
    ours = ops.gather(c["ids"], c["weight"], c["reserved_weight"], c["slot_map"], None, 3.0)
    ref = reference.gather(c["ids"], c["weight"], c["reserved_weight"], c["slot_map"], None, 3.0)
    assert_same_rounding(ours, ref, device, dtype)


def check_linear_cross_entropy(device, dtype, *, vocab=311, dim=37, num_reserved=5, tokens=53, softcap=None,
                               stats=True, tile_bytes=4096, master=False, seed=0):
    """The fused loss against the merged table's (N, V) logits: per-token losses (0 where ignored), entropy,
    top-1, and the gradients for any per-token upstream gradient (``reduction="none"``), in the budget
    ``assert_as_close_as_torch`` derives. A small ``tile_bytes`` puts tile edges inside the sequence and
    the vocabulary; some targets are reserved ids (one of them twice), some ignored."""
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn(vocab, dim, generator=gen) * 3 / dim ** 0.5).to(dtype)
    reserved_ids = torch.randperm(vocab, generator=gen)[:num_reserved]
    rows = torch.randn(num_reserved, dim, generator=gen) * 3 / dim ** 0.5
    rows = rows if master else rows.to(dtype)
    hidden = torch.randn(tokens, dim, generator=gen).to(dtype)
    targets = torch.randint(0, vocab, (tokens,), generator=gen)
    targets[::7] = -100
    if num_reserved:
        targets[1:4] = reserved_ids[torch.arange(3) % num_reserved]
        targets[-1] = reserved_ids[0]
    upstream = torch.rand(tokens, generator=gen) + 0.5
    to = dict(device=device)
    hidden, weight, targets, upstream = hidden.to(**to), weight.to(**to), targets.to(**to), upstream.to(**to)
    rows = rows.to(**to).requires_grad_(True)
    hidden.requires_grad_(True)
    slot_map = rk.build_slot_map(reserved_ids, vocab, device)
    out = rk.linear_cross_entropy(hidden, weight, rows, slot_map, targets, softcap=softcap, reduction="none",
                                  tile_bytes=tile_bytes, return_stats=stats)
    loss = out.loss if stats else out
    (loss * upstream).sum().backward()
    merged = merged_table(weight, reserved_ids.to(device), rows.detach().to(dtype))
    exact = cross_entropy_oracle(hidden, merged, targets, softcap, upstream)
    plain = cross_entropy_oracle(hidden, merged, targets, softcap, upstream, dtype=dtype)
    reserved = reserved_ids.to(device)
    # Beyond twice plain PyTorch's own error: ours sums in another order (tiles), and a sum of n terms in any
    # order is within n·eps·Σ|terms| of the exact one — n = V for the loss, the entropy and the hidden
    # gradient (one term per column), N for the rows' gradient (one per token); plus one rounding of the output.
    eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    out_eps = torch.finfo(dtype).eps

    def floor(exact_value, terms, output_rounding=eps):
        return (terms * eps + output_rounding) * exact_value.abs().max().item()

    assert loss.shape == (tokens,) and loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert bool((loss[targets == -100] == 0).all())
    assert_as_close_as_torch(loss, plain[0], exact[0], floor(exact[0], vocab), "loss")
    if stats:
        assert_as_close_as_torch(out.entropy, plain[1], exact[1], floor(exact[1], vocab), "entropy")
        assert torch.equal(out.is_top1, exact[2]), "is_top1"
        frozen = [frozen_lse_oracle(hidden, weight, reserved_ids.to(device), softcap, d)
                  for d in (dtype, torch.float64)]
        assert_as_close_as_torch(out.frozen_lse, *frozen, floor(frozen[1], vocab), "frozen_lse")
    assert hidden.grad.dtype == dtype and rows.grad.dtype == rows.dtype and rows.grad.shape == rows.shape
    assert_as_close_as_torch(hidden.grad, plain[3], exact[3], floor(exact[3], vocab, out_eps), "grad hidden")
    if num_reserved:
        assert_as_close_as_torch(rows.grad, plain[4][reserved], exact[4][reserved],
                                 floor(exact[4][reserved], tokens, torch.finfo(rows.dtype).eps), "grad rows")
