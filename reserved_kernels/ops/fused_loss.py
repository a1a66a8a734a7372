"""The fused linear cross-entropy's driver: over a frozen table and K trainable rows, never building N x V logits.

The merged table ``M`` is ``weight`` (V x D) with each reserved row (``slot_map[i] = k >= 0``) replaced by
``reserved_weight[k]`` rounded to the table dtype, as the forward pass of the head sees it. For a token
``n`` with hidden state ``h_n`` and target ``t_n`` (not ``ignore_index``)::

    z_nj = cap(h_n · M_j)                  cap(x) = c·tanh(x / c) (Gemma 2's soft-cap), or x
    loss_n = lse_n − z_{n,t_n}             lse_n = log Σ_j exp(z_nj)
    G_nj = ∂loss_n / ∂(h_n · M_j) = (p_nj − [j = t_n])·cap'_nj      p = softmax(z), cap' = 1 − (z / c)²
    grad_hidden_n = Σ_j G_nj M_j           grad_logits_reserved_nk = G_n,slot k

and the rows' gradient is ``(g ⊙ grad_logits_reserved)ᵀ · hidden`` for any upstream ``g`` per token, so
the op's outputs serve every reduction exactly. The frozen table gets nothing.

**The algorithm** (one driver for every backend; only the per-tile step has two forms, PyTorch's
:func:`reserved_kernels.reference.cross_entropy.lse_tile` and its Triton twin). A
block of C tokens meets the vocabulary one tile of V_t columns at a time (C x V_t elements, sized from a
memory budget). The K reserved columns are a tile of their own (``h @ Rᵀ``); in the table's tiles their
columns are masked out. Each tile updates per-token running statistics as flash attention does: the
maximum ``m``, the sum ``s = Σ exp(z − m)``, and — when gradients are wanted — the accumulator
``acc = Σ_j exp(z_j − m)·cap'_j·M_j``, all rescaled by ``exp(m_old − m_new)`` when ``m`` grows. The
reserved tile's logits are computed first (their maximum starts ``m``, so masked columns add nothing) and
folded in last: before the fold the statistics are the frozen columns' alone, which gives their
log-sum-exp for free. At the end ``grad_hidden = acc / s − cap'_t·M_t``. One pass over the table, two GEMMs
per tile, no recomputation.

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

import dataclasses
from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from reserved_kernels._table import SIXTEEN_BIT, acc_dtype, cap_slope, softcap_

MIN_TILE_COLS, MAX_TILE_COLS = 256, 8192


class TileStep(Protocol):
    """One tile's update of the running statistics, in place; returns ``alpha = exp(m_old − m_new)`` per row:
    :func:`reserved_kernels.reference.cross_entropy.lse_tile` (its docstring says each argument) or Triton's
    launcher of the same name."""

    def __call__(self, z: Tensor, masked: Tensor | None, target_col: Tensor, softcap: float | None, m: Tensor,
                 s: Tensor, a: Tensor | None, zt: Tensor, p_out: Tensor | None,
                 scratch: Tensor | None = None) -> Tensor: ...


class LossParts(NamedTuple):
    """What :func:`tiled_cross_entropy` returns, in the op's output order (see there for each)."""

    loss: Tensor
    entropy: Tensor
    is_top1: Tensor
    grad_hidden: Tensor
    grad_logits_reserved: Tensor
    frozen_lse: Tensor


def tile_shape(num_tokens: int, vocab: int, tile_bytes: int, bytes_per_element: int) -> tuple[int, int]:
    """(tokens, columns) of one tile: as many tokens as fit next to at least 256 columns, columns a power of
    two in [256, 8192] (fewer when the vocabulary is smaller), within ``tile_bytes``."""
    elements = max(tile_bytes // bytes_per_element, 1)
    per_token = max(elements // max(num_tokens, 1), 1)
    cols = 1 << max(per_token.bit_length() - 1, 0)
    cols = min(max(cols, MIN_TILE_COLS), MAX_TILE_COLS, max(vocab, 1))
    rows = min(max(elements // cols, 1), max(num_tokens, 1))
    return rows, cols


def bytes_per_tile_element(dtype: torch.dtype, device_type: str, scratch: bool, grad_hidden: bool) -> int:
    """Bytes each tile element costs: the logits in the accumulation dtype, a ``scratch`` buffer where the
    tile step keeps the logits beside their exponentials, and on CUDA with 16-bit inputs the GEMM's fp32
    output and a 16-bit copy of the softmax for the tensor cores."""
    acc = torch.finfo(acc_dtype(dtype)).bits // 8
    total = acc * (2 if scratch else 1)
    if device_type == "cuda" and dtype in SIXTEEN_BIT:
        total += acc + (2 if grad_hidden else 0)
    return total


class TileGemms:
    """The two tile GEMMs, accumulating in the accumulation dtype: operands upcast on the CPU (where 16-bit
    GEMMs are emulated); on CUDA 16-bit operands for the tensor cores, with fp32 output."""

    def __init__(self, dtype: torch.dtype, device: torch.device):
        self.acc = acc_dtype(dtype)
        self.tensor_cores = device.type == "cuda" and dtype in SIXTEEN_BIT
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


@dataclasses.dataclass
class _Targets:
    """Each token's target, split by where its column lives: a reserved slot (the K-column tile) or the table."""

    valid: Tensor  # (N,) bool: counted (not ignore_index)
    ids: Tensor  # (N,) int64: the target, 0 where ignored
    slot: Tensor  # (N,) int64: the target's reserved slot, or -1
    reserved: Tensor  # (N,) bool: counted and reserved
    plain: Tensor  # (N,) bool: counted and a table column

    @classmethod
    def of(cls, targets: Tensor, slot_map: Tensor, ignore_index: int) -> _Targets:
        valid = check_target_values(targets, slot_map.shape[0], ignore_index)
        ids = torch.where(valid, targets, 0).long()
        slot = slot_map.index_select(0, ids).long()
        return cls(valid, ids, slot, valid & (slot >= 0), valid & (slot < 0))


@dataclasses.dataclass
class _Block:
    """The running statistics of one block of tokens (see the module docstring)."""

    m: Tensor  # maximum logit
    s: Tensor  # Σ exp(z − m)
    a: Tensor | None  # Σ exp(z − m)·z, for the entropy
    zt: Tensor  # the target's logit
    acc_h: Tensor | None  # Σ exp(z − m)·cap'·M_j, for grad_hidden (None when it is not asked for)

    @classmethod
    def empty(cls, n: int, dim: int, dtype: torch.dtype, device, stats: bool, grad_hidden: bool) -> _Block:
        return cls(m=torch.full((n,), float("-inf"), dtype=dtype, device=device),
                   s=torch.zeros(n, dtype=dtype, device=device),
                   a=torch.zeros(n, dtype=dtype, device=device) if stats else None,
                   zt=torch.zeros(n, dtype=dtype, device=device),
                   acc_h=torch.zeros((n, dim), dtype=dtype, device=device) if grad_hidden else None)


def _reserved_logits(h: Tensor, rows: Tensor, softcap: float | None, gemms: TileGemms) -> Tensor:
    """The K reserved columns' capped logits (N, K): the first GEMM of a block, since their maximum starts ``m``."""
    z_res = gemms.logits(h, rows, torch.empty((h.shape[0], rows.shape[0]), dtype=gemms.acc, device=h.device))
    return softcap_(z_res, softcap) if softcap is not None else z_res


def _fold_reserved(block: _Block, z_res: Tensor, rows: Tensor, target_col: Tensor, softcap: float | None,
                   gemms: TileGemms, tile_step: TileStep) -> None:
    """Fold the K reserved columns into ``block`` after the table's tiles (which then give the frozen
    columns' log-sum-exp on their own): one more tile step, and ``acc += p·R`` after its rescaling."""
    p = torch.empty_like(z_res) if block.acc_h is not None else None
    alpha = tile_step(z_res.clone(), None, target_col, None, block.m, block.s, block.a, block.zt, p)  # capped
    if p is not None:
        if softcap is not None:  # the slope the tile step did not apply (it saw capped logits)
            p.mul_(cap_slope(z_res, softcap))
        # K columns: a small GEMM in the accumulation dtype
        block.acc_h.mul_(alpha.unsqueeze(1)).addmm_(p, rows.to(gemms.acc))


def _table_tiles(block: _Block, h: Tensor, weight: Tensor, reserved_cols: Tensor | None, targets: Tensor,
                 plain: Tensor, softcap: float | None, gemms: TileGemms, tile_step: TileStep,
                 buffers: tuple[Tensor, Tensor | None, Tensor | None], cols: int) -> None:
    """The table's columns, ``cols`` at a time, its reserved columns masked out; updates ``block`` in place."""
    z_buf, e_buf, p16_buf = buffers
    n, vocab = h.shape[0], weight.shape[0]
    for v0 in range(0, vocab, cols):
        v1 = min(v0 + cols, vocab)
        w = weight[v0:v1]
        z = gemms.logits(h, w, _view(z_buf, n, v1 - v0))
        e = _view(e_buf, n, v1 - v0) if e_buf is not None else None
        p = None
        if block.acc_h is not None:  # where the tile's softmax goes for the accumulator GEMM
            p = _view(p16_buf, n, v1 - v0) if p16_buf is not None else e if e is not None else z
        col = torch.where(plain & (targets >= v0) & (targets < v1), targets - v0, -1)
        masked = reserved_cols[v0:v1] if reserved_cols is not None else None
        if masked is not None and h.device.type == "cpu" and not bool(masked.any()):
            masked = None  # on a CPU, finding a tile without reserved columns costs no sync: skip the pass
        alpha = tile_step(z, masked, col, softcap, block.m, block.s, block.a, block.zt, p, e)
        if block.acc_h is not None:
            gemms.accumulate(block.acc_h, alpha, p, w)


def _target_slope(block: _Block, softcap: float | None) -> Tensor:
    """``cap'`` at each token's target logit (1 without a soft-cap)."""
    return cap_slope(block.zt, softcap) if softcap is not None else torch.ones_like(block.zt)


def _grad_hidden(block: _Block, weight: Tensor, rows: Tensor, targets: _Targets, softcap: float | None,
                 acc: torch.dtype) -> Tensor:
    """``grad_hidden`` of one block, 0 for ignored tokens, in the accumulation dtype: ``acc / s − cap'_t·M_t``."""
    target_rows = weight.index_select(0, targets.ids).to(acc)
    if rows.shape[0]:
        slot = targets.slot.clamp_min(0)
        target_rows = torch.where(targets.reserved.unsqueeze(1), rows.index_select(0, slot).to(acc), target_rows)
    dh = block.acc_h.div_(block.s.unsqueeze(1)).sub_(_target_slope(block, softcap).unsqueeze(1) * target_rows)
    return dh * targets.valid.unsqueeze(1)


def _grad_logits_reserved(block: _Block, lse: Tensor, z_res: Tensor, targets: _Targets,
                          softcap: float | None) -> Tensor:
    """The K reserved columns' ``(p − onehot)·cap'`` of one block, 0 for ignored tokens: N·K work, no table."""
    slot = targets.slot.clamp_min(0)
    g = torch.exp(z_res - lse.unsqueeze(1))
    if softcap is not None:
        g.mul_(cap_slope(z_res, softcap))
    g.scatter_add_(1, slot.unsqueeze(1), torch.where(targets.reserved, -_target_slope(block, softcap), 0).unsqueeze(1))
    return g * targets.valid.unsqueeze(1)


def tiled_cross_entropy(hidden: Tensor, weight: Tensor, reserved_weight: Tensor, slot_map: Tensor, targets: Tensor,
                        ignore_index: int, softcap: float | None, tile_bytes: int, grad_hidden: bool, grad_rows: bool,
                        stats: bool, tile_step: TileStep, tile_step_needs_scratch: bool = True) -> LossParts:
    """:class:`LossParts` ``(loss, entropy, is_top1, grad_hidden, grad_logits_reserved, frozen_lse)`` for flat
    ``hidden`` (N, D) and ``targets`` (N,).

    ``loss`` (N,) in the accumulation dtype, 0 where ignored. ``entropy`` (N,) and ``is_top1`` (N,) bool (the target
    is the most likely token) when ``stats``, else empty; so is ``frozen_lse`` (N,), the log-sum-exp over the
    table's columns alone (every column but the K reserved ones, for every token, ignored ones included): the
    statistic :class:`~reserved_kernels.models.FrozenText` keeps, taken from the same pass. ``grad_hidden`` (N, D)
    in the hidden dtype when ``grad_hidden``, and ``grad_logits_reserved`` (N, K) in the accumulation dtype when
    ``grad_rows``, else empty: each token's gradient of its own loss (see the module docstring). The two are
    independent: without ``grad_hidden`` there is no accumulator, no accumulator GEMM and no softmax copy — one GEMM
    per tile, what a forward pass costs — while the rows' gradient costs N·K more. Arguments arrive checked.
    ``tile_step`` is :func:`reserved_kernels.reference.cross_entropy.lse_tile` or a kernel with its
    signature; one that computes the exponentials without a second buffer says so with
    ``tile_step_needs_scratch=False``.
    """
    num_tokens, dim = hidden.shape
    vocab, num_slots = weight.shape[0], reserved_weight.shape[0]
    device, dtype = hidden.device, weight.dtype
    gemms = TileGemms(dtype, device)
    acc = gemms.acc
    target = _Targets.of(targets, slot_map, ignore_index)
    rows = reserved_weight.to(dtype)  # as the forward pass sees them: rounded to the table dtype

    loss = torch.zeros(num_tokens, dtype=acc, device=device)
    entropy = torch.zeros(num_tokens if stats else 0, dtype=acc, device=device)
    is_top1 = torch.zeros(num_tokens if stats else 0, dtype=torch.bool, device=device)
    d_hidden = torch.zeros((num_tokens if grad_hidden else 0, dim), dtype=hidden.dtype, device=device)
    grad_reserved = torch.zeros((num_tokens if grad_rows else 0, num_slots), dtype=acc, device=device)
    frozen_lse = torch.zeros(num_tokens if stats else 0, dtype=acc, device=device)
    if num_tokens == 0:
        return LossParts(loss, entropy, is_top1, d_hidden, grad_reserved, frozen_lse)

    scratch = tile_step_needs_scratch and (stats or (softcap is not None and grad_hidden))
    block_rows, cols = tile_shape(num_tokens, vocab, tile_bytes,
                                  bytes_per_tile_element(dtype, device.type, scratch, grad_hidden))
    reserved_cols = (slot_map >= 0) if num_slots else None
    z_buf = torch.empty(block_rows * cols, dtype=acc, device=device)
    buffers = (z_buf, torch.empty_like(z_buf) if scratch else None,
               torch.empty_like(z_buf, dtype=gemms.operand) if grad_hidden and gemms.operand != acc else None)
    for r0 in range(0, num_tokens, block_rows):
        r1 = min(r0 + block_rows, num_tokens)
        part = _Targets(*(getattr(target, f.name)[r0:r1] for f in dataclasses.fields(_Targets)))
        h = hidden[r0:r1].to(gemms.operand)
        block = _Block.empty(r1 - r0, dim, acc, device, stats, grad_hidden)
        z_res = None
        if num_slots:  # m starts at a real logit: a table tile whose columns are all reserved then adds exp(-inf)
            z_res = _reserved_logits(h, rows, softcap, gemms)
            block.m.copy_(z_res.amax(1))
        _table_tiles(block, h, weight, reserved_cols, part.ids, part.plain, softcap, gemms, tile_step, buffers, cols)
        if stats:
            frozen_lse[r0:r1] = block.m + torch.log(block.s)
        if z_res is not None:
            _fold_reserved(block, z_res, rows, torch.where(part.reserved, part.slot, -1), softcap, gemms, tile_step)
        lse = block.m + torch.log(block.s)
        loss[r0:r1] = torch.where(part.valid, lse - block.zt, 0)
        if stats:
            entropy[r0:r1] = torch.where(part.valid, lse - block.a / block.s, 0)
            is_top1[r0:r1] = part.valid & (block.zt >= block.m)
        if grad_hidden:
            d_hidden[r0:r1] = _grad_hidden(block, weight, rows, part, softcap, acc).to(hidden.dtype)
        if grad_rows and z_res is not None:
            grad_reserved[r0:r1] = _grad_logits_reserved(block, lse, z_res, part, softcap)
    return LossParts(loss, entropy, is_top1, d_hidden, grad_reserved, frozen_lse)
