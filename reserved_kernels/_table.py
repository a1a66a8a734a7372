"""What every layer needs to know about a table: its dtypes, int8 dequantisation, and Gemma 2's soft-cap.

One definition each, used by the ops, the reference, the Triton launchers, the modules and the model
integrations, so that every path rounds the same way. Imports torch alone.
"""

from __future__ import annotations

import torch
from torch import Tensor

SIXTEEN_BIT = (torch.float16, torch.bfloat16)


def table_dtype(weight: Tensor, weight_scaler: Tensor | None = None) -> torch.dtype:
    """The dtype of the rows a table gives: its own, or its per-row scales' for an int8 table."""
    return weight_scaler.dtype if weight_scaler is not None else weight.dtype


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums and statistics accumulate in: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def dequantised(weight: Tensor, weight_scaler: Tensor) -> Tensor:
    """gemma_pytorch's int8 rows as floats: ``weight * weight_scaler`` per row (int8 converts exactly)."""
    return weight.to(weight_scaler.dtype) * weight_scaler.unsqueeze(-1)


def softcapped(logits: Tensor, cap: float) -> Tensor:
    """Gemma 2's final soft-cap ``cap·tanh(logits / cap)``, as its models compute it."""
    return torch.tanh(logits / cap) * cap


def softcap_(logits: Tensor, cap: float) -> Tensor:
    """:func:`softcapped` in place (the same three roundings)."""
    return logits.div_(cap).tanh_().mul_(cap)


def cap_slope(capped: Tensor, cap: float) -> Tensor:
    """``d cap(x) / dx`` at ``capped = cap(x)``: ``1 − (capped / cap)²``, clamped to [0, 1]."""
    return 1 - (capped / cap).clamp(-1, 1).square()
