"""The independent oracle (plain PyTorch on a merged table) and derived error bounds, shared by the tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

EPS32 = torch.finfo(torch.float32).eps


def merged_table(weight: Tensor, reserved_ids: Tensor, reserved_weight: Tensor, weight_scaler: Tensor | None = None):
    """``weight`` (dequantised as gemma_pytorch does) with rows ``reserved_ids`` replaced; differentiable in reserved_weight."""
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
