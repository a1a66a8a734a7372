"""Backend-agnostic checks of one kernel backend against the reference and the oracle.

Used by ``test_triton_interpreter.py`` (Triton on CPU through the interpreter) and
``test_gpu.py`` (Triton and CUDA on a GPU), so every backend meets the same checks.
"""

from __future__ import annotations

import os

import pytest
import torch

import reserved_kernels as rk
from reserved_kernels import reference
from tests.oracle import assert_within, embedding_oracle, mean_oracle, merged_table, scatter_oracle

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
    else:  # each truncating conversion (int8 dequantisation, output) loses < 1 ulp: allow two
        spacing = 2 * torch.finfo(dtype).eps * expected.float().abs()
        assert bool(((actual.float() - expected.float()).abs() <= spacing).all())


def make_case(*, device, dtype, vocab=97, dim=37, num_reserved=5, shape=(4, 13), int8=False, seed=0):
    """Fresh random table, reserved rows and ids (repeated and reserved ids always among them)."""
    gen = torch.Generator().manual_seed(seed)
    if int8:
        weight = torch.randint(-128, 128, (vocab, dim), dtype=torch.int8, generator=gen)
        scaler = (torch.rand(vocab, generator=gen) + 0.01).to(dtype)
    else:
        weight, scaler = torch.randn(vocab, dim, generator=gen).to(dtype), None
    reserved_ids = torch.randperm(vocab, generator=gen)[:num_reserved]
    reserved_weight = torch.randn(num_reserved, dim, generator=gen).to(dtype)
    ids = torch.randint(0, vocab, shape, generator=gen)
    flat = ids.view(-1)
    if flat.numel() >= 4 and num_reserved:
        flat[: min(num_reserved * 2, flat.numel())] = reserved_ids.repeat(2)[: min(num_reserved * 2, flat.numel())]
        flat[-1] = flat[0]  # a repeated id
    to = dict(device=device)
    return dict(weight=weight.to(**to), scaler=None if scaler is None else scaler.to(**to),
                reserved_ids=reserved_ids.to(**to), reserved_weight=reserved_weight.to(**to), ids=ids.to(**to),
                slot_map=rk.build_slot_map(reserved_ids, vocab, device))


def check_gather(impl, device, dtype, dim, num_reserved, shape, int8=False, id_dtype=torch.int64, seed=0):
    c = make_case(device=device, dtype=dtype, dim=dim, num_reserved=num_reserved, shape=shape, int8=int8, seed=seed)
    ids = c["ids"].to(id_dtype)
    scale = dim ** 0.5
    got = impl.gather(ids, c["weight"], c["reserved_weight"], c["slot_map"], c["scaler"], scale)
    expected = embedding_oracle(ids, merged_table(c["weight"], c["reserved_ids"], c["reserved_weight"], c["scaler"]),
                                scale)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    assert_same_rounding(got, expected, device, dtype)


def check_scatter(impl, device, dtype, dim, num_reserved, shape, deterministic, seed=0):
    c = make_case(device=device, dtype=dtype, dim=dim, num_reserved=num_reserved, shape=shape, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    grad = torch.randn(*shape, dim, generator=gen).to(device=device, dtype=dtype)
    scale = 1.75
    got = impl.scatter_grad(grad, c["ids"], c["slot_map"], num_reserved, scale, deterministic)
    assert got.shape == (num_reserved, dim) and got.dtype == torch.float32
    exact, bound = scatter_oracle(grad, c["ids"], c["reserved_ids"], scale)
    assert_within(got, exact, bound)
    if deterministic:
        again = impl.scatter_grad(grad, c["ids"], c["slot_map"], num_reserved, scale, deterministic)
        assert torch.equal(got, again), "deterministic scatter differs between two runs"


def check_one_hot_scatter(impl, device, dtype, deterministic, num_tokens=1000, dim=33):
    """Every token on one slot: the worst case for contention and for segment lengths."""
    c = make_case(device=device, dtype=dtype, dim=dim, num_reserved=3, shape=(num_tokens,))
    ids = c["reserved_ids"][1].repeat(num_tokens)
    grad = torch.randn(num_tokens, dim, generator=torch.Generator().manual_seed(5)).to(device=device, dtype=dtype)
    got = impl.scatter_grad(grad, ids, c["slot_map"], 3, 1.0, deterministic)
    exact, bound = scatter_oracle(grad, ids, c["reserved_ids"], 1.0)
    assert_within(got, exact, bound)
    assert torch.equal(got[0], torch.zeros_like(got[0])) and torch.equal(got[2], torch.zeros_like(got[2]))


def check_segment_mean(impl, device, dtype, dim, int8=False, seed=0):
    c = make_case(device=device, dtype=dtype, dim=dim, num_reserved=6, int8=int8, seed=seed)
    gen = torch.Generator().manual_seed(seed + 2)
    lengths = [1, 3, 1, 200, 2]  # one long list crosses several pieces
    src = torch.randint(0, 97, (sum(lengths),), generator=gen)
    src[:3] = c["reserved_ids"][:3].cpu()  # some sources are reserved rows: read from reserved_weight
    offsets = torch.tensor([0] + lengths).cumsum(0)
    got = impl.segment_mean(c["weight"], c["reserved_weight"], c["slot_map"], c["scaler"], offsets.to(device),
                            src.to(device))
    merged = merged_table(c["weight"], c["reserved_ids"], c["reserved_weight"], c["scaler"])
    expected, bound = mean_oracle(merged, offsets, src.to(device))
    # Rows of an int8 table are rounded to the float dtype before summing (both sides do that);
    # through the interpreter that rounding truncates in bf16, which costs up to one ulp per row.
    if int8 and not exact_casts(device, dtype):
        bound = bound + torch.finfo(dtype).eps * mean_oracle(merged.abs(), offsets, src.to(device))[0]
    assert got.dtype == torch.float32 and got.shape == (len(lengths), dim)
    assert_within(got, expected, bound)


def check_empty(impl, device, dtype):
    c = make_case(device=device, dtype=dtype, num_reserved=0, shape=(0,))
    out = impl.gather(c["ids"], c["weight"], c["reserved_weight"], c["slot_map"], None, 2.0)
    assert out.shape == (0, 37)
    grad = torch.randn(0, 37, device=device, dtype=dtype)
    assert impl.scatter_grad(grad, c["ids"], c["slot_map"], 0, 1.0, True).shape == (0, 37)
    offsets = torch.zeros(1, dtype=torch.int64, device=device)
    src = torch.zeros(0, dtype=torch.int64, device=device)
    assert impl.segment_mean(c["weight"], c["reserved_weight"], c["slot_map"], None, offsets, src).shape == (0, 37)
    # K = 0 with tokens present: behaves as a plain embedding, gradient is (0, D).
    c = make_case(device=device, dtype=dtype, num_reserved=0, shape=(5,))
    out = impl.gather(c["ids"], c["weight"], c["reserved_weight"], c["slot_map"], None, 1.0)
    assert torch.equal(out, c["weight"][c["ids"]])


def check_poisoned_outputs(impl_module, monkeypatch, device, dtype):
    """Outputs allocated with NaN instead of garbage: any element a kernel fails to write shows up."""

    class PoisonTorch:
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def empty(*args, **kwargs):
            out = torch.empty(*args, **kwargs)
            return out.fill_(float("nan")) if out.is_floating_point() else out.fill_(-(2**30))

    monkeypatch.setattr(impl_module, "torch", PoisonTorch())
    check_gather(impl_module, device, dtype, dim=37, num_reserved=5, shape=(6, 7))
    check_scatter(impl_module, device, dtype, dim=37, num_reserved=5, shape=(6, 7), deterministic=True)
    check_segment_mean(impl_module, device, dtype, dim=37)


def reference_agrees(impl, device, dtype):
    """The backend and the reference give the same gather (checked against each other, not only the oracle)."""
    c = make_case(device=device, dtype=dtype, dim=123, num_reserved=7, shape=(3, 31))
    ours = impl.gather(c["ids"], c["weight"], c["reserved_weight"], c["slot_map"], None, 3.0)
    ref = reference.gather(c["ids"], c["weight"], c["reserved_weight"], c["slot_map"], None, 3.0)
    assert_same_rounding(ours, ref, device, dtype)

