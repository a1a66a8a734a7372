"""The @triton.jit kernels, nothing else. Offsets are int64 (``N * D`` may exceed 2**31).

``row(i)`` below is ``reserved[slot_map[i]]`` rounded to the table dtype ``T`` when ``slot_map[i] >= 0``,
else ``weight[i]`` (times ``scaler[i]`` rounded to ``T``, for an int8 table). The kernels that take ids
from users (gather, segment_mean) assert on the device that they lie in [0, V) (compiled with
``debug=True`` for that); the backward never re-validates and treats any other id as no hit. No id can
cause an out-of-bounds access either way.

The deterministic backward is three kernels, the same algorithm as ``csrc/cuda.cu`` (see its header):
``count_kernel`` (per-tile slot counts), ``place_kernel`` (each hit's position in (slot, token) order)
and ``sum_kernel`` (fixed chunks of that order; runs that cross chunks combine in chunk order).
"""

import triton
import triton.language as tl


@triton.jit
def _table_rows(ids, valid, cols, col_mask, weight_ptr, reserved_ptr, slot_ptr, scaler_ptr, K, D,
                T: tl.constexpr, HAS_SCALER: tl.constexpr):
    """fp32 tile of ``row(ids)`` ([BLOCK_N, BLOCK_D]); each row is read from exactly one table."""
    slot = tl.load(slot_ptr + ids, mask=valid, other=-1).to(tl.int64)
    tl.device_assert(~valid | (slot < K), "slot_map entries must be -1 or a row of reserved_weight")
    is_res = valid & (slot >= 0) & (slot < K)
    is_base = valid & (slot < 0)
    base = tl.load(weight_ptr + ids[:, None] * D + cols[None, :], mask=is_base[:, None] & col_mask[None, :],
                   other=0).to(tl.float32)
    if HAS_SCALER:
        # gemma_pytorch rounds the dequantised row to the float dtype before anything else.
        s = tl.load(scaler_ptr + ids, mask=is_base, other=0).to(tl.float32)
        base = (base * s[:, None]).to(T).to(tl.float32)
    res = tl.load(reserved_ptr + slot[:, None] * D + cols[None, :], mask=is_res[:, None] & col_mask[None, :],
                  other=0).to(T).to(tl.float32)  # fp32 master rows are rounded to the table dtype
    return tl.where(is_res[:, None], res, base)


@triton.jit(debug=True)
def gather_kernel(ids_ptr, weight_ptr, reserved_ptr, slot_ptr, scaler_ptr, out_ptr, N, V, K, D, scale,
                   T: tl.constexpr, HAS_SCALER: tl.constexpr, APPLY_SCALE: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr):
    """out[n, :] = cast(scale * row(ids[n]))  — one read of each needed row, one write of each output row.

    ``scale`` arrives already rounded to ``T``; the product of two values of a 16-bit (or fp32) type
    is exact in fp32 before the one rounding, so this matches PyTorch bit for bit.
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_mask = rows < N
    col_mask = cols < D
    ids = tl.load(ids_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    valid = row_mask & (ids >= 0) & (ids < V)
    tl.device_assert(~row_mask | valid, "ids must lie in [0, num_embeddings)")
    val = _table_rows(ids, valid, cols, col_mask, weight_ptr, reserved_ptr, slot_ptr, scaler_ptr, K, D, T, HAS_SCALER)
    if APPLY_SCALE:
        val = val * scale
    tl.store(out_ptr + rows[:, None] * D + cols[None, :], val.to(T), mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _hit_slots(ids_ptr, slot_ptr, pos, end, V, K):
    """The slot each position's token hits, or -1 (past the tile, an id outside [0, V), not reserved)."""
    in_tile = pos < end
    ids = tl.load(ids_ptr + pos, mask=in_tile, other=-1).to(tl.int64)
    valid = in_tile & (ids >= 0) & (ids < V)
    slot = tl.load(slot_ptr + ids, mask=valid, other=-1)
    return tl.where(valid & (slot >= 0) & (slot < K), slot, -1)


@triton.jit
def count_kernel(ids_ptr, slot_ptr, counts_ptr, N, V, K, TILE_TOKENS, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
    """counts[tile, s] = number of this tile's tokens that hit slot s (integer atomics: order-independent)."""
    tile = tl.program_id(0).to(tl.int64)
    row = counts_ptr + tile * K
    for s0 in range(0, K, BLOCK_K):
        s = s0 + tl.arange(0, BLOCK_K)
        tl.store(row + s, tl.zeros((BLOCK_K,), dtype=tl.int32), mask=s < K)
    tl.debug_barrier()
    start = tile * TILE_TOKENS
    end = tl.minimum(start + TILE_TOKENS, N)
    for r in range(start, end, BLOCK):
        slot = _hit_slots(ids_ptr, slot_ptr, r + tl.arange(0, BLOCK), end, V, K)
        tl.atomic_add(row + slot, tl.full((BLOCK,), 1, tl.int32), mask=slot >= 0, sem="relaxed")


@triton.jit
def place_kernel(ids_ptr, slot_ptr, counts_ptr, bases_ptr, offsets_ptr, arrivals_ptr, NUM_ARRIVALS,
                  sorted_token_ptr, sorted_slot_ptr, N, V, K, TILE_TOKENS, NUM_TILES, BLOCK_K: tl.constexpr,
                  ROUND: tl.constexpr):
    """Each hit's (token, slot) at its position in (slot, token) order; offsets[s] = first position of slot s.

    Also zeroes the sum kernel's arrival counters (a stripe per tile).
    """
    tile = tl.program_id(0).to(tl.int64)
    base_row = bases_ptr + tile * K
    # Where this tile's hits of slot s begin: all hits of lower slots plus slot s's hits in earlier tiles.
    carry = 0
    for s0 in range(0, K, BLOCK_K):
        s = s0 + tl.arange(0, BLOCK_K)
        in_k = s < K
        total = tl.zeros((BLOCK_K,), dtype=tl.int32)
        before = tl.zeros((BLOCK_K,), dtype=tl.int32)
        for t in range(0, NUM_TILES):
            c = tl.load(counts_ptr + t * K + s, mask=in_k, other=0)
            total += c
            before += tl.where(t < tile, c, 0)
        lower = tl.cumsum(total, 0) - total
        tl.store(base_row + s, carry + lower + before, mask=in_k)
        if tile == 0:
            tl.store(offsets_ptr + s, carry + lower, mask=in_k)
        carry += tl.sum(total, 0)
    if tile == 0:
        tl.store(offsets_ptr + K, carry)
    for j0 in range(tile * BLOCK_K, NUM_ARRIVALS, NUM_TILES * BLOCK_K):
        j = j0 + tl.arange(0, BLOCK_K)
        tl.store(arrivals_ptr + j, tl.zeros((BLOCK_K,), dtype=tl.int32), mask=j < NUM_ARRIVALS)
    tl.debug_barrier()
    # Round by round in token order: a hit's rank is the number of earlier hits of its slot in the round.
    start = tile * TILE_TOKENS
    end = tl.minimum(start + TILE_TOKENS, N)
    lane = tl.arange(0, ROUND)
    for r in range(start, end, ROUND):
        pos = r + lane
        slot = _hit_slots(ids_ptr, slot_ptr, pos, end, V, K)
        if tl.max(slot, 0) >= 0:  # most rounds hit nothing
            hit = slot >= 0
            same = (slot[:, None] == slot[None, :]) & hit[:, None]
            rank = tl.sum((same & (lane[None, :] < lane[:, None])).to(tl.int32), 1)
            count = tl.sum(same.to(tl.int32), 1)
            first = tl.load(base_row + slot, mask=hit, other=0)
            where = first + rank
            tl.store(sorted_token_ptr + where, pos.to(tl.int32), mask=hit)
            tl.store(sorted_slot_ptr + where, slot, mask=hit)
            tl.debug_barrier()  # every lane has read base[slot] before the round's last hit moves it on
            tl.store(base_row + slot, first + count, mask=hit & (rank == count - 1))
            tl.debug_barrier()


@triton.jit
def sum_kernel(grad_ptr, sorted_token_ptr, sorted_slot_ptr, offsets_ptr, arrivals_ptr, pieces_ptr, out_ptr, K, D,
                CHUNK, NUM_CHUNKS, scale, ZERO_SLOTS: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[s, cols] = cast(scale * Σ grad[token, cols]) over slot s's hits, in (slot, token) order.

    A run of one slot inside this chunk is summed and written straight to the output dtype; a run that
    crosses chunks leaves an fp32 partial, and the chunk that arrives last adds them in chunk order.
    Programs past the chunks write the zero rows of slots no token hit.
    """
    c = tl.program_id(0).to(tl.int64)
    col_block = tl.program_id(1).to(tl.int64)
    cols = col_block * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < D
    if c >= NUM_CHUNKS:
        zs = (c - NUM_CHUNKS) * ZERO_SLOTS + tl.arange(0, ZERO_SLOTS)
        in_k = zs < K
        start = tl.load(offsets_ptr + zs, mask=in_k, other=0)
        empty = in_k & (start == tl.load(offsets_ptr + zs + 1, mask=in_k, other=0))
        tl.store(out_ptr + zs[:, None] * D + cols[None, :], tl.zeros((ZERO_SLOTS, BLOCK_D), dtype=tl.float32).to(
            out_ptr.dtype.element_ty), mask=empty[:, None] & col_mask[None, :])
    else:
        hits = tl.load(offsets_ptr + K).to(tl.int64)
        lo = c * CHUNK
        hi = tl.minimum(lo + CHUNK, hits)
        p = lo
        while p < hi:
            s = tl.load(sorted_slot_ptr + p).to(tl.int64)
            run_lo = tl.load(offsets_ptr + s).to(tl.int64)
            run_hi = tl.load(offsets_ptr + s + 1).to(tl.int64)
            e = tl.minimum(run_hi, hi)
            acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
            for q in range(p, e, BLOCK_Q):
                qs = q + tl.arange(0, BLOCK_Q)
                in_run = qs < e
                tokens = tl.load(sorted_token_ptr + qs, mask=in_run, other=0).to(tl.int64)
                g = tl.load(grad_ptr + tokens[:, None] * D + cols[None, :], mask=in_run[:, None] & col_mask[None, :],
                            other=0)
                acc += tl.sum(g.to(tl.float32), 0)
            if (run_lo >= lo) & (run_hi <= hi):
                tl.store(out_ptr + s * D + cols, (acc * scale).to(out_ptr.dtype.element_ty), mask=col_mask)
            else:
                # In this chunk the run is the first (it began earlier: piece 0) or the last (it goes on: 1).
                which = tl.where(run_lo < lo, 0, 1)
                tl.store(pieces_ptr + (c * 2 + which) * D + cols, acc, mask=col_mask)
                tl.debug_barrier()
                c0 = run_lo // CHUNK
                c1 = (run_hi - 1) // CHUNK
                arrived = tl.atomic_add(arrivals_ptr + s * tl.num_programs(1) + col_block, 1, sem="acq_rel",
                                        scope="gpu")
                if arrived == c1 - c0:  # the last piece: add all of them in chunk order
                    total = tl.zeros((BLOCK_D,), dtype=tl.float32)
                    for cc in range(c0, c1 + 1):
                        piece = pieces_ptr + (cc * 2 + tl.where(cc == c0, 1, 0)) * D + cols
                        total += tl.load(piece, mask=col_mask, other=0, cache_modifier=".cg")
                    tl.store(out_ptr + s * D + cols, (total * scale).to(out_ptr.dtype.element_ty), mask=col_mask)
            p = e


@triton.jit(debug=True)
def segment_mean_kernel(weight_ptr, reserved_ptr, slot_ptr, scaler_ptr, offsets_ptr, src_ptr, out_ptr, NUM_IDS, V, K,
                         D, T: tl.constexpr, HAS_SCALER: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[k, :] = mean of row(src[j]) for j in [offsets[k], offsets[k+1]), summed in fp32 in a fixed order."""
    k = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < D
    lo = tl.load(offsets_ptr + k)
    hi = tl.load(offsets_ptr + k + 1)
    tl.device_assert((lo >= 0) & (lo < hi) & (hi <= NUM_IDS), "every destination needs at least one source id")
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for j in range(lo, hi, BLOCK_N):
        pos = j + tl.arange(0, BLOCK_N)
        in_segment = pos < hi
        idx = tl.load(src_ptr + pos, mask=in_segment, other=0).to(tl.int64)
        valid = in_segment & (idx >= 0) & (idx < V)
        tl.device_assert(~in_segment | valid, "src_ids must lie in [0, num_embeddings)")
        tile = _table_rows(idx, valid, cols, col_mask, weight_ptr, reserved_ptr, slot_ptr, scaler_ptr, K, D, T,
                           HAS_SCALER)
        acc += tl.sum(tile, 0)
    tl.store(out_ptr + k * D + cols, acc / (hi - lo).to(tl.float32), mask=col_mask)


@triton.jit
def _tanh(x):
    """tanh from one exponential (the interpreter has no libdevice): ``sign(x)·(1 − e)/(1 + e)``, ``e = exp(−2|x|)``;
    within a few fp32 ulps of 1 where |tanh| is large, within ~1e-7 absolute near 0."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _tile_logits(z_row, cols, in_row, masked_ptr, softcap, MASKED: tl.constexpr, HAS_CAP: tl.constexpr,
                 HAS_MASK: tl.constexpr):
    """A block of one tile row's logits in fp32: soft-capped, masked columns (reserved ids) at MASKED, -inf past the
    row."""
    z = tl.load(z_row + cols, mask=in_row, other=0.0).to(tl.float32)
    if HAS_CAP:
        z = softcap * _tanh(z / softcap)
    if HAS_MASK:
        masked = tl.load(masked_ptr + cols, mask=in_row, other=0) != 0
        z = tl.where(masked, MASKED, z)
    return tl.where(in_row, z, float("-inf"))


@triton.jit
def lse_tile_kernel(z_ptr, p_ptr, masked_ptr, tcol_ptr, m_ptr, s_ptr, a_ptr, zt_ptr, alpha_ptr, COLS, stride_z,
                     stride_p, softcap, MASKED: tl.constexpr, HAS_CAP: tl.constexpr, HAS_MASK: tl.constexpr,
                     WANT_P: tl.constexpr, WANT_A: tl.constexpr, BLOCK: tl.constexpr):
    """One tile row's online log-sum-exp update (``reference.cross_entropy.lse_tile``, the same formulas).

    Pass 1 finds the row's maximum (and its target logit), pass 2 adds ``exp(z − m_new)`` to the running sum
    (rescaled by ``alpha = exp(m_old − m_new)``), ``Σ exp(z − m_new)·z`` for the entropy, and writes
    ``P = exp(z − m_new)·cap'`` over the tile (or into ``p_ptr``) for the accumulator GEMM. Reads the tile
    twice, writes it once; the soft-cap is recomputed, never stored.
    """
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    tcol = tl.load(tcol_ptr + row)
    m_old = tl.load(m_ptr + row)
    zt = tl.load(zt_ptr + row)
    top = tl.max(tl.full((BLOCK,), float("-inf"), tl.float32), 0)
    for c0 in range(0, COLS, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        z = _tile_logits(z_row, cols, cols < COLS, masked_ptr, softcap, MASKED, HAS_CAP, HAS_MASK)
        top = tl.maximum(top, tl.max(z, 0))
        zt = tl.where((tcol >= c0) & (tcol < c0 + BLOCK), tl.sum(tl.where(cols == tcol, z, 0.0), 0), zt)
    m_new = tl.maximum(m_old, top)
    alpha = tl.exp(m_old - m_new)
    total = 0.0
    weighted = 0.0
    for c0 in range(0, COLS, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        in_row = cols < COLS
        z = _tile_logits(z_row, cols, in_row, masked_ptr, softcap, MASKED, HAS_CAP, HAS_MASK)
        e = tl.where(in_row, tl.exp(z - m_new), 0.0)
        total += tl.sum(e, 0)
        if WANT_A:
            weighted += tl.sum(e * tl.where(in_row, z, 0.0), 0)  # 0·(-inf) past the row would be NaN
        if WANT_P:
            p = e
            if HAS_CAP:
                t = tl.minimum(tl.maximum(z / softcap, -1.0), 1.0)
                p = e * (1.0 - t * t)
            tl.store(p_ptr + row * stride_p + cols, p.to(p_ptr.dtype.element_ty), mask=in_row)
    tl.store(s_ptr + row, tl.load(s_ptr + row) * alpha + total)
    if WANT_A:
        tl.store(a_ptr + row, tl.load(a_ptr + row) * alpha + weighted)
    tl.store(m_ptr + row, m_new)
    tl.store(zt_ptr + row, zt)
    tl.store(alpha_ptr + row, alpha)
