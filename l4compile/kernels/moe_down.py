# R rows (routed + shared), H hidden, I expert width, E experts, BM/BN/BK tile sizes, NT tiles
"""Triton kernel: the second grouped GEMM of the fused MoE (down projection), one output row per input row.

For every row r of tile ``program_id(0)`` and hidden columns ``program_id(1) * BN ..``::

    y[r] = (act[r] @ Wd).to(y.dtype)          # fp32 accumulation

with Wd = ``down[e]`` ([E, I, H], HF layout) for a routed group e < E and ``shared_down^T`` ([H, I] nn.Linear)
for the shared group E. Rows stay in the grouped order; the caller adds each token's routed rows onto its shared
row (``ops.combine_rows``, a gather).

``MAP_IN_KERNEL`` as in ``moe_gate_up``: a 1-token step's tiles from its logits (``moe_route.tile_span``).

``FUSE_NORM`` (top-1): the combine, the residual add after the MoE and the next RMSNorm in this launch at steps of up
to NORM_T tokens (``moe_norm.py``: h_out / xo, from the residual res and the norm's weight nw; counters cnt zeroed by
the gate_up launch).

Shapes: act [R, I]; down [E, I, H]; shared_down [H, I]; tile_group/tile_row0/tile_row_end [NT] int32;
y [R, H]; logits [T, E]. Grid: (NT, cdiv(H, BN)).
"""
import triton
import triton.language as tl

from .moe_norm import down_epilogue
from .moe_route import tile_span


@triton.jit
def _down_tile(a_ptr, stride_ar, stride_ai, rows, rmask, w_ptr, stride_wk, stride_wn, cols, cmask, I,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
               DOT_F32: tl.constexpr):
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    ks = tl.arange(0, BLOCK_K)
    for k0 in range(0, I, BLOCK_K):
        k = k0 + ks                                                               # [BK] in [0, I)
        kmask = k < I
        a = tl.load(a_ptr + rows[:, None] * stride_ar + k[None, :] * stride_ai,
                    mask=rmask[:, None] & kmask[None, :], other=0.0)                # [BM, BK]
        w = tl.load(w_ptr + k[:, None] * stride_wk + cols[None, :] * stride_wn,
                    mask=kmask[:, None] & cmask[None, :], other=0.0)                # [BK, BN]
        if DOT_F32:                                                              # interpreter (see moe_gate_up)
            a, w = a.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    return acc


@triton.jit(do_not_specialize=["T"])     # one variant eager or in an engine (moe_route.tile_span's T = 1)
def moe_down_kernel(act_ptr, down_ptr, sd_ptr, y_ptr, tile_group_ptr, tile_row0_ptr, tile_row_end_ptr,
                    H, I, E,
                    stride_ar, stride_ai, stride_de, stride_di, stride_dh, stride_sh, stride_si,
                    stride_yr, stride_yh, logits_ptr, T, stride_le,
                    cnt_ptr, row_tok_ptr, routed_row_ptr, res_ptr, nw_ptr, h_ptr, xo_ptr, eps, stride_rt, stride_ht,
                    stride_xt,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    PRECISION: tl.constexpr, DOT_F32: tl.constexpr, MAP_IN_KERNEL: tl.constexpr,
                    BLOCK_G: tl.constexpr, FUSE_NORM: tl.constexpr, NORM_T: tl.constexpr, HN: tl.constexpr,
                    BLOCK_HN: tl.constexpr):
    tile = tl.program_id(0)
    grp, row0, row_end, mapped, _ = tile_span(tile, tile_group_ptr, tile_row0_ptr, tile_row_end_ptr, logits_ptr,
                                              T, E, stride_le, MAP_IN_KERNEL, BLOCK_G)
    if grp <= E:                                                                 # grp == E + 1: unused tile
        rows = row0 + tl.arange(0, BLOCK_M)                                      # [BM]
        rmask = rows < row_end
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)               # [BN] in [0, H)
        cmask = cols < H
        if grp == E:                                                             # shared expert, nn.Linear [H, I]
            acc = _down_tile(act_ptr, stride_ar, stride_ai, rows, rmask, sd_ptr, stride_si, stride_sh, cols, cmask,
                             I, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, DOT_F32)
        else:                                                                    # routed expert, [I, H]
            acc = _down_tile(act_ptr, stride_ar, stride_ai, rows, rmask, down_ptr + grp.to(tl.int64) * stride_de,
                             stride_di, stride_dh, cols, cmask, I, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, DOT_F32)
        tl.store(y_ptr + rows[:, None] * stride_yr + cols[None, :] * stride_yh, acc.to(y_ptr.dtype.element_ty),
                 mask=rmask[:, None] & cmask[None, :])
        if FUSE_NORM:
            down_epilogue(cnt_ptr, row_tok_ptr, rows, rmask, row0, mapped, y_ptr, stride_yr, stride_yh, routed_row_ptr,
                          res_ptr, stride_rt, nw_ptr, h_ptr, stride_ht, xo_ptr, stride_xt, T, eps, NORM_T, BLOCK_M,
                          HN, BLOCK_HN)
