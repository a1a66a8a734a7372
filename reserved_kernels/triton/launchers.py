"""Host launchers for the Triton kernels; same signatures and results as ``reserved_kernels.reference``."""

from __future__ import annotations

import contextlib

import torch
import triton
from torch import Tensor

from reserved_kernels._segments import SegmentedBackend
from reserved_kernels.triton.kernels import (
    _gather_kernel,
    _piece_sum_kernel,
    _scatter_atomic_kernel,
    _segment_reduce_kernel,
)

_PIECE_BLOCK_N = 16


def _config(dim: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_D, num_warps): tiles of at most 4096 elements, whole rows when D <= 1024."""
    block_d = min(triton.next_power_of_2(dim), 1024)
    block_n = max(1, min(16, 4096 // block_d))
    num_warps = 4 if block_n * block_d <= 2048 else 8
    return block_n, block_d, num_warps


def _device_guard(t: Tensor):
    """Launch on the tensor's GPU (CPU tensors run through the interpreter and need no guard)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _nonempty(reserved_weight: Tensor) -> Tensor:
    """Kernels index ``reserved_weight`` only under a mask, but still need a real pointer of its dtype."""
    return reserved_weight if reserved_weight.shape[0] else reserved_weight.new_zeros(1, reserved_weight.shape[1])


class TritonBackend(SegmentedBackend):
    def gather(self, ids, weight, reserved_weight, slot_map, weight_scaler, scale):
        num_tokens, (vocab, dim) = ids.numel(), weight.shape
        out = torch.empty((num_tokens, dim), dtype=reserved_weight.dtype, device=weight.device)
        if num_tokens and dim:
            block_n, block_d, num_warps = _config(dim)
            grid = (triton.cdiv(num_tokens, block_n), triton.cdiv(dim, block_d))
            scale = float(torch.tensor(scale, dtype=reserved_weight.dtype))
            with _device_guard(weight):
                _gather_kernel[grid](ids, weight, _nonempty(reserved_weight), slot_map,
                                     weight_scaler if weight_scaler is not None else slot_map, out,
                                     num_tokens, vocab, dim, scale, HAS_SCALER=weight_scaler is not None,
                                     APPLY_SCALE=scale != 1.0, BLOCK_N=block_n, BLOCK_D=block_d,
                                     num_warps=num_warps)
        return out.view(*ids.shape, dim)

    def scatter_atomic(self, grad, ids, slot_map, num_slots, scale):
        (num_tokens, dim) = grad.shape
        out = torch.zeros((num_slots, dim), dtype=torch.float32, device=grad.device)
        block_n, block_d, num_warps = _config(dim)
        grid = (triton.cdiv(num_tokens, block_n), triton.cdiv(dim, block_d))
        with _device_guard(grad):
            _scatter_atomic_kernel[grid](grad, ids, slot_map, out, num_tokens, slot_map.shape[0], dim, scale,
                                         BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps)
        return out

    def piece_sum(self, src, index, bounds, table):
        num_pieces, dim = bounds.shape[0] - 1, src.shape[1]
        partial = torch.empty((num_pieces, dim), dtype=torch.float32, device=src.device)
        _, block_d, num_warps = _config(dim)
        reserved_weight, slot_map, weight_scaler = table if table is not None else (None, None, None)
        with _device_guard(src):
            _piece_sum_kernel[(num_pieces, triton.cdiv(dim, block_d))](
                src, index, bounds, partial, _nonempty(reserved_weight) if table is not None else src,
                slot_map if table is not None else index, weight_scaler if weight_scaler is not None else index,
                src.shape[0], dim, FROM_TABLE=table is not None, HAS_SCALER=weight_scaler is not None,
                BLOCK_N=_PIECE_BLOCK_N, BLOCK_D=block_d, num_warps=num_warps)
        return partial

    def segment_reduce(self, partial, piece_offsets, offsets, scale, mean):
        num_segments, dim = offsets.shape[0] - 1, partial.shape[1]
        out = torch.empty((num_segments, dim), dtype=torch.float32, device=partial.device)
        _, block_d, num_warps = _config(dim)
        with _device_guard(partial):
            _segment_reduce_kernel[(num_segments, triton.cdiv(dim, block_d))](
                partial, piece_offsets, offsets, out, dim, scale, MEAN=mean, BLOCK_D=block_d, num_warps=num_warps)
        return out


_backend = TritonBackend()
gather = _backend.gather
scatter_grad = _backend.scatter_grad
segment_mean = _backend.segment_mean
