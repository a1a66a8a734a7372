"""Host launchers of the Triton kernels: the ops' signatures, grids sized from shapes alone (no host sync).

float64 tables go to the reference (the kernels accumulate in fp32). Arguments arrive checked
(``reserved_kernels.ops``); these functions only allocate outputs and launch.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch import Tensor

from reserved_kernels import reference
from reserved_kernels._table import table_dtype
from reserved_kernels.ops import fused_loss
from reserved_kernels.reference import cross_entropy as _ce
from reserved_kernels.triton.kernels import (
    count_kernel,
    gather_kernel,
    lse_tile_kernel,
    place_kernel,
    segment_mean_kernel,
    sum_kernel,
)

_TRITON_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
# The backward's grids, as in csrc/cuda.cu: tiles of whole rounds for the plan, chunks of the sorted order.
_MAX_TILES, _MIN_TILE_TOKENS, _ROUND = 32, 2048, 64
_MIN_CHUNK, _MAX_CHUNKS, _ZERO_SLOTS = 128, 1024, 8
_PLAN_BLOCK = 256
_DEBUG_OFF = dict(sanitize_overflow=False)  # device asserts only, no integer-overflow instrumentation


def _config(dim: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_D, num_warps): tiles of at most 4096 elements, whole rows when D <= 1024."""
    block_d = min(triton.next_power_of_2(dim), 1024)
    block_n = max(1, min(16, 4096 // block_d))
    num_warps = 4 if block_n * block_d <= 2048 else 8
    return block_n, block_d, num_warps


def _device_guard(t: Tensor):
    """Launch on the tensor's GPU (CPU tensors run through the interpreter and need no guard)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def gather(ids, weight, reserved_weight, slot_map, weight_scaler, scale):
    dtype = table_dtype(weight, weight_scaler)
    if dtype not in _TRITON_DTYPES:
        return reference.gather(ids, weight, reserved_weight, slot_map, weight_scaler, scale)
    ids = ids.contiguous()
    num_tokens, (vocab, dim) = ids.numel(), weight.shape
    out = torch.empty((num_tokens, dim), dtype=dtype, device=weight.device)
    if num_tokens and dim:
        block_n, block_d, num_warps = _config(dim)
        grid = (triton.cdiv(num_tokens, block_n), triton.cdiv(dim, block_d))
        scale = reference.rounded_scale(scale, dtype)
        reserved = reserved_weight if reserved_weight.shape[0] else slot_map  # never read when K = 0
        with _device_guard(weight):
            gather_kernel[grid](ids, weight, reserved, slot_map,
                                 weight_scaler if weight_scaler is not None else slot_map, out, num_tokens, vocab,
                                 reserved_weight.shape[0], dim, scale, T=_TRITON_DTYPES[dtype],
                                 HAS_SCALER=weight_scaler is not None, APPLY_SCALE=scale != 1.0, BLOCK_N=block_n,
                                 BLOCK_D=block_d, num_warps=num_warps, **_DEBUG_OFF)
    return out.view(*ids.shape, dim)


def scatter_grad(grad_out, ids, slot_map, num_slots, scale, out_dtype):
    if grad_out.dtype not in _TRITON_DTYPES or out_dtype not in _TRITON_DTYPES:
        return reference.scatter_grad(grad_out, ids, slot_map, num_slots, scale, out_dtype)
    dim, num_tokens = grad_out.shape[-1], ids.numel()
    out = torch.empty((num_slots, dim), dtype=out_dtype, device=grad_out.device)
    if num_slots == 0 or dim == 0:
        return out
    if num_tokens == 0:
        return out.zero_()
    grad = grad_out.contiguous().view(num_tokens, dim)
    ids = ids.contiguous().view(-1)
    num_tiles = min(_MAX_TILES, triton.cdiv(num_tokens, _MIN_TILE_TOKENS))
    tile_tokens = triton.cdiv(triton.cdiv(num_tokens, num_tiles), _ROUND) * _ROUND
    num_tiles = triton.cdiv(num_tokens, tile_tokens)
    chunk = max(_MIN_CHUNK, triton.cdiv(num_tokens, _MAX_CHUNKS))
    num_chunks = triton.cdiv(num_tokens, chunk)
    _, block_d, num_warps = _config(dim)
    col_blocks = triton.cdiv(dim, block_d)
    num_arrivals = num_slots * col_blocks
    # One int32 workspace: counts and bases (tiles x K), offsets (K + 1), arrival counters, the sorted order.
    work = torch.empty(2 * num_tiles * num_slots + num_slots + 1 + num_arrivals + 2 * num_tokens, dtype=torch.int32,
                       device=grad.device)
    counts, bases, offsets, arrivals, sorted_token, sorted_slot = work.split(
        [num_tiles * num_slots, num_tiles * num_slots, num_slots + 1, num_arrivals, num_tokens, num_tokens])
    pieces = torch.empty((num_chunks * 2, dim), dtype=torch.float32, device=grad.device)
    vocab = slot_map.shape[0]
    with _device_guard(grad):
        count_kernel[(num_tiles,)](ids, slot_map, counts, num_tokens, vocab, num_slots, tile_tokens,
                                    BLOCK=_PLAN_BLOCK, BLOCK_K=_PLAN_BLOCK)
        place_kernel[(num_tiles,)](ids, slot_map, counts, bases, offsets, arrivals, num_arrivals, sorted_token,
                                    sorted_slot, num_tokens, vocab, num_slots, tile_tokens, num_tiles,
                                    BLOCK_K=_PLAN_BLOCK, ROUND=_ROUND)
        grid = (num_chunks + triton.cdiv(num_slots, _ZERO_SLOTS), col_blocks)
        sum_kernel[grid](grad, sorted_token, sorted_slot, offsets, arrivals, pieces, out, num_slots, dim, chunk,
                          num_chunks, scale, ZERO_SLOTS=_ZERO_SLOTS, BLOCK_Q=16, BLOCK_D=block_d, num_warps=num_warps)
    return out


def segment_mean(weight, reserved_weight, slot_map, weight_scaler, offsets, src_ids):
    dtype = table_dtype(weight, weight_scaler)
    if dtype not in _TRITON_DTYPES:
        return reference.segment_mean(weight, reserved_weight, slot_map, weight_scaler, offsets, src_ids)
    num_segments, dim = offsets.shape[0] - 1, weight.shape[1]
    out = torch.empty((num_segments, dim), dtype=torch.float32, device=weight.device)
    if num_segments == 0 or dim == 0:
        return out
    _, block_d, num_warps = _config(dim)
    reserved = reserved_weight if reserved_weight.shape[0] else slot_map
    with _device_guard(weight):
        segment_mean_kernel[(num_segments, triton.cdiv(dim, block_d))](
            weight, reserved, slot_map, weight_scaler if weight_scaler is not None else slot_map, offsets,
            src_ids.contiguous(), out, src_ids.shape[0], weight.shape[0], reserved_weight.shape[0], dim,
            T=_TRITON_DTYPES[dtype], HAS_SCALER=weight_scaler is not None, BLOCK_N=16, BLOCK_D=block_d,
            num_warps=num_warps, **_DEBUG_OFF)
    return out


def lse_tile(z, masked, target_col, softcap, m, s, a, zt, p_out, scratch=None):
    """``reference.cross_entropy.lse_tile`` as one kernel launch (one program per tile row); float64 tiles go
    to the reference. No scratch buffer: the kernel recomputes what it needs from the tile."""
    if z.dtype != torch.float32:
        return _ce.lse_tile(z, masked, target_col, softcap, m, s, a, zt, p_out, scratch)
    rows, cols = z.shape
    alpha = torch.empty_like(m)
    if rows == 0:
        return alpha
    block = min(triton.next_power_of_2(max(cols, 1)), 2048)
    p = p_out if p_out is not None else z
    with _device_guard(z):
        lse_tile_kernel[(rows,)](z, p, masked if masked is not None else target_col, target_col, m, s,
                                  a if a is not None else s, zt, alpha, cols, z.stride(0), p.stride(0),
                                  float(softcap) if softcap is not None else 1.0, MASKED=_ce.masked_value(z.dtype),
                                  HAS_CAP=softcap is not None, HAS_MASK=masked is not None, WANT_P=p_out is not None,
                                  WANT_A=a is not None, BLOCK=block, num_warps=4 if block <= 1024 else 8)
    return alpha


def linear_cross_entropy(hidden, weight, reserved_weight, slot_map, targets, ignore_index, softcap, tile_bytes,
                         grad_hidden, grad_rows, stats):
    """The shared driver (:mod:`reserved_kernels.ops.fused_loss`) with the tile step as a Triton kernel (the GEMMs stay
    cuBLAS's)."""
    return fused_loss.tiled_cross_entropy(hidden, weight, reserved_weight, slot_map, targets, ignore_index, softcap,
                                           tile_bytes, grad_hidden, grad_rows, stats, tile_step=lse_tile,
                                           tile_step_needs_scratch=False)
