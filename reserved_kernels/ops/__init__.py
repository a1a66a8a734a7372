"""The three ``torch.library`` custom ops: schema, argument checks, backend dispatch, fake and autograd.

* ``reserved_kernels::gather`` — ``out[n] = cast(scale * row(ids[n]))`` (differentiable in
  ``reserved_weight`` and, for a floating table, ``weight``).
* ``reserved_kernels::scatter_grad`` — ``grad_reserved[k] = scale * Σ grad_out[n]`` over tokens
  whose id has slot ``k``; fp32 (K, D).
* ``reserved_kernels::segment_mean`` — ``out[k] = mean(row(src_ids[offsets[k]:offsets[k+1]]))``; fp32 (K, D).

``row(i)`` is ``reserved_weight[slot_map[i]]`` when ``slot_map[i] >= 0``, else ``weight[i]``
(times ``weight_scaler[i]`` for an int8 table). Arguments are checked here, once, for every backend.
"""

from __future__ import annotations

import os
from types import ModuleType

import torch
from torch import Tensor

from reserved_kernels import _backend
from reserved_kernels import reference as _reference

CHECK_ENV_VAR = "RESERVED_KERNELS_CHECK_IDS"
_INDEX_DTYPES = (torch.int32, torch.int64)
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _implementation(op: str, device: torch.device, dtype: torch.dtype) -> ModuleType:
    backend = _backend.select(op, device, dtype)
    if backend == "triton":
        from reserved_kernels import triton as triton_backend

        return triton_backend
    if backend == "cuda":
        from reserved_kernels.ops import _cuda

        return _cuda
    return _reference


def _check_values_now(t: Tensor) -> bool:
    """Value checks (id ranges) read device memory, which synchronises a CUDA stream.

    They are skipped while a CUDA graph is being captured (a sync is illegal there) and when
    ``RESERVED_KERNELS_CHECK_IDS=0``. The kernels never read out of bounds either way: an id
    outside [0, V) yields a zero row and no gradient.
    """
    if os.environ.get(CHECK_ENV_VAR, "1") == "0":
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def _check_index_dtype(ids: Tensor, name: str = "ids") -> None:
    if not isinstance(ids, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dtype not in _INDEX_DTYPES:
        raise TypeError(f"{name} must be an int32 or int64 tensor, got {ids.dtype}")


def check_ids(ids: Tensor, num_embeddings: int, name: str = "ids") -> None:
    """Raise a clear error unless ``ids`` is an int32/int64 tensor with values in [0, num_embeddings)."""
    _check_index_dtype(ids, name)
    if ids.numel() and _check_values_now(ids):
        lo, hi = (int(v) for v in torch.aminmax(ids))
        if lo < 0 or hi >= num_embeddings:
            raise IndexError(f"{name} must lie in [0, {num_embeddings}), got values from {lo} to {hi}")


def _check_same_device(**tensors: Tensor | None) -> None:
    present = {k: t for k, t in tensors.items() if t is not None}
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        listing = ", ".join(f"{k} on {t.device}" for k, t in present.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def _check_table(weight: Tensor, reserved_weight: Tensor, slot_map: Tensor, weight_scaler: Tensor | None) -> None:
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (V, D), got shape {tuple(weight.shape)}")
    if reserved_weight.dim() != 2 or reserved_weight.shape[1] != weight.shape[1]:
        raise ValueError(f"reserved_weight must be (K, {weight.shape[1]}), got shape {tuple(reserved_weight.shape)}")
    if reserved_weight.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"reserved_weight must be floating point, got {reserved_weight.dtype}")
    if weight_scaler is None:
        if weight.dtype != reserved_weight.dtype:
            raise TypeError(f"weight ({weight.dtype}) and reserved_weight ({reserved_weight.dtype}) must share a dtype")
    else:
        if weight.dtype != torch.int8:
            raise TypeError(f"weight_scaler is for an int8 table, but weight is {weight.dtype}")
        if weight_scaler.shape != (weight.shape[0],) or weight_scaler.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"weight_scaler must be a floating ({weight.shape[0]},) vector, "
                             f"got {weight_scaler.dtype} {tuple(weight_scaler.shape)}")
    if slot_map.dtype != torch.int32 or slot_map.shape != (weight.shape[0],):
        raise ValueError(f"slot_map must be an int32 ({weight.shape[0]},) vector, got {slot_map.dtype} {tuple(slot_map.shape)}")
    for name, t in (("weight", weight), ("reserved_weight", reserved_weight), ("slot_map", slot_map),
                    ("weight_scaler", weight_scaler)):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    _check_same_device(weight=weight, reserved_weight=reserved_weight, slot_map=slot_map, weight_scaler=weight_scaler)


# --------------------------------------------------------------------------------------------- gather

@torch.library.custom_op("reserved_kernels::gather", mutates_args=())
def gather(ids: Tensor, weight: Tensor, reserved_weight: Tensor, slot_map: Tensor, weight_scaler: Tensor | None,
           scale: float, padding_idx: int, deterministic: bool) -> Tensor:
    """Fused embedding lookup over a frozen table and K trainable rows.

    ``padding_idx`` (-1 for none) and ``deterministic`` only shape the backward pass.
    """
    _check_gather_meta(ids, weight, reserved_weight, slot_map, weight_scaler)
    check_ids(ids, weight.shape[0])
    impl = _implementation("gather", ids.device, reserved_weight.dtype)
    return impl.gather(ids.contiguous(), weight, reserved_weight, slot_map, weight_scaler, scale)


def _check_gather_meta(ids, weight, reserved_weight, slot_map, weight_scaler) -> None:
    _check_table(weight, reserved_weight, slot_map, weight_scaler)
    _check_same_device(ids=ids, weight=weight)
    _check_index_dtype(ids)


@gather.register_fake
def _gather_fake(ids, weight, reserved_weight, slot_map, weight_scaler, scale, padding_idx, deterministic):
    _check_gather_meta(ids, weight, reserved_weight, slot_map, weight_scaler)
    return ids.new_empty((*ids.shape, weight.shape[1]), dtype=reserved_weight.dtype)


def _gather_setup_context(ctx, inputs, output):
    ids, weight, reserved_weight, slot_map, weight_scaler, scale, padding_idx, deterministic = inputs
    ctx.save_for_backward(ids, slot_map)
    ctx.num_embeddings = weight.shape[0]
    ctx.num_slots = reserved_weight.shape[0]
    ctx.dtype = reserved_weight.dtype
    ctx.scale = scale
    ctx.padding_idx = padding_idx
    ctx.deterministic = deterministic


def _gather_backward(ctx, grad):
    ids, slot_map = ctx.saved_tensors
    grad = grad.contiguous()
    scale = _reference.rounded_scale(ctx.scale, ctx.dtype)
    grad_weight = grad_reserved = None
    if ctx.needs_input_grad[2]:
        grad_reserved = scatter_grad(grad, ids, slot_map, ctx.num_slots, scale, ctx.deterministic).to(ctx.dtype)
    if ctx.needs_input_grad[1]:
        # Only when a user unfroze ``weight``: nn.Embedding's dense gradient, minus the reserved rows.
        scaled = grad if ctx.scale == 1.0 else grad * torch.tensor(ctx.scale, dtype=grad.dtype, device=grad.device)
        grad_weight = torch.ops.aten.embedding_dense_backward(scaled, ids, ctx.num_embeddings, ctx.padding_idx, False)
        grad_weight = grad_weight.masked_fill((slot_map >= 0).unsqueeze(-1), 0)
    return None, grad_weight, grad_reserved, None, None, None, None, None


gather.register_autograd(_gather_backward, setup_context=_gather_setup_context)


# --------------------------------------------------------------------------------------- scatter_grad

@torch.library.custom_op("reserved_kernels::scatter_grad", mutates_args=())
def scatter_grad(grad_out: Tensor, ids: Tensor, slot_map: Tensor, num_slots: int, scale: float,
                 deterministic: bool) -> Tensor:
    """Row-masked gradient scatter into a compact fp32 (num_slots, D) tensor; never a V×D one.

    ``scale`` multiplies the fp32 sums as given (the gather's backward passes the rounded scale).
    ``deterministic=True`` is bitwise repeatable run to run.
    """
    _check_scatter_meta(grad_out, ids, slot_map, num_slots)
    check_ids(ids, slot_map.shape[0])
    impl = _implementation("scatter_grad", grad_out.device, grad_out.dtype)
    return impl.scatter_grad(grad_out.contiguous(), ids.contiguous(), slot_map, num_slots, scale, deterministic)


def _check_scatter_meta(grad_out, ids, slot_map, num_slots) -> None:
    if grad_out.shape[:-1] != ids.shape:
        raise ValueError(f"grad_out must have shape ids.shape + (D,) = {tuple(ids.shape)} + (D,), "
                         f"got {tuple(grad_out.shape)}")
    if grad_out.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"grad_out must be floating point, got {grad_out.dtype}")
    if slot_map.dtype != torch.int32 or slot_map.dim() != 1:
        raise ValueError(f"slot_map must be an int32 vector, got {slot_map.dtype} of shape {tuple(slot_map.shape)}")
    if num_slots < 0:
        raise ValueError(f"num_slots must be >= 0, got {num_slots}")
    _check_same_device(grad_out=grad_out, ids=ids, slot_map=slot_map)


@scatter_grad.register_fake
def _scatter_grad_fake(grad_out, ids, slot_map, num_slots, scale, deterministic):
    _check_scatter_meta(grad_out, ids, slot_map, num_slots)
    return grad_out.new_empty((num_slots, grad_out.shape[-1]), dtype=torch.float32)


# --------------------------------------------------------------------------------------- segment_mean

def check_offsets(offsets: Tensor, num_ids: int) -> None:
    """CSR offset values: starting at 0, ending at ``num_ids``, every segment non-empty."""
    if not _check_values_now(offsets):
        return
    values = offsets.tolist()
    if values[0] != 0 or values[-1] != num_ids:
        raise ValueError(f"offsets must start at 0 and end at len(src_ids)={num_ids}, got {values[0]} … {values[-1]}")
    empty = [k for k in range(len(values) - 1) if values[k + 1] <= values[k]]
    if empty:
        raise ValueError(f"every destination needs at least one source id; destinations {empty[:10]} have none")


@torch.library.custom_op("reserved_kernels::segment_mean", mutates_args=())
def segment_mean(weight: Tensor, reserved_weight: Tensor, slot_map: Tensor, weight_scaler: Tensor | None,
                 offsets: Tensor, src_ids: Tensor) -> Tensor:
    """Batched mean of table rows over CSR segments, accumulated in fp32; returns fp32 (K, D).

    All rows are read from the inputs as they are; nothing is written to them, so the caller
    can write the means back in any order (a destination that is also a source sees the old row).
    """
    _check_mean_meta(weight, reserved_weight, slot_map, weight_scaler, offsets, src_ids)
    check_ids(src_ids, weight.shape[0], name="src_ids")
    check_offsets(offsets, src_ids.shape[0])
    impl = _implementation("segment_mean", weight.device, reserved_weight.dtype)
    return impl.segment_mean(weight, reserved_weight, slot_map, weight_scaler, offsets, src_ids)


def _check_mean_meta(weight, reserved_weight, slot_map, weight_scaler, offsets, src_ids) -> None:
    _check_table(weight, reserved_weight, slot_map, weight_scaler)
    _check_same_device(weight=weight, offsets=offsets, src_ids=src_ids)
    _check_index_dtype(src_ids, "src_ids")
    if src_ids.dim() != 1:
        raise ValueError(f"src_ids must be 1-D, got shape {tuple(src_ids.shape)}")
    if offsets.dtype != torch.int64 or offsets.dim() != 1 or offsets.shape[0] < 1:
        raise ValueError(f"offsets must be a non-empty int64 vector, got {offsets.dtype} of shape {tuple(offsets.shape)}")


@segment_mean.register_fake
def _segment_mean_fake(weight, reserved_weight, slot_map, weight_scaler, offsets, src_ids):
    _check_mean_meta(weight, reserved_weight, slot_map, weight_scaler, offsets, src_ids)
    return weight.new_empty((offsets.shape[0] - 1, weight.shape[1]), dtype=torch.float32)
