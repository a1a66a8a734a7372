"""The fused linear cross-entropy over a frozen table and K trainable rows, never building N x V logits.

The merged table ``M`` is ``weight`` (V x D) with each reserved row (``slot_map[i] = k >= 0``) replaced by
``reserved_weight[k]`` rounded to the table dtype, as the forward pass of the head sees it. For a token
``n`` with hidden state ``h_n`` and target ``t_n`` (not ``ignore_index``)::

    z_nj = cap(h_n · M_j)                  cap(x) = c·tanh(x / c) (Gemma 2's soft-cap), or x
    loss_n = lse_n − z_{n,t_n}             lse_n = log Σ_j exp(z_nj)
    G_nj = ∂loss_n / ∂(h_n · M_j) = (p_nj − [j = t_n])·cap'_nj      p = softmax(z), cap' = 1 − (z / c)²
    grad_hidden_n = Σ_j G_nj M_j           grad_logits_reserved_nk = G_n,slot k

and the rows' gradient is ``(g ⊙ grad_logits_reserved)ᵀ · hidden`` for any upstream ``g`` per token, so
the op's outputs serve every reduction exactly. The frozen table gets nothing.

**The algorithm** (one for every device; only the per-tile step :func:`lse_tile` has a Triton twin). A
block of C tokens meets the vocabulary one tile of V_t columns at a time (C x V_t elements, sized from a
memory budget). The K reserved columns are a tile of their own (``h @ Rᵀ``), taken first; in the table's
tiles their columns are masked out. Each tile updates per-token running statistics as flash attention
does: the maximum ``m``, the sum ``s = Σ exp(z − m)``, and — when gradients are wanted — the accumulator
``acc = Σ_j exp(z_j − m)·cap'_j·M_j``, all rescaled by ``exp(m_old − m_new)`` when ``m`` grows. At the
end ``grad_hidden = acc / s − cap'_t·M_t``. One pass over the table, two GEMMs per tile, no recomputation.

**What it costs** (N tokens, V x D table): 2·N·V·D multiply-adds with gradients (the logits GEMM and the
accumulator GEMM — the unfused path's two), half without; the table is read twice per block of C
tokens; memory beyond inputs and outputs is the tile (C x V_t, at most ``tile_bytes``) and the C x D
accumulator. The unfused path also writes and re-reads the N x V logits, their softmax and their
gradient (4·N·V bytes each in fp32): at V = 262,144 and N = 2,048 that is 2 GiB per copy, against a
16 MiB tile. On a CPU, tiles of N x 2,048 also run the GEMMs faster than one N x V GEMM (the output
tile stays in cache). On a GPU, tile GEMMs of 8,192 x 8,192 keep the tensor cores busy, and the
per-tile softmax (a Triton kernel) reads the tile twice and writes it once, at memory speed.

Precision: the tile GEMMs accumulate in fp32 (fp64 for fp64 inputs) and write fp32 logits (16-bit
inputs are upcast per tile on the CPU; on CUDA the tensor cores take them with fp32 output), and every
statistic, the accumulator and the K-column gradient are fp32. Only ``grad_hidden`` is returned in the
hidden states' dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

_SIXTEEN_BIT = (torch.float16, torch.bfloat16)
MIN_TILE_COLS, MAX_TILE_COLS = 256, 8192


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the logits, statistics and accumulators: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def masked_value(dtype: torch.dtype) -> float:
    """What a masked (reserved) column of a table tile becomes: finite, so ``0 · value`` stays 0, and far
    below any logit, so ``exp(value − m)`` is 0 once ``m`` holds a real logit (the reserved tile comes first)."""
    return -torch.finfo(dtype).max


def tile_shape(num_tokens: int, vocab: int, tile_bytes: int, bytes_per_element: int) -> tuple[int, int]:
    """(tokens, columns) of one tile: as many tokens as fit next to at least 256 columns, columns a power of
    two in [256, 8192] (fewer when the vocabulary is smaller), within ``tile_bytes``."""
    elements = max(tile_bytes // bytes_per_element, 1)
    per_token = max(elements // max(num_tokens, 1), 1)
    cols = 1 << max(per_token.bit_length() - 1, 0)
    cols = min(max(cols, MIN_TILE_COLS), MAX_TILE_COLS, max(vocab, 1))
    rows = min(max(elements // cols, 1), max(num_tokens, 1))
    return rows, cols


def bytes_per_tile_element(dtype: torch.dtype, device_type: str, scratch: bool, compute_grad: bool) -> int:
    """Bytes each tile element costs: the logits in the accumulation dtype, a ``scratch`` buffer where the
    tile step keeps the logits beside their exponentials, and on CUDA with 16-bit inputs the GEMM's fp32
    output and a 16-bit copy of the softmax for the tensor cores."""
    acc = torch.finfo(acc_dtype(dtype)).bits // 8
    total = acc * (2 if scratch else 1)
    if device_type == "cuda" and dtype in _SIXTEEN_BIT:
        total += acc + (2 if compute_grad else 0)
    return total


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
        z.div_(softcap).tanh_().mul_(softcap)
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
        if p_out.data_ptr() != e.data_ptr():
            p_out.copy_(e)
    m.copy_(m_new)
    return alpha


class _Gemms:
    """The two tile GEMMs, accumulating in the accumulation dtype: operands upcast on the CPU (where 16-bit
    GEMMs are emulated); on CUDA 16-bit operands for the tensor cores, with fp32 output."""

    def __init__(self, dtype: torch.dtype, device: torch.device):
        self.acc = acc_dtype(dtype)
        self.tensor_cores = device.type == "cuda" and dtype in _SIXTEEN_BIT
        self.operand = dtype if self.tensor_cores else self.acc  # the dtype both GEMMs take

    def logits(self, h: Tensor, w: Tensor, out: Tensor) -> Tensor:
        """``out = h @ wᵀ`` for ``h`` already in the operand dtype."""
        if self.tensor_cores:
            return out.copy_(torch.mm(h, w.t(), out_dtype=self.acc))
        return torch.mm(h, w.to(self.acc).t(), out=out)

    def accumulate(self, acc: Tensor, alpha: Tensor, p: Tensor, w: Tensor) -> None:
        """``acc = alpha·acc + p @ w``, with ``p`` in the operand dtype."""
        acc.mul_(alpha.unsqueeze(1))
        if self.tensor_cores:
            acc.add_(torch.mm(p, w, out_dtype=self.acc))
        else:
            acc.addmm_(p, w.to(self.acc))


def _view(buffer: Tensor, rows: int, cols: int) -> Tensor:
    """A contiguous (rows, cols) view of the start of ``buffer`` (a partial tile keeps dense rows)."""
    return buffer.view(-1)[:rows * cols].view(rows, cols)


def check_target_values(targets: Tensor, vocab: int, ignore_index: int) -> Tensor:
    """Targets other than ``ignore_index`` must lie in [0, V): IndexError on CPU, a device-side assertion on
    CUDA (no host sync). Returns the mask of tokens that count."""
    valid = targets != ignore_index
    inside = (targets >= 0) & (targets < vocab)
    if targets.device.type == "cpu":
        bad = targets[valid & ~inside]
        if bad.numel():
            raise IndexError(f"targets must lie in [0, {vocab}) or be ignore_index={ignore_index}, got {int(bad[0])}")
    else:
        torch._assert_async((inside | ~valid).all(), f"targets must lie in [0, {vocab}) or be ignore_index")
    return valid


def linear_cross_entropy(hidden: Tensor, weight: Tensor, reserved_weight: Tensor, slot_map: Tensor, targets: Tensor,
                         ignore_index: int, softcap: float | None, tile_bytes: int, compute_grad: bool, stats: bool,
                         tile_step: Callable = lse_tile, tile_step_needs_scratch: bool = True,
                         ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(loss, entropy, is_top1, grad_hidden, grad_logits_reserved)`` for flat ``hidden`` (N, D) and ``targets`` (N,).

    ``loss`` (N,) in the accumulation dtype, 0 where ignored. ``entropy`` (N,) and ``is_top1`` (N,) bool (the
    target is the most likely token) when ``stats``, else empty. ``grad_hidden`` (N, D) in the hidden
    dtype and ``grad_logits_reserved`` (N, K) in the accumulation dtype when ``compute_grad``, else
    empty: each token's gradient of its own loss (see the module docstring). Arguments arrive checked.
    ``tile_step`` is :func:`lse_tile` or a kernel with its signature; one that computes the exponentials
    without a second buffer says so with ``tile_step_needs_scratch=False``.
    """
    num_tokens, dim = hidden.shape
    vocab, num_slots = weight.shape[0], reserved_weight.shape[0]
    device, dtype = hidden.device, weight.dtype
    gemms = _Gemms(dtype, device)
    acc = gemms.acc
    valid = check_target_values(targets, vocab, ignore_index)
    target = torch.where(valid, targets, 0).long()
    target_slot = slot_map.index_select(0, target).long()
    reserved_target = valid & (target_slot >= 0)
    plain_target = valid & (target_slot < 0)
    rows = reserved_weight.to(dtype)  # as the forward pass sees them: rounded to the table dtype

    loss = torch.zeros(num_tokens, dtype=acc, device=device)
    entropy = torch.zeros(num_tokens if stats else 0, dtype=acc, device=device)
    is_top1 = torch.zeros(num_tokens if stats else 0, dtype=torch.bool, device=device)
    grad_hidden = torch.zeros((num_tokens if compute_grad else 0, dim), dtype=hidden.dtype, device=device)
    grad_reserved = torch.zeros((num_tokens if compute_grad else 0, num_slots), dtype=acc, device=device)
    if num_tokens == 0:
        return loss, entropy, is_top1, grad_hidden, grad_reserved

    scratch = tile_step_needs_scratch and (stats or (softcap is not None and compute_grad))
    block, cols = tile_shape(num_tokens, vocab, tile_bytes, bytes_per_tile_element(dtype, device.type, scratch,
                                                                                    compute_grad))
    reserved_cols = (slot_map >= 0) if num_slots else None
    z_buf = torch.empty(block * cols, dtype=acc, device=device)
    e_buf = torch.empty_like(z_buf) if scratch else None
    p16_buf = torch.empty_like(z_buf, dtype=gemms.operand) if compute_grad and gemms.operand != acc else None
    for r0 in range(0, num_tokens, block):
        r1 = min(r0 + block, num_tokens)
        n = r1 - r0
        h = hidden[r0:r1].to(gemms.operand)
        t, t_plain, ok = target[r0:r1], plain_target[r0:r1], valid[r0:r1]
        m = torch.full((n,), float("-inf"), dtype=acc, device=device)
        s = torch.zeros(n, dtype=acc, device=device)
        a = torch.zeros(n, dtype=acc, device=device) if stats else None
        zt = torch.zeros(n, dtype=acc, device=device)
        acc_h = torch.zeros((n, dim), dtype=acc, device=device) if compute_grad else None
        if num_slots:  # the reserved tile first: m holds a real logit before any all-masked table tile
            z_res = gemms.logits(h, rows, torch.empty((n, num_slots), dtype=acc, device=device))
            if softcap is not None:
                z_res.div_(softcap).tanh_().mul_(softcap)
            col = torch.where(reserved_target[r0:r1], target_slot[r0:r1], -1)
            p = torch.empty_like(z_res) if compute_grad else None
            tile_step(z_res.clone(), None, col, None, m, s, a, zt, p)  # already capped: its slope is applied here
            if compute_grad:
                if softcap is not None:
                    p.mul_(_cap_slope(z_res, softcap))
                acc_h.addmm_(p, rows.to(acc))  # K columns: a small GEMM in the accumulation dtype
        for v0 in range(0, vocab, cols):
            v1 = min(v0 + cols, vocab)
            w = weight[v0:v1]
            z = gemms.logits(h, w, _view(z_buf, n, v1 - v0))
            e = _view(e_buf, n, v1 - v0) if e_buf is not None else None
            p = None
            if compute_grad:  # where the tile's softmax goes for the accumulator GEMM
                p = _view(p16_buf, n, v1 - v0) if p16_buf is not None else e if e is not None else z
            col = torch.where(t_plain & (t >= v0) & (t < v1), t - v0, -1)
            masked = reserved_cols[v0:v1] if reserved_cols is not None else None
            if masked is not None and device.type == "cpu" and not bool(masked.any()):
                masked = None  # on a CPU, finding a tile without reserved columns costs no sync: skip the pass
            alpha = tile_step(z, masked, col, softcap, m, s, a, zt, p, e)
            if compute_grad:
                gemms.accumulate(acc_h, alpha, p, w)
        lse = m + torch.log(s)
        loss[r0:r1] = torch.where(ok, lse - zt, 0)
        if stats:
            entropy[r0:r1] = torch.where(ok, lse - a / s, 0)
            is_top1[r0:r1] = ok & (zt >= m)
        if compute_grad:
            slope = _cap_slope(zt, softcap) if softcap is not None else torch.ones_like(zt)
            target_rows = weight.index_select(0, t).to(acc)
            if num_slots:
                slot, res = target_slot[r0:r1], reserved_target[r0:r1]
                target_rows = torch.where(res.unsqueeze(1), rows.index_select(0, slot.clamp_min(0)).to(acc),
                                          target_rows)
                g = torch.exp(z_res - lse.unsqueeze(1))
                if softcap is not None:
                    g.mul_(_cap_slope(z_res, softcap))
                g.scatter_add_(1, slot.clamp_min(0).unsqueeze(1), torch.where(res, -slope, 0).unsqueeze(1))
                grad_reserved[r0:r1] = g * ok.unsqueeze(1)
            dh = acc_h.div_(s.unsqueeze(1)).sub_(slope.unsqueeze(1) * target_rows)
            grad_hidden[r0:r1] = (dh * ok.unsqueeze(1)).to(hidden.dtype)
    return loss, entropy, is_top1, grad_hidden, grad_reserved


def _cap_slope(z: Tensor, softcap: float) -> Tensor:
    """``d cap(x) / dx`` at ``z = cap(x)``: ``1 − (z / c)²``, clamped to [0, 1]."""
    return 1 - (z / softcap).clamp(-1, 1).square()
