# R rows (routed + shared), H hidden, I expert width, E experts, Gi scale group over I, BM/BN/BK tile sizes, NT tiles
"""Triton kernel: the second grouped GEMM of the fused Int4 MoE (``l4::moe_q_fused``, down projection) on packed
Int4 weights, one output row per input row, as ``moe_down``.

For every row r of tile ``program_id(0)`` and hidden columns ``program_id(1) * BN ..``::

    Wd[n, k] = (nibble(down_q[n, k // 2], k % 2) - 8) * down_s[n, k // Gi]     (float32, then .to(act.dtype))
    y[r] = (act[r] @ Wd^T).to(y.dtype)                                         # fp32 accumulation

with (down_q, down_s) = ``down_q[e]``, ``down_s[e]`` ([E, H, I/2], [E, H, I/Gi]) for a routed group e < E and
``shared_down_q``, ``shared_down_s`` ([H, I/2], [H, I/Gi]) for the shared group E: both nn.Linear orientation, so
one tile routine for both. Packed blocks load once and unpack in registers (``int4_mm.int4_tile``, or as words with
one FFMA a weight: ``FMA_UNPACK``, ``int4_mm.int4_fma_dot``); scales as words in K steps of 2G (``SCALE_WORDS``) as
in ``int4_mm``.
Rows stay in the grouped order; the caller adds each token's routed rows onto its shared row (``ops.combine_rows``).

``BF16X2`` (bf16 on sm_90, H % BN == I % BK == 0): ``int4_mm``'s inline-PTX unpack (``int4_pairs_bf16``), a sweep
candidate not yet run on a GPU.

Split-K as ``int4_mm`` (``split_k.py``): program (t, j, s) of S = ``n_split`` reduces inputs [s * K_SPLIT,
(s + 1) * K_SPLIT) of I (K_SPLIT a multiple of the K step); the tile's last program adds the float32 partials and
rounds.

``MAP_IN_KERNEL`` as in ``moe_int4_gate_up``: a 1-token step's tiles from its logits (``moe_route.tile_span``).
``FUSE_NORM`` as in ``moe_down``: the program that stores a tile of y (its split-K sum's, where it splits) counts it.

Shapes: act [R, I]; down_q [E, H, I/2] uint8, down_s [E, H, I/Gi]; shared_down_q [H, I/2] uint8, shared_down_s
[H, I/Gi]; tile_group/tile_row0/tile_row_end [NT] int32; y [R, H]; part [S, R, H] float32 and lock
[NT * cdiv(H, BN)] int32 zeros (both flat, unused when S = 1); logits [T, E].
Grid: (NT, cdiv(H, BN), S).
"""
import triton
import triton.language as tl

from .int4_mm import int4_block_dot, int4_pairs_bf16, pick_scale, scale_pair, x_pairs
from .moe_norm import down_epilogue
from .moe_route import tile_span
from .split_k import split_k_store


@triton.jit
def _qdown_tile(a_ptr, stride_ar, stride_ai, rows, rmask, wq_ptr, ws_ptr, stride_wn, stride_wk, stride_sn, stride_sg,
                cols, cmask, I, G: tl.constexpr, k_lo, k_hi, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, SCALE_PER_BLOCK: tl.constexpr, SCALE_WORDS: tl.constexpr,
                PRECISION: tl.constexpr, DOT_F32: tl.constexpr, BF16X2: tl.constexpr, FMA_UNPACK: tl.constexpr):
    """act rows @ Wd^T over inputs [k_lo, k_hi) of I for one tile -> [BM, BN] float32. ``BF16X2``: the weights as
    even and odd bf16 tiles (``int4_mm.int4_pairs_bf16``, sm_90 PTX) against act's even and odd inputs.
    ``FMA_UNPACK``: as word-loaded tiles of every eighth input (``int4_mm.int4_fma_dot``)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    ks = tl.arange(0, BLOCK_K)
    STEP: tl.constexpr = 2 * G if SCALE_WORDS else BLOCK_K                      # inputs a step (int4_mm.scale_pair)
    smask = cols >= 0 if BF16X2 else cmask                                       # BF16X2: H % BN == 0, unmasked
    for k_step in range(k_lo, k_hi, STEP):
        s_even, s_odd = scale_pair(ws_ptr, cols, smask, k_step, G, stride_sn, stride_sg, SCALE_PER_BLOCK, SCALE_WORDS)
        for u in tl.static_range(STEP // BLOCK_K):
            k0 = k_step + u * BLOCK_K
            sc = pick_scale(s_even, s_odd, u, G, BLOCK_K)
            if BF16X2:
                ae, ao = x_pairs(a_ptr, rows, rmask, k0, stride_ar, stride_ai, BLOCK_K)  # [BM, BK/2] each
                we, wo = int4_pairs_bf16(wq_ptr, cols, k0, sc, stride_wn, stride_wk, BLOCK_N, BLOCK_K)
                acc = tl.dot(ae, tl.trans(we), acc)
                acc = tl.dot(ao, tl.trans(wo), acc)
            else:
                k = k0 + ks                                                       # [BK] in [0, I)
                a = tl.load(a_ptr + rows[:, None] * stride_ar + k[None, :] * stride_ai,
                            mask=rmask[:, None] & (k < I)[None, :], other=0.0)      # [BM, BK]
                acc = int4_block_dot(acc, a, wq_ptr, ws_ptr, cols, cmask, k0, I, G, stride_wn, stride_wk, stride_sn,
                                     stride_sg, sc, BLOCK_N, BLOCK_K, SCALE_PER_BLOCK, PRECISION, DOT_F32, FMA_UNPACK)
    return acc


@triton.jit(do_not_specialize=["T"])     # one variant eager or in an engine (tile_span's T = 1)
def moe_int4_down_kernel(act_ptr, dq_ptr, ds_ptr, sdq_ptr, sds_ptr, y_ptr, part_ptr, lock_ptr, tile_group_ptr,
                         tile_row0_ptr, tile_row_end_ptr, H, I, E, G: tl.constexpr, K_SPLIT, n_split,
                         stride_ar, stride_ai, stride_qe, stride_qn, stride_qk, stride_se, stride_sn, stride_sg,
                         stride_shqn, stride_shqk, stride_shsn, stride_shsg, stride_yr, stride_yh,
                         stride_ps, stride_pr, stride_ph, logits_ptr, T, stride_le,
                         cnt_ptr, row_tok_ptr, routed_row_ptr, res_ptr, nw_ptr, h_ptr, xo_ptr, eps, stride_rt,
                         stride_ht, stride_xt,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         SCALE_PER_BLOCK: tl.constexpr, SCALE_WORDS: tl.constexpr, PRECISION: tl.constexpr,
                         DOT_F32: tl.constexpr, BF16X2: tl.constexpr, FMA_UNPACK: tl.constexpr,
                         MAP_IN_KERNEL: tl.constexpr, BLOCK_G: tl.constexpr, FUSE_NORM: tl.constexpr,
                         NORM_T: tl.constexpr, HN: tl.constexpr, BLOCK_HN: tl.constexpr):
    tile = tl.program_id(0)
    grp, row0, row_end, mapped, _ = tile_span(tile, tile_group_ptr, tile_row0_ptr, tile_row_end_ptr, logits_ptr,
                                              T, E, stride_le, MAP_IN_KERNEL, BLOCK_G)
    if grp <= E:                                                                 # grp == E + 1: unused tile
        rows = row0 + tl.arange(0, BLOCK_M)                                      # [BM]
        rmask = rows < row_end
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)               # [BN] in [0, H)
        cmask = cols < H
        split = tl.program_id(2)
        k_lo = split * K_SPLIT
        k_hi = tl.minimum(k_lo + K_SPLIT, I)
        if grp == E:                                                             # shared expert [H, I/2]
            acc = _qdown_tile(act_ptr, stride_ar, stride_ai, rows, rmask, sdq_ptr, sds_ptr, stride_shqn, stride_shqk,
                              stride_shsn, stride_shsg, cols, cmask, I, G, k_lo, k_hi, BLOCK_M, BLOCK_N, BLOCK_K,
                              SCALE_PER_BLOCK, SCALE_WORDS, PRECISION, DOT_F32, BF16X2, FMA_UNPACK)
        else:                                                                    # routed expert [H, I/2]
            acc = _qdown_tile(act_ptr, stride_ar, stride_ai, rows, rmask, dq_ptr + grp.to(tl.int64) * stride_qe,
                              ds_ptr + grp.to(tl.int64) * stride_se, stride_qn, stride_qk, stride_sn, stride_sg, cols,
                              cmask, I, G, k_lo, k_hi, BLOCK_M, BLOCK_N, BLOCK_K, SCALE_PER_BLOCK, SCALE_WORDS,
                              PRECISION, DOT_F32, BF16X2, FMA_UNPACK)
        stored = split_k_store(acc, y_ptr, rows[:, None] * stride_yr + cols[None, :] * stride_yh, part_ptr,
                               rows[:, None] * stride_pr + cols[None, :] * stride_ph, stride_ps,
                               rmask[:, None] & cmask[None, :], lock_ptr + tile * tl.num_programs(1) + tl.program_id(1),
                               split, n_split, BLOCK_M, BLOCK_N)
        if FUSE_NORM:
            if stored:                                                           # this program stored the tile of y
                down_epilogue(cnt_ptr, row_tok_ptr, rows, rmask, row0, mapped, y_ptr, stride_yr, stride_yh,
                              routed_row_ptr, res_ptr, stride_rt, nw_ptr, h_ptr, stride_ht, xo_ptr, stride_xt, T, eps,
                              NORM_T, BLOCK_M, HN, BLOCK_HN)
