"""Triton backend: one fused kernel per op, plus their host launchers (same signatures as ``reference``)."""

from reserved_kernels.triton.launchers import gather, scatter_grad, segment_mean

__all__ = ["gather", "scatter_grad", "segment_mean"]
