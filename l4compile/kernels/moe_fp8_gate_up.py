# R rows (routed + shared), H hidden, I expert width, E experts, BM/BN/BK tile sizes, NT tiles
"""Triton kernel: the first grouped GEMM of the fused FP8 MoE (``l4::moe_fp8_fused``), input scaling and SwiGLU
epilogue as ``moe_gate_up``, on float8_e4m3fn weights with per-output-channel scales (``l4compile.quant.quantize_fp8``,
nn.Linear orientation) and the dynamic per-row FP8 activation quantization of ``l4::linear_fp8`` (``fp8_rows``).

For every row r of tile ``program_id(0)`` (layout: ``l4compile.kernels.layout.moe_rows``) and output columns
``program_id(1) * BN ..`` of the expert width::

    z      = (x[row_tok[r]] * row_scale[r]).to(x.dtype)           # the score scales the expert INPUT
    s, q   = per-row scale and float8 values of z                  (fp8_rows: s = max|z| / 448)
    gate   = ((q @ gate_q^T) * s * gate_s).to(x.dtype),  up likewise     (fp32 accumulation)
    act[r] = (up * silu(gate).to(x.dtype)).to(x.dtype)             # rounding as l4::moe_q's reference does

with (gate_q, up_q) = rows [0, I) and [I, 2I) of ``gate_up_q[e]`` ([E, 2I, H]; scales [E, 2I]) for a routed group
e < E, and ``shared_gate_q``, ``shared_up_q`` ([I, H], same strides; scales [I]) for the shared group E.

``MAP_IN_KERNEL`` (top-1): a 1-token step's tiles come from its router logits (``moe_route.tile_span``,
``tile_tokens``), as in ``moe_gate_up``: a batch-1 decode step needs no route launch.

Shapes: x [T, H]; gate_up_q [E, 2I, H] float8_e4m3fn, gate_up_s [E, 2I]; shared_gate_q/shared_up_q [I, H] float8,
shared_gate_s/shared_up_s [I]; row_tok [R] int32; row_scale [R] f32; tile_group/tile_row0/tile_row_end [NT] int32;
act [R, I] (x.dtype); logits [T, E], routed_row [T] int64. Grid: (NT, cdiv(I, BN)).
``FUSE_NORM``: every program also zeroes its share of the n_cnt int32 counters at cnt, which the down launch
after it counts tokens on (``moe_norm.py``).
"""
import triton
import triton.language as tl

from .fp8_rows import fp8_dot, quantize, rows_scale, scaled_rows, weight_tile
from .moe_gate_up import swiglu_store
from .moe_route import tile_span, tile_tokens
from .split_k import zero_words


@triton.jit
def _fp8_dot_pair(x_rows, stride_xh, scale, rmask, wg_ptr, wu_ptr, stride_wn, stride_wk, cols, cmask, H,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FP8_DOT: tl.constexpr,
                  DOT_F32: tl.constexpr, EMULATE_FP8: tl.constexpr):
    """(q @ Wg^T, q @ Wu^T) for one tile -> two [BM, BN] float32 blocks, and the rows' scales s [BM]."""
    s = rows_scale(x_rows, scale, rmask, H, stride_xh, BLOCK_M, BLOCK_K)
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    ks = tl.arange(0, BLOCK_K)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + ks                                                               # [BK]
        q = quantize(scaled_rows(x_rows, scale, rmask, k, H, stride_xh), s, FP8_DOT, DOT_F32, EMULATE_FP8)
        acc_g = fp8_dot(q, weight_tile(wg_ptr, cols, cmask, k, H, stride_wn, stride_wk, FP8_DOT, DOT_F32), acc_g,
                        BLOCK_K, FP8_DOT)
        acc_u = fp8_dot(q, weight_tile(wu_ptr, cols, cmask, k, H, stride_wn, stride_wk, FP8_DOT, DOT_F32), acc_u,
                        BLOCK_K, FP8_DOT)
    return acc_g, acc_u, s


@triton.jit(do_not_specialize=["T"])     # one variant eager or in an engine (moe_route.tile_span's T = 1)
def moe_fp8_gate_up_kernel(x_ptr, gu_q_ptr, gu_s_ptr, sg_q_ptr, sg_s_ptr, su_q_ptr, su_s_ptr, act_ptr,
                           row_tok_ptr, row_scale_ptr, tile_group_ptr, tile_row0_ptr, tile_row_end_ptr,
                           H, I, E,
                           stride_xt, stride_xh, stride_qe, stride_qn, stride_qk, stride_se, stride_sn,
                           stride_shqn, stride_shqk, stride_shs, stride_ar, stride_ai, logits_ptr, routed_row_ptr,
                           T, stride_le, cnt_ptr, n_cnt,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           FP8_DOT: tl.constexpr, DOT_F32: tl.constexpr, EMULATE_FP8: tl.constexpr,
                           MAP_IN_KERNEL: tl.constexpr, BLOCK_G: tl.constexpr, FUSE_NORM: tl.constexpr):
    tile = tl.program_id(0)
    grp, row0, row_end, mapped, score = tile_span(tile, tile_group_ptr, tile_row0_ptr, tile_row_end_ptr, logits_ptr,
                                                  T, E, stride_le, MAP_IN_KERNEL, BLOCK_G)
    if grp <= E:                                                                 # grp == E + 1: unused tile
        rows = row0 + tl.arange(0, BLOCK_M)                                      # [BM]
        rmask = rows < row_end
        tok, scale = tile_tokens(row_tok_ptr, row_scale_ptr, routed_row_ptr, rows, rmask, mapped, score)
        x_rows = x_ptr + tok.to(tl.int64) * stride_xt                           # [BM] row pointers
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)               # [BN] in [0, I)
        cmask = cols < I
        if grp == E:                                                             # shared expert [I, H]
            acc_g, acc_u, s = _fp8_dot_pair(x_rows, stride_xh, scale, rmask, sg_q_ptr, su_q_ptr, stride_shqn,
                                            stride_shqk, cols, cmask, H, BLOCK_M, BLOCK_N, BLOCK_K, FP8_DOT, DOT_F32,
                                            EMULATE_FP8)
            sg = tl.load(sg_s_ptr + cols * stride_shs, mask=cmask, other=0.0).to(tl.float32)
            su = tl.load(su_s_ptr + cols * stride_shs, mask=cmask, other=0.0).to(tl.float32)
        else:                                                                    # routed expert [2I, H]
            wq = gu_q_ptr + grp.to(tl.int64) * stride_qe
            acc_g, acc_u, s = _fp8_dot_pair(x_rows, stride_xh, scale, rmask, wq, wq + I * stride_qn, stride_qn,
                                            stride_qk, cols, cmask, H, BLOCK_M, BLOCK_N, BLOCK_K, FP8_DOT, DOT_F32,
                                            EMULATE_FP8)
            ws = gu_s_ptr + grp.to(tl.int64) * stride_se
            sg = tl.load(ws + cols * stride_sn, mask=cmask, other=0.0).to(tl.float32)
            su = tl.load(ws + (I + cols) * stride_sn, mask=cmask, other=0.0).to(tl.float32)
        swiglu_store(acc_g * s[:, None] * sg[None, :], acc_u * s[:, None] * su[None, :], act_ptr, rows, cols, rmask,
                     cmask, stride_ar, stride_ai)
    if FUSE_NORM:                            # the down launch's token counters (moe_norm.py), zeroed last
        zero_words(cnt_ptr, n_cnt, 64)
