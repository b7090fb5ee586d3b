# R rows (routed + shared), H hidden, I expert width, E experts, BM/BN/BK tile sizes, NT tiles
"""Triton kernel: the first grouped GEMM of the fused MoE, with input scaling and SwiGLU in the epilogue.

For every row r of tile ``program_id(0)`` (layout: ``l4compile.kernels.layout.moe_rows``) and output columns
``program_id(1) * BN ..`` of the expert width::

    z     = (x[row_tok[r]] * row_scale[r]).to(x.dtype)            # the score scales the expert INPUT
    gate  = z @ Wg,  up = z @ Wu                                   # fp32 accumulation, rounded to x.dtype
    act[r] = (up * silu(gate)).to(x.dtype)                         # rounding as the eager reference does

with (Wg, Wu) = ``gate_up[e, :, :I]``, ``gate_up[e, :, I:]`` ([E, H, 2I], HF layout, used as z @ W) for a
routed group e < E, and ``shared_gate^T``, ``shared_up^T`` ([I, H] nn.Linear weights) for the shared group E.

``DOT_F32`` feeds the dots float32 copies of the (exactly representable) bf16 operands: Triton 3.7's CPU
interpreter multiplies bf16 dot operands as raw integers, so tests under ``TRITON_INTERPRET=1`` set it; on a GPU it
is False and the dots run on bf16 tensor cores with the same fp32 accumulation.

``MAP_IN_KERNEL`` (top-1): a 1-token step's tiles come from its router logits (``moe_route.tile_span``,
``tile_tokens``; program (0, 0) writes routed_row), not from the route kernel's map, which then does not run. T is
never specialised (``do_not_specialize``), so an eager launch compiles what an engine does.

Shapes: x [T, H]; gate_up [E, H, 2I]; shared_gate, shared_up [I, H]; row_tok [R] int32; row_scale [R] f32;
tile_group/tile_row0/tile_row_end [NT] int32; act [R, I] (x.dtype); logits [T, E], routed_row [T] int64.
Grid: (NT, cdiv(I, BN)).
``FUSE_NORM``: every program also zeroes its share of the n_cnt int32 counters at cnt, which the down launch
after it counts tokens on (``moe_norm.py``).
"""
import triton
import triton.language as tl

from .moe_route import tile_span, tile_tokens
from .split_k import zero_words


@triton.jit
def _dot_pair(x_ptr, stride_xt, stride_xh, tok, scale, rmask, wg_ptr, wu_ptr, stride_wk, stride_wn, cols, cmask,
              H, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              PRECISION: tl.constexpr, DOT_F32: tl.constexpr):
    """Accumulate (z @ Wg, z @ Wu) for one tile -> two [BM, BN] float32 blocks."""
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    ks = tl.arange(0, BLOCK_K)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + ks                                                               # [BK]
        kmask = k < H
        xt = tl.load(x_ptr + tok[:, None] * stride_xt + k[None, :] * stride_xh,
                     mask=rmask[:, None] & kmask[None, :], other=0.0)               # [BM, BK]
        z = scale_rows(xt, scale, DOT_F32)                                           # input-side scaling
        woff = k[:, None] * stride_wk + cols[None, :] * stride_wn                    # [BK, BN]
        wmask = kmask[:, None] & cmask[None, :]
        wg = tl.load(wg_ptr + woff, mask=wmask, other=0.0)                          # [BK, BN]
        wu = tl.load(wu_ptr + woff, mask=wmask, other=0.0)
        if DOT_F32:                                                              # interpreter: exact same products
            z, wg, wu = z.to(tl.float32), wg.to(tl.float32), wu.to(tl.float32)
        acc_g = tl.dot(z, wg, acc_g, input_precision=PRECISION)
        acc_u = tl.dot(z, wu, acc_u, input_precision=PRECISION)
    return acc_g, acc_u


@triton.jit
def scale_rows(xt, scale, DOT_F32: tl.constexpr):
    """The input-side scaling of every grouped gate_up kernel: xt [BM, BK] rows of x, scale [BM] float32 -> z =
    (xt * scale[:, None]).to(xt.dtype), as the reference rounds it. A row's scale is a value of x's dtype (the
    router's score, rounded to it as ``_route`` and ``moe_route_kernel`` make it, or 1 for a shared row), so for a
    16-bit x the product of two 16-bit values, exact in float32 and rounded once, is what one multiply in x's dtype
    gives (sm_90a: HMUL2, two a register, no widening of x; the K loop of this kernel went from 258 to 178
    instructions, the Int4 gate_up's from 1471 to 1223 a step of two K blocks).
    ``DOT_F32`` (bf16 under the CPU interpreter, which has no bf16 arithmetic): the same product, widened."""
    if xt.dtype == tl.float32 or DOT_F32:
        return (xt.to(tl.float32) * scale[:, None]).to(xt.dtype)
    else:
        return xt * scale.to(xt.dtype)[:, None]


@triton.jit
def swiglu_store(gate, up, act_ptr, rows, cols, rmask, cmask, stride_ar, stride_ai):
    """The SwiGLU epilogue of every grouped gate_up kernel: gate, up [BM, BN] float32 GEMM results ->
    act[rows, cols] = (up * silu(gate)), each step rounded to act's dtype where the eager reference rounds it."""
    out_ty = act_ptr.dtype.element_ty
    gate = gate.to(out_ty).to(tl.float32)
    up = up.to(out_ty).to(tl.float32)
    silu = (gate * tl.sigmoid(gate)).to(out_ty).to(tl.float32)
    tl.store(act_ptr + rows[:, None] * stride_ar + cols[None, :] * stride_ai, (up * silu).to(out_ty),
             mask=rmask[:, None] & cmask[None, :])


@triton.jit(do_not_specialize=["T"])     # one variant eager or in an engine (moe_route.tile_span's T = 1)
def moe_gate_up_kernel(x_ptr, gate_up_ptr, sg_ptr, su_ptr, act_ptr,
                       row_tok_ptr, row_scale_ptr, tile_group_ptr, tile_row0_ptr, tile_row_end_ptr,
                       H, I, E,
                       stride_xt, stride_xh, stride_ge, stride_gh, stride_gn, stride_si, stride_sh,
                       stride_ar, stride_ai, logits_ptr, routed_row_ptr, T, stride_le, cnt_ptr, n_cnt,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       PRECISION: tl.constexpr, DOT_F32: tl.constexpr, MAP_IN_KERNEL: tl.constexpr,
                       BLOCK_G: tl.constexpr, FUSE_NORM: tl.constexpr):
    tile = tl.program_id(0)
    grp, row0, row_end, mapped, score = tile_span(tile, tile_group_ptr, tile_row0_ptr, tile_row_end_ptr, logits_ptr,
                                                  T, E, stride_le, MAP_IN_KERNEL, BLOCK_G)
    if grp <= E:                                                                 # grp == E + 1: unused tile
        rows = row0 + tl.arange(0, BLOCK_M)                                      # [BM]
        rmask = rows < row_end
        tok, scale = tile_tokens(row_tok_ptr, row_scale_ptr, routed_row_ptr, rows, rmask, mapped, score)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)               # [BN] in [0, I)
        cmask = cols < I
        if grp == E:                                                             # shared expert, nn.Linear [I, H]
            acc_g, acc_u = _dot_pair(x_ptr, stride_xt, stride_xh, tok, scale, rmask, sg_ptr, su_ptr,
                                     stride_sh, stride_si, cols, cmask, H, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, DOT_F32)
        else:                                                                    # routed expert, [H, 2I]
            wg = gate_up_ptr + grp.to(tl.int64) * stride_ge
            acc_g, acc_u = _dot_pair(x_ptr, stride_xt, stride_xh, tok, scale, rmask, wg, wg + I * stride_gn,
                                     stride_gh, stride_gn, cols, cmask, H, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, DOT_F32)
        swiglu_store(acc_g, acc_u, act_ptr, rows, cols, rmask, cmask, stride_ar, stride_ai)
    if FUSE_NORM:                            # the down launch's token counters (moe_norm.py), zeroed last
        zero_words(cnt_ptr, n_cnt, 64)
