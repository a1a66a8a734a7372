"""The independent oracle (plain PyTorch on a merged table) and derived error bounds, shared by the tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

EPS32 = torch.finfo(torch.float32).eps


def merged_table(weight: Tensor, reserved_ids: Tensor, reserved_weight: Tensor, weight_scaler: Tensor | None = None):
    """``weight`` (dequantised as gemma_pytorch does) with rows ``reserved_ids`` replaced; differentiable in
    reserved_weight."""
    base = weight.detach()
    if weight_scaler is not None:
        base = base * weight_scaler.unsqueeze(-1)  # int8 * float promotes to the float dtype
    return base.index_copy(0, reserved_ids.to(base.device), reserved_weight)


def embedding_oracle(ids: Tensor, merged: Tensor, scale: float | None) -> Tensor:
    out = F.embedding(ids.long(), merged)
    return out if scale is None else out * torch.tensor(scale, dtype=merged.dtype, device=merged.device)


def scatter_oracle(grad_out: Tensor, ids: Tensor, reserved_ids: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """float64 ``scale * Σ grad`` per reserved id, and the bound ``(count + 1) * eps32 * scale * Σ|grad|``.

    A sum of m fp32 terms in any order is within ``m * eps32 * Σ|terms|`` of the exact sum (plus one
    rounding of the scale product), which is the budget every backend gets.
    """
    d = grad_out.shape[-1]
    g = grad_out.reshape(-1, d).double()
    flat = ids.reshape(-1).long()
    exact = torch.zeros(len(reserved_ids), d, dtype=torch.float64, device=g.device)
    absum = torch.zeros_like(exact)
    counts = torch.zeros(len(reserved_ids), 1, dtype=torch.float64, device=g.device)
    for k, rid in enumerate(reserved_ids.tolist()):
        hit = flat == rid
        exact[k] = g[hit].sum(0) * scale
        absum[k] = g[hit].abs().sum(0) * abs(scale)
        counts[k] = hit.sum()
    return exact, (counts + 2) * EPS32 * absum


def mean_oracle(rows_of: Tensor, offsets: Tensor, src_ids: Tensor) -> tuple[Tensor, Tensor]:
    """float64 means of ``rows_of[src]`` per CSR segment, and the bound ``(count + 2) * eps32 * mean|row|``."""
    bounds = offsets.tolist()
    means, tols = [], []
    for k in range(len(bounds) - 1):
        rows = rows_of[src_ids[bounds[k]:bounds[k + 1]].long()].double()
        means.append(rows.mean(0))
        tols.append((rows.shape[0] + 2) * EPS32 * rows.abs().mean(0))
    d = rows_of.shape[1]
    empty = torch.empty(0, d, dtype=torch.float64, device=rows_of.device)
    return (torch.stack(means) if means else empty), (torch.stack(tols) if tols else empty)


def assert_within(actual: Tensor, expected: Tensor, bound: Tensor) -> None:
    err = (actual.double() - expected.double()).abs()
    assert torch.isfinite(actual).all(), "non-finite values in the result"
    worst = (err - bound).max().item() if err.numel() else 0.0
    assert bool((err <= bound).all()), f"error exceeds the derived bound by up to {worst:.3g}"


def gemm_disagreement(hidden: Tensor, rows: Tensor, logits: Tensor | None = None,
                      softcap: float | None = None) -> Tensor:
    """How far two fp32 GEMMs may disagree on ``hidden @ rows.T`` (any blocking, any summation order).

    Each computes a dot of D products with an error of at most ``γ_D Σ|h_i w_i|`` (``γ_D = D u / (1 - D u)``,
    ``u = eps / 2``), so the two differ by at most ``2 γ_D (|hidden| @ |rows|ᵀ)``. A soft-cap
    ``c · tanh(x / c)`` has slope at most 1, so it passes that difference on, and adds its own three
    roundings (divide, tanh, multiply) of a few ulps of each result: ``8 eps |logits|`` for the two.
    """
    d = hidden.shape[-1]
    u = EPS32 / 2
    gamma = d * u / (1 - d * u)
    bound = 2 * gamma * (hidden.detach().abs().double() @ rows.detach().abs().double().T)
    if softcap is not None:
        bound = bound + 8 * EPS32 * logits.detach().abs().double()
    return bound


def captured_input(module: torch.nn.Module, fn):
    """``(fn(), the first positional input module received during it)``: e.g. the hidden states a head saw."""
    seen = []
    handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    try:
        result = fn()
    finally:
        handle.remove()
    return result, seen[-1]


def captured_output(module: torch.nn.Module, fn):
    """``(fn(), what module returned during it)``."""
    seen = []
    handle = module.register_forward_hook(lambda m, args, out: seen.append(out.detach()))
    try:
        result = fn()
    finally:
        handle.remove()
    return result, seen[-1]


def assert_same_table_logits(actual: Tensor, expected: Tensor, hidden: Tensor, table: Tensor,
                             columns: list[int] | None, softcap: float | None = None) -> None:
    """``actual`` and ``expected`` are one table's logits of ``hidden`` through two GEMMs.

    ``columns`` are the vocabulary columns the two computed differently (a patched head's K reserved
    columns come from a K-column GEMM; after merging, from the V-column one): those agree within
    :func:`gemm_disagreement`; every other column is the same computation and must be bit-identical.
    ``columns=None``: every column came from a different GEMM shape (all held to the bound).
    """
    v = actual.shape[-1]
    cols = list(range(v)) if columns is None else list(columns)
    others = [i for i in range(v) if i not in set(cols)]
    assert torch.equal(actual[..., others], expected[..., others]), "a column computed the same way changed"
    bound = gemm_disagreement(hidden, table[cols], expected[..., cols], softcap)
    assert_within(actual[..., cols], expected[..., cols], bound)


def cross_entropy_oracle(hidden: Tensor, merged: Tensor, targets: Tensor, softcap: float | None, upstream: Tensor,
                         ignore_index: int = -100, dtype: torch.dtype = torch.float64):
    """Per-token losses, entropies and top-1 flags of ``cap(hidden @ merged.T)``, and the gradients of
    ``Σ upstream · loss`` for ``hidden`` and ``merged``, all computed through the whole (N, V) logits in
    ``dtype``: float64 is the exact reference, a 16-bit or fp32 ``dtype`` is what plain PyTorch gets at
    that precision (the logits in that dtype, upcast for the loss, as transformers does)."""
    h = hidden.detach().to(dtype).requires_grad_(True)
    m = merged.detach().to(dtype).requires_grad_(True)
    logits = h @ m.T
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    logits = logits.to(torch.promote_types(dtype, torch.float32))
    loss = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="none")
    (loss * upstream.to(loss.dtype)).sum().backward()
    valid = targets != ignore_index
    logp = logits.detach().log_softmax(-1)
    entropy = torch.where(valid, -(logp.exp() * logp).sum(-1), 0)
    top1 = valid & (logits.detach().argmax(-1) == targets)
    return loss.detach(), entropy, top1, h.grad, m.grad


def frozen_lse_oracle(hidden: Tensor, weight: Tensor, reserved_ids: Tensor, softcap: float | None,
                      dtype: torch.dtype = torch.float64) -> Tensor:
    """The log-sum-exp of ``cap(hidden @ weight.T)`` over every column but ``reserved_ids``, through the whole
    (N, V) logits in ``dtype`` (float64: exact; else what plain PyTorch gets at that precision)."""
    logits = hidden.detach().to(dtype) @ weight.detach().to(dtype).T
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    logits = logits.to(torch.promote_types(dtype, torch.float32))
    logits[:, reserved_ids] = float("-inf")
    return logits.logsumexp(-1)


def assert_as_close_as_torch(ours: Tensor, torch_result: Tensor, exact: Tensor, floor: float, what: str) -> None:
    """flash-attention's budget: ours at most twice as far from the exact (float64) result as plain PyTorch's
    own result at the same precision is, plus ``floor`` (the rounding of the output itself)."""
    budget = 2 * (torch_result.double() - exact.double()).abs().max().item() + floor
    err = (ours.double() - exact.double()).abs().max().item() if ours.numel() else 0.0
    assert torch.isfinite(ours).all(), f"{what}: non-finite values"
    assert err <= budget, f"{what}: error {err:.3g} exceeds the budget {budget:.3g}"
