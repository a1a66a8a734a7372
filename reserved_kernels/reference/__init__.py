"""Pure-PyTorch implementations of the three ops: the CPU path and the oracle for the kernels.

Each function takes already-validated arguments (see ``reserved_kernels.ops``) and allocates
its own output. ``slot_map`` is an int32 vector of length V: ``slot_map[i]`` is the row of
``reserved_weight`` that replaces ``weight[i]``, or -1 when id ``i`` is not reserved.
None of these functions synchronises with the device (no ``.item()``, no data-dependent shapes).
"""

from __future__ import annotations

import torch
from torch import Tensor


def rounded_scale(scale: float, dtype: torch.dtype) -> float:
    """``scale`` rounded to ``dtype``, as Gemma's models do (``torch.tensor(normalizer, dtype=dtype)``)."""
    return float(torch.tensor(scale, dtype=dtype))


def gather_rows(ids: Tensor, weight: Tensor, reserved_weight: Tensor, slot_map: Tensor,
                weight_scaler: Tensor | None) -> Tensor:
    """``row(ids[n])`` for flat ``ids``: the reserved row for reserved ids, else the (dequantised) base row."""
    dtype = reserved_weight.dtype
    rows = weight.index_select(0, ids)
    if weight_scaler is not None:
        # gemma_pytorch: ``weight * weight_scaler.unsqueeze(-1)``; int8 converts exactly to the float dtype.
        rows = rows.to(dtype) * weight_scaler.index_select(0, ids).to(dtype).unsqueeze(-1)
    if reserved_weight.shape[0] == 0:
        return rows
    slot = slot_map.index_select(0, ids)
    if rows.device.type == "cpu":
        # On the CPU a data-dependent shape costs no sync: overwrite only the reserved tokens' rows.
        hit = (slot >= 0).nonzero().squeeze(-1)
        return rows.index_copy_(0, hit, reserved_weight.index_select(0, slot.index_select(0, hit)))
    reserved_rows = reserved_weight.index_select(0, slot.clamp_min(0))
    return torch.where((slot >= 0).unsqueeze(-1), reserved_rows, rows)


def gather(ids: Tensor, weight: Tensor, reserved_weight: Tensor, slot_map: Tensor,
           weight_scaler: Tensor | None, scale: float) -> Tensor:
    """``out[n] = cast(scale * row(ids[n]))``, bit-identical to ``F.embedding(ids, merged) * tensor(scale, dtype)``."""
    out = gather_rows(ids.reshape(-1), weight, reserved_weight, slot_map, weight_scaler)
    if scale != 1.0:  # multiplying by 1.0 is exact, so skipping it changes no bit
        out = out * torch.tensor(scale, dtype=out.dtype, device=out.device)
    return out.reshape(*ids.shape, weight.shape[1])


def scatter_grad(grad_out: Tensor, ids: Tensor, slot_map: Tensor, num_slots: int, scale: float,
                 deterministic: bool) -> Tensor:
    """``grad_reserved[k] = scale * sum(grad_out[n] for n with slot(ids[n]) == k)``, fp32, shape (K, D).

    ``index_put_(accumulate=True)`` is deterministic on CPU and sort-based on CUDA, so the
    reference is deterministic whatever ``deterministic`` says.
    """
    dim = grad_out.shape[-1]
    grad = grad_out.reshape(-1, dim)
    slot = slot_map.index_select(0, ids.reshape(-1)).long()
    if grad.device.type == "cpu":
        # No sync on the CPU: read and convert only the reserved tokens' gradient rows.
        hit = (slot >= 0).nonzero().squeeze(-1)
        grad, slot = grad.index_select(0, hit), slot.index_select(0, hit)
    grad = grad.float()
    # On CUDA, tokens of non-reserved ids go to a spare row K that is dropped: no data-dependent shapes.
    slot = torch.where(slot >= 0, slot, num_slots)
    out = torch.zeros(num_slots + 1, dim, dtype=torch.float32, device=grad.device)
    out.index_put_((slot,), grad, accumulate=True)
    out = out[:num_slots]
    if scale != 1.0:
        out = out * scale
    return out


def segment_mean(weight: Tensor, reserved_weight: Tensor, slot_map: Tensor, weight_scaler: Tensor | None,
                 offsets: Tensor, src_ids: Tensor) -> Tensor:
    """``out[k] = mean(row(src_ids[offsets[k]:offsets[k+1]]))`` in fp32, shape (K, D); segments are non-empty."""
    num_segments = offsets.shape[0] - 1
    rows = gather_rows(src_ids, weight, reserved_weight, slot_map, weight_scaler).float()
    counts = offsets.diff()
    segment = torch.repeat_interleave(torch.arange(num_segments, device=offsets.device), counts,
                                      output_size=src_ids.shape[0])
    out = torch.zeros(num_segments, weight.shape[1], dtype=torch.float32, device=weight.device)
    out.index_add_(0, segment, rows)
    return out / counts.clamp_min(1).unsqueeze(-1).float()
