"""The @triton.jit kernels, nothing else. Offsets are int64 (``N * D`` may exceed 2**31).

``row(i)`` below is ``reserved[slot_map[i]]`` when ``slot_map[i] >= 0``, else ``weight[i]``
(times ``scaler[i]`` rounded to the output dtype, for an int8 table). Ids outside [0, V) read
nothing and yield zero rows, so no id can cause an out-of-bounds access.
"""

import triton
import triton.language as tl


@triton.jit
def _table_rows(ids, valid, cols, col_mask, weight_ptr, reserved_ptr, slot_ptr, scaler_ptr, D,
                HAS_SCALER: tl.constexpr):
    """fp32 tile of ``row(ids)`` ([BLOCK_N, BLOCK_D]); each row is read from exactly one table."""
    slot = tl.load(slot_ptr + ids, mask=valid, other=-1).to(tl.int64)
    is_res = valid & (slot >= 0)
    is_base = valid & (slot < 0)
    base = tl.load(weight_ptr + ids[:, None] * D + cols[None, :], mask=is_base[:, None] & col_mask[None, :],
                   other=0).to(tl.float32)
    if HAS_SCALER:
        # gemma_pytorch rounds the dequantised row to the float dtype before anything else.
        s = tl.load(scaler_ptr + ids, mask=is_base, other=0).to(tl.float32)
        base = (base * s[:, None]).to(reserved_ptr.dtype.element_ty).to(tl.float32)
    res = tl.load(reserved_ptr + slot[:, None] * D + cols[None, :], mask=is_res[:, None] & col_mask[None, :],
                  other=0).to(tl.float32)
    return tl.where(is_res[:, None], res, base)


@triton.jit
def _token_tile(ids_ptr, N, V, D, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's BLOCK_N tokens x BLOCK_D columns: offsets, masks, the ids and which ids are in range."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_mask = rows < N
    col_mask = cols < D
    ids = tl.load(ids_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    valid = row_mask & (ids >= 0) & (ids < V)
    return rows, cols, row_mask, col_mask, ids, valid


@triton.jit
def _gather_kernel(ids_ptr, weight_ptr, reserved_ptr, slot_ptr, scaler_ptr, out_ptr, N, V, D, scale,
                   HAS_SCALER: tl.constexpr, APPLY_SCALE: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr):
    """out[n, :] = cast(scale * row(ids[n]))  — one read of each needed row, one write of each output row.

    ``scale`` arrives already rounded to the output dtype; the product of two values of a 16-bit
    (or fp32) type is exact in fp32 before the one rounding, so this matches PyTorch bit for bit.
    """
    rows, cols, row_mask, col_mask, ids, valid = _token_tile(ids_ptr, N, V, D, BLOCK_N, BLOCK_D)
    val = _table_rows(ids, valid, cols, col_mask, weight_ptr, reserved_ptr, slot_ptr, scaler_ptr, D, HAS_SCALER)
    if APPLY_SCALE:
        val = val * scale
    tl.store(out_ptr + rows[:, None] * D + cols[None, :], val.to(out_ptr.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _scatter_atomic_kernel(grad_ptr, ids_ptr, slot_ptr, out_ptr, N, V, D, scale, BLOCK_N: tl.constexpr,
                           BLOCK_D: tl.constexpr):
    """out[slot(ids[n]), :] += scale * grad[n, :] for reserved ids, with fp32 atomics (fast, not repeatable).

    Rows of non-reserved tokens are masked off, so their gradient is never read.
    """
    rows, cols, row_mask, col_mask, ids, valid = _token_tile(ids_ptr, N, V, D, BLOCK_N, BLOCK_D)
    slot = tl.load(slot_ptr + ids, mask=valid, other=-1).to(tl.int64)
    mask = (valid & (slot >= 0))[:, None] & col_mask[None, :]
    g = tl.load(grad_ptr + rows[:, None] * D + cols[None, :], mask=mask, other=0).to(tl.float32)
    tl.atomic_add(out_ptr + slot[:, None] * D + cols[None, :], g * scale, mask=mask, sem="relaxed")


@triton.jit
def _piece_sum_kernel(src_ptr, index_ptr, bounds_ptr, partial_ptr, reserved_ptr, slot_ptr, scaler_ptr, V, D,
                      FROM_TABLE: tl.constexpr, HAS_SCALER: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_D: tl.constexpr):
    """partial[p, :] = Σ_{j in [bounds[p], bounds[p+1])} src_row(index[j])  (fp32, fixed order).

    ``src_row`` is ``row(i)`` of the table when FROM_TABLE, else ``src[i]`` (gradient rows).
    """
    p = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < D
    start = tl.load(bounds_ptr + p)
    end = tl.load(bounds_ptr + p + 1)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for j in range(start, end, BLOCK_N):
        pos = j + tl.arange(0, BLOCK_N)
        pos_mask = pos < end
        idx = tl.load(index_ptr + pos, mask=pos_mask, other=0).to(tl.int64)
        if FROM_TABLE:
            valid = pos_mask & (idx >= 0) & (idx < V)
            tile = _table_rows(idx, valid, cols, col_mask, src_ptr, reserved_ptr, slot_ptr, scaler_ptr, D,
                               HAS_SCALER)
        else:
            tile = tl.load(src_ptr + idx[:, None] * D + cols[None, :], mask=pos_mask[:, None] & col_mask[None, :],
                           other=0).to(tl.float32)
        acc += tl.sum(tile, axis=0)
    tl.store(partial_ptr + p * D + cols, acc, mask=col_mask)


@triton.jit
def _segment_reduce_kernel(partial_ptr, piece_offsets_ptr, offsets_ptr, out_ptr, D, scale, MEAN: tl.constexpr,
                           BLOCK_D: tl.constexpr):
    """out[k, :] = Σ partial[piece_offsets[k]:piece_offsets[k+1]] in piece order, then ``/ count`` (MEAN) or ``* scale``."""
    k = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < D
    first = tl.load(piece_offsets_ptr + k)
    last = tl.load(piece_offsets_ptr + k + 1)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for p in range(first, last):
        acc += tl.load(partial_ptr + p * D + cols, mask=col_mask, other=0)
    if MEAN:
        count = (tl.load(offsets_ptr + k + 1) - tl.load(offsets_ptr + k)).to(tl.float32)
        acc = acc / count
    else:
        acc = acc * scale
    tl.store(out_ptr + k * D + cols, acc, mask=col_mask)
