# B batch, T new tokens, L cache slots, Hq / Hkv query / kv heads, R = Hq/Hkv, M = R*T rows, D head_dim,
# S key splits, BM / BN / BD tile sizes
"""Triton kernels: ``l4::attention_cached``'s attention over the cache and the new keys, without concatenating them.

The reference (``l4compile.ops.attention``) attends every query to ``cat(cache, new keys)`` under a [R*T, L+T]
boolean mask: at decode it copies the whole cache once per step and reads it twice, and a cache sized for 8K
slots is read whole however short the sequence is. Here keys are addressed by POSITION: the keys a block of
queries can see are the positions ``[k_lo, k_hi]``

    k_lo = max(0, start - L, chunk_start(start + t_min))      k_hi = start + t_max

(position p < start lives in cache slot p mod L, position p >= start is new key p - start), so a step reads only
the keys that are visible (a decode step at position p: p + 1 of them in a global layer, p mod chunk + 1 in a
chunked one) and never the empty slots.
Visibility inside the range is the reference's: key p visible to query q iff p <= q and, for chunked layers,
p // chunk == q // chunk.

GQA: the R query heads of kv head g are folded into the rows (row i: head g*R + i // T, token i % T), so K/V are
loaded once per group. The key range is cut into S splits (flash-decoding) so that a decode step, which has one
row block per (batch, kv head), still fills the GPU; each split writes its normalised partial output and
log-sum-exp in float32 and ``attention_combine_kernel`` merges them into [B, T, Hq*D] (with one split, as prefill
and large batches get, the partial kernel writes the output and there is nothing to merge). Softmax and
accumulation are float32, in base 2 (exp2 of the unscaled score times scaling * log2(e): scaling must be > 0), P is
rounded to V's dtype for the second dot (as flash attention does). Only the key tiles that some row must not see
(the diagonal, a chunk start, a split's ragged end) are masked.
For ``l4::attention_fused_inplace`` the partial kernel also applies the layer's query transform to the q tile it
loads (ROPE: RoPE of interleaved pairs from the cos / sin tables at each row's position, then with QK_NORM the
weightless RMS norm; TEMP: the NoPE temperature), as ``ops.attention._project`` does, and ``attention_combine_kernel``
(WRITE) writes the T new keys and values into the caches, in place (slot = position mod L), once the partial kernel
has read the cache: neither the query transform nor the cache update costs a launch of its own. k comes
transformed: each program reads new keys, and transforming them there would redo it per row block and split. A CUDA
Int4 engine's qkv GEMM transforms q too, in its epilogue (``k_rope.py``), and launches this kernel with no query
transform (ROPE, QK_NORM and TEMP off): its bf16 and FP8 engines, whose qkv is cuBLAS / ``_scaled_mm``, keep it.
``l4::attention_fused_chained`` (MERGE: a CUDA engine's step, its launches chained by zeroed counters) also moves
the merge and the cache write into the partial kernel when S > 1, so that a decode step's attention is one launch
(the combine's grid is then empty; with one split the combine launch writes the caches, as before).

Shapes (strides are passed, so transposed views need no copy):
    q [B, Hq, T, D]; k_new / v_new [B, Hkv, T, D]; k_cache / v_cache [B, Hkv, L, D]; start [1] int64;
    cos / sin [P, D/2] float32 (the in-place op)
    o_part [S, B, Hkv, M, D] float32, lse_part [S, B, Hkv, M] float32 (S = 0 rows when S = 1: unused); out [B, T, Hq*D]
    lock [>= (cdiv(M, BM) + 1) * B*Hkv] int32 zeros, next [next_words] int32 (MERGE)
Grids: partial (cdiv(M, BM), B*Hkv, S), its programs one tile of DECODE_M rows when M <= DECODE_M (decode);
combine (cdiv(M, DECODE_M), B*Hkv) when S > 1 (empty with MERGE); else (cdiv(T, DECODE_M), B*Hkv) for the cache
write alone with WRITE, and empty without.
"""
import triton
import triton.language as tl

from .split_k import split_k_arrive, zero_words


@triton.jit
def attention_partial_kernel(q_ptr, kn_ptr, vn_ptr, kc_ptr, vc_ptr, start_ptr, o_ptr, lse_ptr, out_ptr,
                             cos_ptr, sin_ptr, T, L, D, HKV, REP, CHUNK, N_SPLIT, scaling, floor_scale, attn_scale,
                             eps, sqb, sqh, sqt, sqd, snb, snh, snt, snd, svnb, svnh, svnt, svnd,
                             scb, sch, scl, scd, svcb, svch, svcl, svcd,
                             sos, sob, soh, som, sod, sls, slb, slh, slm, syb, syt, syh, syd, sc0, sc1, ss0, ss1,
                             lock_ptr, next_ptr, next_words,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                             PRECISION: tl.constexpr, DOT_F32: tl.constexpr, DECODE_M: tl.constexpr,
                             ROPE: tl.constexpr, QK_NORM: tl.constexpr, TEMP: tl.constexpr, MERGE: tl.constexpr,
                             BLOCK_S: tl.constexpr, STAGES: tl.constexpr):
    """One (row block, batch x kv head, split) program. A step whose M = REP * T rows all fit DECODE_M (<= BLOCK_M;
    a decode step: 5 rows for Scout) runs them as one DECODE_M-row tile: the grid, sized for BLOCK_M, has one row
    block then, and at decode BM 16 beat BM 64 by 4-26% in every row timed on the 2026-12-04 H200.

    MERGE (``l4::attention_fused_chained``), when S > 1: the combine's work without its launch. The last of a row
    block's S programs to store its partials (counter ``lock[pid_m * B*Hkv + pid_bh]``, ``split_k.split_k_arrive``)
    merges them into ``out``; the last of a (batch, kv head)'s row-block mergers (``lock[row blocks * B*Hkv +
    pid_bh]``; a decode step has one row block, so its merger) writes the T new keys and values into the caches,
    after every program that reads that (batch, kv head)'s cache has arrived. With S = 1 nothing changes: the
    combine launch writes the caches. ``lock``: zeroed counters, left zeros; every program also zeroes its share of
    ``next`` [next_words] int32, the next chained launch's counters."""
    pid_m, pid_bh, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if REP * T <= DECODE_M:
        _attend_rows(q_ptr, kn_ptr, vn_ptr, kc_ptr, vc_ptr, start_ptr, o_ptr, lse_ptr, out_ptr, cos_ptr, sin_ptr,
                     pid_bh, pid_s, T, L, D, HKV, REP, CHUNK, N_SPLIT, scaling, floor_scale, attn_scale, eps,
                     sqb, sqh, sqt, sqd, snb, snh, snt, snd, svnb, svnh, svnt, svnd,
                     scb, sch, scl, scd, svcb, svch, svcl, svcd,
                     sos, sob, soh, som, sod, sls, slb, slh, slm, syb, syt, syh, syd, sc0, sc1, ss0, ss1, 0,
                     DECODE_M, BLOCK_N, BLOCK_D, PRECISION, DOT_F32, ROPE, QK_NORM, TEMP)
    else:
        _attend_rows(q_ptr, kn_ptr, vn_ptr, kc_ptr, vc_ptr, start_ptr, o_ptr, lse_ptr, out_ptr, cos_ptr, sin_ptr,
                     pid_bh, pid_s, T, L, D, HKV, REP, CHUNK, N_SPLIT, scaling, floor_scale, attn_scale, eps,
                     sqb, sqh, sqt, sqd, snb, snh, snt, snd, svnb, svnh, svnt, svnd,
                     scb, sch, scl, scd, svcb, svch, svcl, svcd,
                     sos, sob, soh, som, sod, sls, slb, slh, slm, syb, syt, syh, syd, sc0, sc1, ss0, ss1,
                     pid_m * BLOCK_M, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION, DOT_F32, ROPE, QK_NORM, TEMP)
    if MERGE:
        if N_SPLIT > 1:
            bh_count = tl.num_programs(1)
            if split_k_arrive(lock_ptr + pid_m * bh_count + pid_bh, N_SPLIT):        # this row block's splits are in
                b, g = (pid_bh // HKV).to(tl.int64), (pid_bh % HKV).to(tl.int64)
                dd = tl.arange(0, BLOCK_D)
                tile = DECODE_M if REP * T <= DECODE_M else BLOCK_M
                _merge_splits(o_ptr, lse_ptr, out_ptr, b, g, pid_m * tile, pid_m * tile + tile, dd, T, D, REP,
                              N_SPLIT, sos, sob, soh, som, sod, sls, slb, slh, slm, syb, syt, syh, syd, BLOCK_S,
                              STAGES)
                blocks = tl.num_programs(0)
                last = blocks == 1
                if blocks > 1:          # the last row block of this (batch, kv head) to be merged
                    last = split_k_arrive(lock_ptr + blocks * bh_count + pid_bh, blocks)
                if last:                # every program that reads this (batch, kv head)'s cache has arrived
                    start = tl.load(start_ptr).to(tl.int32)
                    for t0 in range(0, T, DECODE_M):
                        _write_new_rows(kn_ptr, vn_ptr, kc_ptr, vc_ptr, b, g, t0 + tl.arange(0, DECODE_M), dd, start,
                                        T, L, D, snb, snh, snt, snd, svnb, svnh, svnt, svnd, scb, sch, scl, scd,
                                        svcb, svch, svcl, svcd)
        zero_words(next_ptr, next_words, 128)                                    # the next launch's counters


@triton.jit
def _attend_rows(q_ptr, kn_ptr, vn_ptr, kc_ptr, vc_ptr, start_ptr, o_ptr, lse_ptr, out_ptr, cos_ptr, sin_ptr,
                 pid_bh, pid_s, T, L, D, HKV, REP, CHUNK, N_SPLIT, scaling, floor_scale, attn_scale, eps,
                 sqb, sqh, sqt, sqd, snb, snh, snt, snd, svnb, svnh, svnt, svnd,
                 scb, sch, scl, scd, svcb, svch, svcl, svcd,
                 sos, sob, soh, som, sod, sls, slb, slh, slm, syb, syt, syh, syd, sc0, sc1, ss0, ss1, row0,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
                 ROPE: tl.constexpr, QK_NORM: tl.constexpr, TEMP: tl.constexpr):
    """Rows row0 .. row0 + BLOCK_M - 1 of (batch, kv head) ``pid_bh``, keys of split ``pid_s``: the partial kernel's
    body for one tile height."""
    b, g = (pid_bh // HKV).to(tl.int64), (pid_bh % HKV).to(tl.int64)     # base offsets past 2**31 (64K caches)
    M = REP * T
    rows = row0 + tl.arange(0, BLOCK_M)                                          # [BM]
    rmask = rows < M
    t = rows % T                                                                 # [BM] token of each row
    head = g * REP + rows // T                                                   # [BM] query head
    dd = tl.arange(0, BLOCK_D)                                                   # [BD]
    dmask = dd < D
    start = tl.load(start_ptr).to(tl.int32)                                      # positions < 2**31: i32 offsets
    qpos = start + t                                                             # [BM] absolute positions
    scale = tl.cast(scaling, tl.float32)     # Inductor types a Python float argument fp64: keep the scores fp32
    scale2 = scale * 1.4426950408889634      # scores in base 2: exp(x * scale) = exp2(x * scale2)
    qmask = rmask[:, None] & dmask[None, :]
    q_row = q_ptr + b * sqb + head[:, None] * sqh + t[:, None] * sqt             # [BM, 1]
    q = tl.load(q_row + dd[None, :] * sqd, mask=qmask, other=0.0)               # [BM, BD]
    if ROPE:
        q = _rope_rows(q, tl.load(q_row + (dd ^ 1)[None, :] * sqd, mask=qmask, other=0.0), qpos, dd, qmask,
                       cos_ptr, sin_ptr, sc0, sc1, ss0, ss1)
        if QK_NORM:
            q = _rms_rows(q, D, eps)
    elif TEMP:                                                                   # as _project: NoPE layers only
        q = _temperature_rows(q, qpos, floor_scale, attn_scale)

    # The positions any row of this block can see, then this split's share of them (a multiple of BN).
    q_lo = start + tl.min(tl.where(rmask, t, T - 1), axis=0)
    k_hi = start + tl.max(tl.where(rmask, t, 0), axis=0) + 1                      # exclusive
    k_lo = tl.maximum(start - L, 0)
    row_lo = tl.zeros_like(qpos)                                                 # [BM] each row's first visible key
    if CHUNK > 0:
        row_lo = (qpos // CHUNK) * CHUNK                                          # p // C == q // C, p <= q
        k_lo = tl.maximum(k_lo, (q_lo // CHUNK) * CHUNK)
    per = tl.cdiv(tl.cdiv(k_hi - k_lo, N_SPLIT), BLOCK_N) * BLOCK_N
    s_lo = k_lo + pid_s * per
    s_hi = tl.maximum(tl.minimum(s_lo + per, k_hi), s_lo)                       # empty past the keys
    # Tiles [u_lo, u_hi) hold keys every row of the block sees (from the last row's chunk start to the first row's
    # own position, inside the split): they skip the mask. Tiles of [s_lo, u_lo) (a block across a chunk start) and
    # [u_hi, s_hi) (the diagonal, the split's ragged end) take it. One loop over all of them, in key order, keeps
    # one software pipeline (its loads run ahead across the boundary; two loops, masked then unmasked, each waited
    # out its first loads, and kept the second loop's first addresses live across the first: a 72-byte spill in
    # the variant without a q transform).
    blk_lo = tl.max(tl.where(rmask, row_lo, 0), axis=0)
    u_lo = tl.minimum(s_lo + tl.cdiv(tl.maximum(blk_lo - s_lo, 0), BLOCK_N) * BLOCK_N, s_hi)
    u_hi = tl.maximum(s_lo + (tl.maximum(tl.minimum(q_lo + 1, s_hi) - s_lo, 0) // BLOCK_N) * BLOCK_N, u_lo)
    wrap = start % L                                    # a cached key's slot: (start + j) mod L, j in [-L, 0)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)                  # row maxima of the unscaled scores
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    kc, kn = kc_ptr + b * scb + g * sch, kn_ptr + b * snb + g * snh             # this (batch, kv head)'s keys
    vc, vn = vc_ptr + b * svcb + g * svch, vn_ptr + b * svnb + g * svnh
    for p0 in range(s_lo, s_hi, BLOCK_N):
        m_i, l_i, acc = _attend_tile(q, m_i, l_i, acc, p0, s_hi, start, wrap, qpos, row_lo, rmask, dd, dmask,
                                     scale2, kc, kn, vc, vn, L, scl, scd, snt, snd, svcl, svcd, svnt, svnd,
                                     (p0 < u_lo) | (p0 >= u_hi), BLOCK_N, PRECISION, DOT_F32)

    seen = l_i > 0.0
    o = acc / tl.where(seen, l_i, 1.0)[:, None]
    omask = rmask[:, None] & dmask[None, :]
    if N_SPLIT == 1:                  # one split (prefill, large batches): the output itself, no partials to merge
        tl.store(out_ptr + b * syb + t[:, None] * syt + head[:, None] * syh + dd[None, :] * syd,
                 o.to(out_ptr.dtype.element_ty), mask=omask)
    else:
        lse = tl.where(seen, m_i * scale + tl.log(tl.where(seen, l_i, 1.0)), float("-inf"))
        split = pid_s.to(tl.int64)
        tl.store(o_ptr + split * sos + b * sob + g * soh + rows[:, None] * som + dd[None, :] * sod, o, mask=omask)
        tl.store(lse_ptr + split * sls + b * slb + g * slh + rows * slm, lse, mask=rmask)


@triton.jit
def _attend_tile(q, m_i, l_i, acc, p0, s_hi, start, wrap, qpos, row_lo, rmask, dd, dmask, scale2, k_cache, k_new,
                 v_cache, v_new, L, scl, scd, snt, snd, svcl, svcd, svnt, svnd, masked, BLOCK_N: tl.constexpr,
                 PRECISION: tl.constexpr, DOT_F32: tl.constexpr):
    """Keys p0 .. p0 + BN - 1 into the running softmax of q [BM, BD] at positions qpos [BM]: m_i [BM] (the largest
    unscaled score so far), l_i [BM], acc [BM, BD]. Position p < start is cache slot (wrap + p - start) mod L,
    p >= start new key p - start (``k_cache`` / ``k_new``: the (batch, kv head)'s bases). ``masked`` (a scalar,
    a branch): key p is visible to row r iff p < s_hi, row r is valid and row_lo[r] <= p <= qpos[r] (row_lo: its
    chunk's start, or 0); else the tile holds keys every row sees. Scores go to base 2 (scale2 = scale * log2(e)
    > 0), so a score costs one FFMA and one EX2. The loop this replaced took 1583 SASS instructions a tile at BM 64
    and 735 at the 16-row decode tile (sm_90a, Triton 3.7.1: integer division for the chunk test and the slot, the
    mask, exp's range fix-ups); now an unmasked tile takes 613 and 503, a masked one 838 and 559."""
    kp = p0 + tl.arange(0, BLOCK_N)                                              # [BN] key positions
    j = kp - start                                                               # new key j, or cached (j < 0)
    cached = j < 0
    slot = wrap + j
    slot = tl.where(slot < 0, slot + L, slot)
    # one load per tile: each key's pointer into the cache (slot) or into the new keys (j)
    c2, d2 = cached[:, None], dd[None, :]
    kmask = (kp < s_hi)[:, None] & dmask[None, :]
    k = tl.load(tl.where(c2, k_cache + slot[:, None] * scl + d2 * scd, k_new + j[:, None] * snt + d2 * snd),
                mask=kmask, other=0.0)
    v = tl.load(tl.where(c2, v_cache + slot[:, None] * svcl + d2 * svcd, v_new + j[:, None] * svnt + d2 * svnd),
                mask=kmask, other=0.0)
    qd, kd = q, tl.trans(k)
    if DOT_F32:                                                                  # interpreter (see moe_gate_up)
        qd, kd = qd.to(tl.float32), kd.to(tl.float32)
    s = tl.dot(qd, kd, input_precision=PRECISION)                                # [BM, BN] float32, unscaled
    if masked:
        vis = (kp[None, :] <= qpos[:, None]) & (kp[None, :] >= row_lo[:, None])
        vis = vis & (kp < s_hi)[None, :] & rmask[:, None]
        s = tl.where(vis, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))                                   # unscaled (scale2 > 0)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)                        # rows that see nothing yet
    p = tl.math.exp2(s * scale2 - (m_safe * scale2)[:, None])                    # exp((s - m) * scale)
    alpha = tl.math.exp2((m_i - m_safe) * scale2)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    pv, vd = p.to(v.dtype), v
    if DOT_F32:
        pv, vd = pv.to(tl.float32), vd.to(tl.float32)
    acc = acc * alpha[:, None] + tl.dot(pv, vd, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _rope_rows(x, partner, pos, dd, mask, cos_ptr, sin_ptr, sc0, sc1, ss0, ss1):
    """x [BM, BD] rows at positions pos [BM], partner = x at column dd ^ 1 -> RoPE-rotated interleaved pairs, in
    float32 and rounded to x's dtype, as ``ops.attention._rope``: (x0 c - x1 s, x0 s + x1 c) for pair j, with
    c, s = cos / sin[pos, j]."""
    j = (dd // 2)[None, :]
    c = tl.load(cos_ptr + pos[:, None] * sc0 + j * sc1, mask=mask, other=0.0)
    s = tl.load(sin_ptr + pos[:, None] * ss0 + j * ss1, mask=mask, other=0.0)
    xf, pf = x.to(tl.float32), partner.to(tl.float32)
    return tl.where((dd % 2 == 0)[None, :], xf * c - pf * s, pf * s + xf * c).to(x.dtype)


@triton.jit
def _rms_rows(x, D, eps):
    """x [BM, BD] (zero past D) -> each row over its D columns times rsqrt(mean(x^2) + eps), in float32 and rounded
    to x's dtype, as ``ops.attention._rms``."""
    xf = x.to(tl.float32)
    ms = tl.sum(xf * xf, axis=1) / D
    return (xf * tl.math.rsqrt(ms + tl.cast(eps, tl.float32))[:, None]).to(x.dtype)


@triton.jit
def _temperature_rows(x, pos, floor_scale, attn_scale):
    """NoPE layers' query temperature: x [BM, BD] rows at positions pos [BM] times
    1 + attn_scale * log(1 + floor((pos + 1) / floor_scale)), in float32 and rounded to x's dtype. The reference's
    log1p of an integer: log of 1 + it, which is exact in float32 (Triton has no log1p)."""
    n = tl.floor((pos.to(tl.float32) + 1.0) / tl.cast(floor_scale, tl.float32))
    scale = tl.log(1.0 + n) * tl.cast(attn_scale, tl.float32) + 1.0
    return (x.to(tl.float32) * scale[:, None]).to(x.dtype)


@triton.jit
def attention_combine_kernel(o_ptr, lse_ptr, out_ptr, kn_ptr, vn_ptr, kc_ptr, vc_ptr, start_ptr, T, L, D, HKV, REP,
                             N_SPLIT, sos, sob, soh, som, sod, sls, slb, slh, slm, syb, syt, syh, syd,
                             snb, snh, snt, snd, svnb, svnh, svnt, svnd, scb, sch, scl, scd, svcb, svch, svcl, svcd,
                             BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
                             STAGES: tl.constexpr, WRITE: tl.constexpr):
    """Program (pid_m, batch x kv head): with WRITE, writes new tokens pid_m * BLOCK_M .. + BLOCK_M - 1 into the
    caches (``_write_new_rows``); then, with S > 1, merges the S splits' partials of rows pid_m * BLOCK_M ..
    + BLOCK_M - 1 (``_merge_splits``). A chained launch (MERGE) does both in its partial kernel when S > 1, and this
    launch's grid is then empty.

    The cache write runs here, after the partial kernel has read every cached key it needs (stream order): written
    there, a new key could overwrite a ring slot that another program still reads. In a graph this replaces the two
    cache-write kernels an engine had.

    The merge takes a row's S splits in one load. Before (until 2026-12-07), a max pass and then a sum pass waited
    out their loads one split at a time: 3 S round trips to L2, 96 at S = 32, which at 0.1-0.15 us each would be most
    of the 15-19 us a decode step's attention took on the H200 at position 511 (a count, not a profile); then one
    pipelined pass over the splits, ~11 round trips at S = 32."""
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, g = (pid_bh // HKV).to(tl.int64), (pid_bh % HKV).to(tl.int64)
    dd = tl.arange(0, BLOCK_D)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)            # [BM] new tokens for the write, rows for the merge
    if WRITE:
        _write_new_rows(kn_ptr, vn_ptr, kc_ptr, vc_ptr, b, g, rows, dd, tl.load(start_ptr).to(tl.int32), T, L, D,
                        snb, snh, snt, snd, svnb, svnh, svnt, svnd, scb, sch, scl, scd, svcb, svch, svcl, svcd)
    if N_SPLIT > 1:                   # else the partial kernel wrote the output
        _merge_splits(o_ptr, lse_ptr, out_ptr, b, g, pid_m * BLOCK_M, pid_m * BLOCK_M + BLOCK_M, dd, T, D, REP,
                      N_SPLIT, sos, sob, soh, som, sod, sls, slb, slh, slm, syb, syt, syh, syd, BLOCK_S, STAGES)


@triton.jit
def _write_new_rows(kn_ptr, vn_ptr, kc_ptr, vc_ptr, b, g, rows, dd, start, T, L, D, snb, snh, snt, snd,
                    svnb, svnh, svnt, svnd, scb, sch, scl, scd, svcb, svch, svcl, svcd):
    """New tokens ``rows`` [BM] of (batch b, kv head g) into the caches: token t to slot (start + t) mod L, only the
    last L tokens when T > L (each slot then written once, by the last token that maps to it: the reference's
    index_copy)."""
    wmask = ((rows < T) & (rows >= T - L))[:, None] & (dd < D)[None, :]
    slot = (start + rows) % L
    t2, s2, d2 = rows[:, None], slot[:, None], dd[None, :]
    k = tl.load(kn_ptr + b * snb + g * snh + t2 * snt + d2 * snd, mask=wmask)
    tl.store(kc_ptr + b * scb + g * sch + s2 * scl + d2 * scd, k.to(kc_ptr.dtype.element_ty), mask=wmask)
    v = tl.load(vn_ptr + b * svnb + g * svnh + t2 * svnt + d2 * svnd, mask=wmask)
    tl.store(vc_ptr + b * svcb + g * svch + s2 * svcl + d2 * svcd, v.to(vc_ptr.dtype.element_ty), mask=wmask)


@triton.jit
def _merge_splits(o_ptr, lse_ptr, out_ptr, b, g, row_lo, row_hi, dd, T, D, REP, N_SPLIT, sos, sob, soh, som, sod,
                  sls, slb, slh, slm, syb, syt, syh, syd, BLOCK_S: tl.constexpr, STAGES: tl.constexpr):
    """Rows row_lo .. row_hi - 1 of (batch b, kv head g): the S splits' partials merged into ``out``, a row at a time
    with every split at once: the row's [S, D] partial outputs and [S] log-sum-exps in one load (BLOCK_S >= S), so a
    row costs one round trip to L2, and the rows' loads depend on the row alone (the loop is software-pipelined,
    STAGES - 1 rows ahead). A decode step's 5 rows (Scout) at S = 32 were 32 dependent split steps with the loop
    over splits (3 in flight: ~11 round trips). The loads are ``.cg`` (L2): in the partial kernel (MERGE) the
    partials were stored by other programs of the same launch. Every split stored its o: zeros where it saw no key,
    with lse -inf (weight 0); a valid row always sees its own key, so some split has a finite lse."""
    ss = tl.arange(0, BLOCK_S)
    smask = ss < N_SPLIT
    dmask = dd < D
    for r in tl.range(row_lo, tl.minimum(row_hi, REP * T), num_stages=STAGES):
        lse = tl.load(lse_ptr + ss * sls + b * slb + g * slh + r * slm, mask=smask, other=float("-inf"),
                      cache_modifier=".cg")                                      # [S]
        o = tl.load(o_ptr + ss[:, None] * sos + b * sob + g * soh + r * som + dd[None, :] * sod,
                    mask=smask[:, None] & dmask[None, :], other=0.0, cache_modifier=".cg")   # [S, D]
        m = tl.max(lse, axis=0)
        w = tl.exp(lse - tl.where(m == float("-inf"), 0.0, m))                  # [S], 0 for an empty split
        den = tl.sum(w, axis=0)
        out = tl.sum(w[:, None] * o, axis=0) / tl.where(den > 0.0, den, 1.0)     # [D]
        t, head = r % T, g * REP + r // T
        tl.store(out_ptr + b * syb + t * syt + head * syh + dd * syd, out.to(out_ptr.dtype.element_ty), mask=dmask)
