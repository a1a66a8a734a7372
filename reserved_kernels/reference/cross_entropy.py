"""The fused loss's per-tile step in PyTorch: the CPU path, and the oracle of its Triton twin.

The driver that tiles the vocabulary and runs the GEMMs around this step is
:mod:`reserved_kernels.ops.fused_loss`, shared by every backend.
"""

from __future__ import annotations

import torch
from torch import Tensor

from reserved_kernels._table import softcap_


def masked_value(dtype: torch.dtype) -> float:
    """What a masked (reserved) column of a table tile becomes: finite, so ``0 · value`` stays 0, and far
    below any logit, so ``exp(value − m)`` is 0 once ``m`` holds a real logit (the driver starts ``m``
    at the reserved columns' maximum)."""
    return -torch.finfo(dtype).max


def lse_tile(z: Tensor, masked: Tensor | None, target_col: Tensor, softcap: float | None, m: Tensor, s: Tensor,
             a: Tensor | None, zt: Tensor, p_out: Tensor | None, scratch: Tensor | None = None) -> Tensor:
    """One tile's update of the running statistics, in place; returns ``alpha = exp(m_old − m_new)`` per row.

    Args:
        z: (C, V_t) raw logits of the tile in the accumulation dtype; overwritten.
        masked: (V_t,) bool, the columns that are not this table's (reserved ids), or None.
        target_col: (C,) int64, each token's target column in this tile, or -1.
        softcap: ``c`` of ``c·tanh(x / c)``, or None.
        m, s: (C,) running maximum and sum of ``exp(z − m)``; a: (C,) running ``Σ exp(z − m)·z`` (entropy) or
            None; zt: (C,) each token's target logit, set where ``target_col >= 0``.
        p_out: (C, V_t) where ``exp(z − m_new)·cap'`` goes (the accumulator GEMM's input; may be ``z`` or
            ``scratch`` itself), or None when no gradient is wanted.
        scratch: (C, V_t) in the accumulation dtype for ``exp(z − m_new)`` where ``z`` is still needed
            after it (soft-cap gradient, entropy); allocated here when None.
    """
    if softcap is not None:
        softcap_(z, softcap)
    if masked is not None:
        z.masked_fill_(masked, masked_value(z.dtype))
    hit = target_col >= 0
    zt.copy_(torch.where(hit, z.gather(1, target_col.clamp_min(0).unsqueeze(1)).squeeze(1), zt))
    m_new = torch.maximum(m, z.amax(1))
    alpha = torch.exp(m - m_new)
    if a is not None or (p_out is not None and softcap is not None):  # z is needed after the exponentials
        e = torch.sub(z, m_new.unsqueeze(1), out=scratch if scratch is not None else torch.empty_like(z)).exp_()
    else:
        e = z.sub_(m_new.unsqueeze(1)).exp_()
    s.mul_(alpha).add_(e.sum(1))
    if a is not None:
        a.mul_(alpha).add_((e * z).sum(1))
    if p_out is not None:
        if softcap is not None:  # cap' = 1 − tanh²; a masked column's clamps to 0 (its exponential is 0 anyway)
            e.mul_(z.div_(softcap).clamp_(-1, 1).square_().neg_().add_(1))
        if p_out is not e:  # in-place ops return their tensor: identity says whether e already is p_out
            p_out.copy_(e)
    m.copy_(m_new)
    return alpha
