"""Pure-PyTorch implementations of the ops: the CPU path without the extension, and the oracle for the kernels.

Each function takes arguments that passed the op's shape and dtype checks (``reserved_kernels.ops``)
and allocates its own output. ``slot_map`` is an int32 vector of length V: ``slot_map[i]`` is the row of
``reserved_weight`` that replaces ``weight[i]``, or -1 when id ``i`` is not reserved. Id values are
checked without a host-device synchronisation: on CPU tensors directly (IndexError naming the value),
on CUDA tensors with an asynchronous device-side assertion.
"""

from __future__ import annotations

import functools
import struct

import torch
from torch import Tensor

from reserved_kernels._table import acc_dtype, dequantised, table_dtype
from reserved_kernels.ops import fused_loss
from reserved_kernels.reference import cross_entropy


@functools.lru_cache(maxsize=256)
def rounded_scale(scale: float, dtype: torch.dtype) -> float:
    """``scale`` rounded to ``dtype`` as ``torch.tensor(scale, dtype=dtype)`` rounds it (through float32,
    to nearest even), as Gemma's models round their normaliser. Host arithmetic only: no tensor is made."""
    if dtype == torch.float64:
        return float(scale)
    single = struct.unpack("f", struct.pack("f", scale))[0]
    if dtype == torch.float16:
        return struct.unpack("e", struct.pack("e", single))[0]
    if dtype == torch.bfloat16:
        bits = struct.unpack("I", struct.pack("f", single))[0]
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000  # round the low 16 bits to nearest even
        return struct.unpack("f", struct.pack("I", bits))[0]
    return single


def check_id_values(ids: Tensor, slot_map: Tensor, num_slots: int, name: str = "ids") -> None:
    """Every id in [0, V) and every slot it maps to in [-1, K): IndexError / ValueError on CPU, a device assert on
    CUDA."""
    vocab = slot_map.shape[0]
    if ids.numel() == 0:
        return
    if ids.device.type != "cpu":
        valid = ((ids >= 0) & (ids < vocab)).all()
        torch._assert_async(valid, f"{name} must lie in [0, {vocab})")
        slots = slot_map.index_select(0, ids.reshape(-1).clamp(0, vocab - 1).long())
        torch._assert_async((slots < num_slots).all(), "slot_map entries must be -1 or a row of reserved_weight")
        return
    bad = ids[(ids < 0) | (ids >= vocab)]
    if bad.numel():
        raise IndexError(f"{name} must lie in [0, {vocab}), got {int(bad[0])}")
    slots = slot_map.index_select(0, ids.reshape(-1).long())
    if bool((slots >= num_slots).any()):
        raise ValueError(f"slot_map entries must be -1 or a row of reserved_weight (K={num_slots})")


def gather_rows(ids: Tensor, weight: Tensor, reserved_weight: Tensor, slot_map: Tensor,
                weight_scaler: Tensor | None) -> Tensor:
    """``row(ids[n])`` for flat ``ids``: the reserved row (rounded to the table dtype) or the (dequantised) base row."""
    dtype = table_dtype(weight, weight_scaler)
    rows = weight.index_select(0, ids)
    if weight_scaler is not None:
        rows = dequantised(rows, weight_scaler.index_select(0, ids))
    if reserved_weight.shape[0] == 0:
        return rows
    slot = slot_map.index_select(0, ids)
    if rows.device.type == "cpu":
        # On the CPU a data-dependent shape costs no sync: overwrite only the reserved tokens' rows.
        hit = (slot >= 0).nonzero().squeeze(-1)
        return rows.index_copy_(0, hit, reserved_weight.index_select(0, slot.index_select(0, hit)).to(dtype))
    reserved_rows = reserved_weight.index_select(0, slot.clamp_min(0)).to(dtype)
    return torch.where((slot >= 0).unsqueeze(-1), reserved_rows, rows)


def gather(ids: Tensor, weight: Tensor, reserved_weight: Tensor, slot_map: Tensor,
           weight_scaler: Tensor | None, scale: float) -> Tensor:
    """``out[n] = cast(scale * row(ids[n]))``, bit-identical to ``F.embedding(ids, merged) * tensor(scale, dtype)``."""
    check_id_values(ids, slot_map, reserved_weight.shape[0])
    return scaled_rows(ids, weight, reserved_weight, slot_map, weight_scaler,
                       rounded_scale(scale, table_dtype(weight, weight_scaler)))


def scaled_rows(ids: Tensor, weight: Tensor, reserved_weight: Tensor, slot_map: Tensor,
                weight_scaler: Tensor | None, scale: float) -> Tensor:
    """:func:`gather`'s arithmetic for a ``scale`` already rounded to the table dtype, without the id checks."""
    out = gather_rows(ids.reshape(-1), weight, reserved_weight, slot_map, weight_scaler)
    if scale != 1.0:  # multiplying by 1.0 is exact, so skipping it changes no bit
        # A Python scalar is multiplied in the op's compute type: the rounded value gives the same bits as
        # ``* torch.tensor(scale, dtype)``, without a host-to-device copy.
        out = out * scale
    return out.reshape(*ids.shape, weight.shape[1])


def scatter_grad(grad_out: Tensor, ids: Tensor, slot_map: Tensor, num_slots: int, scale: float,
                 out_dtype: torch.dtype) -> Tensor:
    """``grad[k] = scale * Σ grad_out[n]`` over tokens whose id has slot ``k``, shape (K, D), ``out_dtype``.

    Sums run in float32 (float64 for float64 gradients). ``index_add_`` adds the hits in token order on
    CPU and ``index_put_(accumulate=True)`` is sort-based on CUDA, so both are repeatable. Ids outside
    [0, V) and slots outside [0, K) are simply not hits: the backward does not re-validate.
    """
    dim = grad_out.shape[-1]
    acc = acc_dtype(grad_out.dtype)
    grad = grad_out.reshape(-1, dim)
    flat = ids.reshape(-1).long()
    vocab = slot_map.shape[0]
    valid = (flat >= 0) & (flat < vocab)
    slot = slot_map.index_select(0, flat.clamp(0, max(vocab - 1, 0))).long() if vocab else flat
    slot = torch.where(valid & (slot >= 0) & (slot < num_slots), slot, num_slots)
    if grad.device.type == "cpu":
        # No sync on the CPU: read and convert only the reserved tokens' gradient rows.
        hit = (slot < num_slots).nonzero().squeeze(-1)
        grad, slot = grad.index_select(0, hit), slot.index_select(0, hit)
    # Tokens of non-reserved ids go to a spare row K that is dropped: no data-dependent shapes on CUDA.
    out = torch.zeros(num_slots + 1, dim, dtype=acc, device=grad.device)
    if grad.device.type == "cpu":
        out.index_add_(0, slot, grad.to(acc))
    else:
        out.index_put_((slot,), grad.to(acc), accumulate=True)
    out = out[:num_slots]
    if scale != 1.0:
        out = out * scale
    return out.to(out_dtype)


def segment_mean(weight: Tensor, reserved_weight: Tensor, slot_map: Tensor, weight_scaler: Tensor | None,
                 offsets: Tensor, src_ids: Tensor) -> Tensor:
    """``out[k] = mean(row(src_ids[offsets[k]:offsets[k+1]]))`` in float32 (float64 for a float64 table), (K, D)."""
    num_segments = offsets.shape[0] - 1
    counts = offsets.diff()
    if offsets.device.type == "cpu":
        if int(offsets[0]) != 0 or int(offsets[-1]) != src_ids.shape[0]:
            raise ValueError(f"offsets must start at 0 and end at len(src_ids)={src_ids.shape[0]}, "
                             f"got {int(offsets[0])} … {int(offsets[-1])}")
        empty = (counts <= 0).nonzero().squeeze(-1)[:10].tolist()
        if empty:
            raise ValueError(f"every destination needs at least one source id; destinations {empty} have none")
    else:
        torch._assert_async((counts > 0).all() & (offsets[0] == 0), "every destination needs at least one source id")
    check_id_values(src_ids, slot_map, reserved_weight.shape[0], name="src_ids")
    acc = acc_dtype(table_dtype(weight, weight_scaler))
    rows = gather_rows(src_ids.long(), weight, reserved_weight, slot_map, weight_scaler).to(acc)
    segment = torch.repeat_interleave(torch.arange(num_segments, device=offsets.device), counts.clamp_min(0),
                                      output_size=src_ids.shape[0])
    out = torch.zeros(num_segments, weight.shape[1], dtype=acc, device=weight.device)
    out.index_add_(0, segment, rows)
    return out / counts.clamp_min(1).unsqueeze(-1).to(acc)


# The fused loss: the driver every backend shares, with the PyTorch tile step.
linear_cross_entropy = functools.partial(fused_loss.tiled_cross_entropy, tile_step=cross_entropy.lse_tile)
