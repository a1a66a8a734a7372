"""CUDA-extension backend: the ``reserved_kernels::cuda_*`` ops compiled from ``csrc/``."""

from __future__ import annotations

import torch

from reserved_kernels._segments import SegmentedBackend


class CudaBackend(SegmentedBackend):
    def gather(self, ids, weight, reserved_weight, slot_map, weight_scaler, scale):
        return torch.ops.reserved_kernels.cuda_gather(ids, weight, reserved_weight, slot_map, weight_scaler, scale)

    def scatter_atomic(self, grad, ids, slot_map, num_slots, scale):
        return torch.ops.reserved_kernels.cuda_scatter_atomic(grad, ids, slot_map, num_slots, scale)

    def piece_sum(self, src, index, bounds, table):
        reserved_weight, slot_map, weight_scaler = table if table is not None else (None, None, None)
        return torch.ops.reserved_kernels.cuda_piece_sum(src, index, bounds, reserved_weight, slot_map, weight_scaler)

    def segment_reduce(self, partial, piece_offsets, offsets, scale, mean):
        return torch.ops.reserved_kernels.cuda_segment_reduce(partial, piece_offsets, offsets, scale, mean)


_backend = CudaBackend()
gather = _backend.gather
scatter_grad = _backend.scatter_grad
segment_mean = _backend.segment_mean
