"""The ops' argument checks, with the same messages as csrc/common.h: shapes and dtypes only, never device
memory; and the opt-in synchronous id check for debugging."""

from __future__ import annotations

import os

import torch
from torch import Tensor

from reserved_kernels._table import table_dtype

STRICT_ENV_VAR = "RESERVED_KERNELS_STRICT_IDS"
_INDEX_DTYPES = (torch.int32, torch.int64)
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

def _check_same_device(**tensors: Tensor | None) -> None:
    present = {k: t for k, t in tensors.items() if t is not None}
    if len({t.device for t in present.values()}) > 1:
        listing = ", ".join(f"{k} on {t.device}" for k, t in present.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def _check_index_dtype(ids: Tensor, name: str) -> None:
    if not isinstance(ids, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dtype not in _INDEX_DTYPES:
        raise TypeError(f"{name} must be an int32 or int64 tensor, got {ids.dtype}")


def check_table(weight: Tensor, reserved_weight: Tensor, slot_map: Tensor, weight_scaler: Tensor | None) -> None:
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (V, D), got shape {tuple(weight.shape)}")
    if reserved_weight.dim() != 2 or reserved_weight.shape[1] != weight.shape[1]:
        raise ValueError(f"reserved_weight must be (K, {weight.shape[1]}), got shape {tuple(reserved_weight.shape)}")
    if reserved_weight.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"reserved_weight must be floating point, got {reserved_weight.dtype}")
    if weight_scaler is not None:
        if weight.dtype != torch.int8:
            raise TypeError(f"weight_scaler is for an int8 table, but weight is {weight.dtype}")
        if weight_scaler.shape != (weight.shape[0],) or weight_scaler.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"weight_scaler must be a floating ({weight.shape[0]},) vector, "
                             f"got {weight_scaler.dtype} {tuple(weight_scaler.shape)}")
    elif weight.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"an integer table ({weight.dtype}) needs weight_scaler (per-row scales)")
    dtype = table_dtype(weight, weight_scaler)
    if reserved_weight.dtype not in (dtype, torch.float32):
        raise TypeError(f"reserved_weight must have the table's dtype ({dtype}) or float32, "
                        f"got {reserved_weight.dtype}")
    if slot_map.dtype != torch.int32 or slot_map.shape != (weight.shape[0],):
        raise ValueError(f"slot_map must be an int32 ({weight.shape[0]},) vector, got {slot_map.dtype} "
                         f"{tuple(slot_map.shape)}")
    for name, t in (("weight", weight), ("reserved_weight", reserved_weight), ("slot_map", slot_map),
                    ("weight_scaler", weight_scaler)):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    _check_same_device(weight=weight, reserved_weight=reserved_weight, slot_map=slot_map, weight_scaler=weight_scaler)


def check_gather(ids, weight, reserved_weight, slot_map, weight_scaler, scale=1.0) -> None:
    _check_index_dtype(ids, "ids")
    check_table(weight, reserved_weight, slot_map, weight_scaler)
    _check_same_device(ids=ids, weight=weight)


def check_scatter(grad_out, ids, slot_map, num_slots, scale, out_dtype) -> None:
    _check_index_dtype(ids, "ids")
    if grad_out.shape[:-1] != ids.shape or grad_out.dim() != ids.dim() + 1:
        raise ValueError(f"grad_out must have shape ids.shape + (D,) = {tuple(ids.shape)} + (D,), "
                         f"got {tuple(grad_out.shape)}")
    if grad_out.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"grad_out must be floating point, got {grad_out.dtype}")
    if out_dtype not in _FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be floating point, got {out_dtype}")
    if slot_map.dtype != torch.int32 or slot_map.dim() != 1:
        raise ValueError(f"slot_map must be an int32 vector, got {slot_map.dtype} of shape {tuple(slot_map.shape)}")
    if num_slots < 0:
        raise ValueError(f"num_slots must be >= 0, got {num_slots}")
    if ids.numel() >= 2**31:
        raise ValueError(f"scatter_grad supports fewer than 2**31 tokens, got {ids.numel()}")
    _check_same_device(grad_out=grad_out, ids=ids, slot_map=slot_map)


def check_segment_mean(weight, reserved_weight, slot_map, weight_scaler, offsets, src_ids) -> None:
    check_table(weight, reserved_weight, slot_map, weight_scaler)
    _check_index_dtype(src_ids, "src_ids")
    if src_ids.dim() != 1:
        raise ValueError(f"src_ids must be 1-D, got shape {tuple(src_ids.shape)}")
    if offsets.dtype != torch.int64 or offsets.dim() != 1 or offsets.shape[0] < 1:
        raise ValueError(f"offsets must be a non-empty int64 vector, got {offsets.dtype} "
                         f"of shape {tuple(offsets.shape)}")
    _check_same_device(weight=weight, offsets=offsets, src_ids=src_ids)


def check_linear_cross_entropy(hidden, weight, reserved_weight, slot_map, targets, ignore_index, softcap, tile_bytes,
                               grad_hidden, grad_rows, stats) -> None:
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be 2-D (N, D), got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"weight must be a floating (V, D) table, got {weight.dtype} of shape {tuple(weight.shape)}")
    if hidden.dtype != weight.dtype or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden ({hidden.dtype}, D={hidden.shape[1]}) must have the table's dtype and width "
                         f"({weight.dtype}, D={weight.shape[1]})")
    check_table(weight, reserved_weight, slot_map, None)
    _check_index_dtype(targets, "targets")
    if targets.shape != (hidden.shape[0],):
        raise ValueError(f"targets must have shape ({hidden.shape[0]},), one per row of hidden, "
                         f"got {tuple(targets.shape)}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0 or None, got {softcap}")
    if tile_bytes < 1:
        raise ValueError(f"tile_bytes must be >= 1, got {tile_bytes}")
    _check_same_device(hidden=hidden, weight=weight, targets=targets)


CHECKS = {"gather": check_gather, "scatter_grad": check_scatter, "segment_mean": check_segment_mean,
          "linear_cross_entropy": check_linear_cross_entropy}


_strict = {"on": os.environ.get(STRICT_ENV_VAR, "0") == "1"}


def set_strict_id_checks(enabled: bool) -> None:
    """Opt-in debug switch: check ids synchronously (IndexError on CUDA too) before every forward."""
    _strict["on"] = bool(enabled)


def strict_id_checks() -> bool:
    return _strict["on"]


def check_ids_now(ids: Tensor, num_embeddings: int, name: str = "ids") -> None:
    """Raise IndexError unless every value of ``ids`` lies in [0, num_embeddings). Synchronises a CUDA stream.

    Skipped while a CUDA graph is being captured (a synchronisation is illegal there).
    """
    _check_index_dtype(ids, name)
    if ids.numel() == 0 or (ids.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    lo, hi = (int(v) for v in torch.aminmax(ids))
    if lo < 0 or hi >= num_embeddings:
        bad = lo if lo < 0 else hi
        raise IndexError(f"{name} must lie in [0, {num_embeddings}), got {bad}")
