# R rows (routed + shared), H hidden, I expert width, E experts, BM/BN/BK tile sizes, NT tiles
"""Triton kernel: the second grouped GEMM of the fused FP8 MoE (``l4::moe_fp8_fused``, down projection) on float8
weights with per-channel scales, each act row quantized per row as ``l4::linear_fp8`` does (``fp8_rows``); one
output row per input row, as ``moe_down``.

For every row r of tile ``program_id(0)`` and hidden columns ``program_id(1) * BN ..``::

    s, q  = per-row scale and float8 values of act[r]             (fp8_rows: s = max|act[r]| / 448)
    y[r]  = ((q @ down_q^T) * s * down_s).to(y.dtype)             (fp32 accumulation)

with (down_q, down_s) = ``down_q[e]``, ``down_s[e]`` ([E, H, I], [E, H]) for a routed group e < E and
``shared_down_q``, ``shared_down_s`` ([H, I], [H]) for the shared group E, both nn.Linear orientation. Rows stay in
the grouped order; the caller adds each token's routed rows onto its shared row (``ops.combine_rows``).

``MAP_IN_KERNEL`` as in ``moe_fp8_gate_up``: a 1-token step's tiles from its logits (``moe_route.tile_span``).

Shapes: act [R, I]; down_q [E, H, I] float8_e4m3fn, down_s [E, H]; shared_down_q [H, I] float8, shared_down_s [H];
tile_group/tile_row0/tile_row_end [NT] int32; y [R, H]; logits [T, E]. Grid: (NT, cdiv(H, BN)).
"""
import triton
import triton.language as tl

from .fp8_rows import fp8_dot, quantize, rows_scale, scaled_rows, weight_tile
from .moe_norm import down_epilogue
from .moe_route import tile_span


@triton.jit
def _fp8_down_tile(a_rows, stride_ai, ones, rmask, wq_ptr, stride_wn, stride_wk, cols, cmask, I,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FP8_DOT: tl.constexpr,
                   DOT_F32: tl.constexpr, EMULATE_FP8: tl.constexpr):
    """q(act rows) @ Wd^T for one tile -> [BM, BN] float32, and the rows' scales s [BM]."""
    s = rows_scale(a_rows, ones, rmask, I, stride_ai, BLOCK_M, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    ks = tl.arange(0, BLOCK_K)
    for k0 in range(0, I, BLOCK_K):
        k = k0 + ks                                                               # [BK] in [0, I)
        q = quantize(scaled_rows(a_rows, ones, rmask, k, I, stride_ai), s, FP8_DOT, DOT_F32, EMULATE_FP8)
        acc = fp8_dot(q, weight_tile(wq_ptr, cols, cmask, k, I, stride_wn, stride_wk, FP8_DOT, DOT_F32), acc,
                      BLOCK_K, FP8_DOT)
    return acc, s


@triton.jit(do_not_specialize=["T"])     # one variant eager or in an engine (moe_route.tile_span's T = 1)
def moe_fp8_down_kernel(act_ptr, dq_ptr, ds_ptr, sdq_ptr, sds_ptr, y_ptr, tile_group_ptr, tile_row0_ptr,
                        tile_row_end_ptr, H, I, E,
                        stride_ar, stride_ai, stride_qe, stride_qn, stride_qk, stride_se, stride_sn,
                        stride_shqn, stride_shqk, stride_shs, stride_yr, stride_yh, logits_ptr, T, stride_le,
                        cnt_ptr, row_tok_ptr, routed_row_ptr, res_ptr, nw_ptr, h_ptr, xo_ptr, eps, stride_rt,
                        stride_ht, stride_xt,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        FP8_DOT: tl.constexpr, DOT_F32: tl.constexpr, EMULATE_FP8: tl.constexpr,
                        MAP_IN_KERNEL: tl.constexpr, BLOCK_G: tl.constexpr, FUSE_NORM: tl.constexpr,
                        NORM_T: tl.constexpr, HN: tl.constexpr, BLOCK_HN: tl.constexpr):
    tile = tl.program_id(0)
    grp, row0, row_end, mapped, _ = tile_span(tile, tile_group_ptr, tile_row0_ptr, tile_row_end_ptr, logits_ptr,
                                              T, E, stride_le, MAP_IN_KERNEL, BLOCK_G)
    if grp <= E:                                                                 # grp == E + 1: unused tile
        rows = row0 + tl.arange(0, BLOCK_M)                                      # [BM]
        rmask = rows < row_end
        a_rows = act_ptr + rows.to(tl.int64) * stride_ar                        # [BM] row pointers
        ones = tl.full((BLOCK_M,), 1.0, tl.float32)                             # act is already scaled
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)               # [BN] in [0, H)
        cmask = cols < H
        if grp == E:                                                             # shared expert [H, I]
            acc, s = _fp8_down_tile(a_rows, stride_ai, ones, rmask, sdq_ptr, stride_shqn, stride_shqk, cols, cmask,
                                    I, BLOCK_M, BLOCK_N, BLOCK_K, FP8_DOT, DOT_F32, EMULATE_FP8)
            ws = tl.load(sds_ptr + cols * stride_shs, mask=cmask, other=0.0).to(tl.float32)
        else:                                                                    # routed expert [H, I]
            acc, s = _fp8_down_tile(a_rows, stride_ai, ones, rmask, dq_ptr + grp.to(tl.int64) * stride_qe, stride_qn,
                                    stride_qk, cols, cmask, I, BLOCK_M, BLOCK_N, BLOCK_K, FP8_DOT, DOT_F32,
                                    EMULATE_FP8)
            ws = tl.load(ds_ptr + grp.to(tl.int64) * stride_se + cols * stride_sn, mask=cmask, other=0.0)
            ws = ws.to(tl.float32)
        tl.store(y_ptr + rows[:, None] * stride_yr + cols[None, :] * stride_yh,
                 (acc * s[:, None] * ws[None, :]).to(y_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])
        if FUSE_NORM:
            down_epilogue(cnt_ptr, row_tok_ptr, rows, rmask, row0, mapped, y_ptr, stride_yr, stride_yh, routed_row_ptr,
                          res_ptr, stride_rt, nw_ptr, h_ptr, stride_ht, xo_ptr, stride_xt, T, eps, NORM_T, BLOCK_M,
                          HN, BLOCK_HN)
