# R rows (routed + shared), H hidden, I expert width, E experts, Gh scale group over H, BM/BN/BK tile sizes, NT tiles
"""Triton kernel: the first grouped GEMM of the fused Int4 MoE (``l4::moe_q_fused``), input scaling and SwiGLU
epilogue as ``moe_gate_up``, on packed Int4 weights (``l4compile.quant.quantize_int4``, nn.Linear orientation).

For every row r of tile ``program_id(0)`` (layout: ``l4compile.kernels.layout.moe_rows``) and output columns
``program_id(1) * BN ..`` of the expert width::

    z     = (x[row_tok[r]] * row_scale[r]).to(x.dtype)            # the score scales the expert INPUT
    Wg[n, k] = (nibble(gate_q[n, k // 2], k % 2) - 8) * gate_s[n, k // Gh]     (float32, then .to(x.dtype))
    gate  = z @ Wg^T,  up = z @ Wu^T                               # fp32 accumulation, rounded to x.dtype
    act[r] = (up * silu(gate).to(x.dtype)).to(x.dtype)             # rounding as l4::moe_q's reference does

with (gate_q, up_q) = rows [0, I) and [I, 2I) of ``gate_up_q[e]`` ([E, 2I, H/2]; scales likewise) for a routed
group e < E, and ``shared_gate_q``, ``shared_up_q`` ([I, H/2], same strides) for the shared group E. Each program
loads every packed [BN, BK/2] weight block once and unpacks it in registers (``int4_mm.int4_tile``, or as words
with one FFMA a weight: ``FMA_UNPACK``, ``int4_mm.int4_fma_dot``); ``SCALE_PER_BLOCK``, ``SCALE_WORDS`` (K steps of
2G) and ``DOT_F32`` as in ``int4_mm``; ``BF16X2`` (bf16 on sm_90, I % BN == H % BK == 0) unpacks with
``int4_mm``'s inline PTX instead (``int4_pairs_bf16``), a sweep candidate not yet run on a GPU.

Split-K (``split_k.py``): program (t, j, s) of S = ``n_split`` reduces inputs [s * K_SPLIT, (s + 1) * K_SPLIT) of H
into float32 gate and up partials; the SwiGLU needs the whole sums, so the tile's last program adds them and runs
the epilogue. At a decode step the grid is 2 tiles x I / BN (256 programs at Scout width, 20 K steps each).

``MAP_IN_KERNEL`` (top-1, unsplit): a 1-token step's tiles come from its router logits (``moe_route.tile_span``,
``tile_tokens``; program (0, 0, 0) writes routed_row), not from the route kernel's map, which then does not run.
T is never specialised (``do_not_specialize``), so an eager launch compiles what an engine does.

Shapes: x [T, H]; gate_up_q [E, 2I, H/2] uint8, gate_up_s [E, 2I, H/Gh]; shared_gate_q/shared_up_q [I, H/2] uint8,
shared_gate_s/shared_up_s [I, H/Gh]; row_tok [R] int32; row_scale [R] f32; tile_group/tile_row0/tile_row_end [NT]
int32; act [R, I] (x.dtype); part [S, R, 2I] float32 (gate sums, then up sums) and lock [NT * cdiv(I, BN)] int32
zeros (both flat, unused when S = 1); logits [T, E], routed_row [T] int64. Grid: (NT, cdiv(I, BN), S).
``FUSE_NORM``: every program also zeroes its share of the n_cnt int32 counters at cnt, which the down launch
after it counts tokens on (``moe_norm.py``).
"""
import triton
import triton.language as tl

from .int4_mm import int4_fma_dot, int4_pairs_bf16, int4_tile, pick_scale, scale_pair, x_pairs
from .moe_gate_up import scale_rows, swiglu_store
from .moe_route import tile_span, tile_tokens
from .split_k import split_k_arrive, split_k_sum, zero_words


@triton.jit
def _qdot_pair(x_ptr, stride_xt, stride_xh, tok, scale, rmask, wg_ptr, sg_ptr, wu_ptr, su_ptr,
               stride_wn, stride_wk, stride_sn, stride_sg, cols, cmask, H, G: tl.constexpr, k_lo, k_hi,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SCALE_PER_BLOCK: tl.constexpr,
               SCALE_WORDS: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr, BF16X2: tl.constexpr,
               FMA_UNPACK: tl.constexpr):
    """Accumulate (z @ Wg^T, z @ Wu^T) over inputs [k_lo, k_hi) of H for one tile -> two [BM, BN] float32 blocks.
    ``BF16X2``: the weights come as even and odd bf16 tiles (``int4_mm.int4_pairs_bf16``, sm_90 PTX) and meet z's
    even and odd inputs. ``FMA_UNPACK``: as word-loaded tiles of every eighth input (``int4_mm.int4_fma_dot``)."""
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    ks = tl.arange(0, BLOCK_K)
    STEP: tl.constexpr = 2 * G if SCALE_WORDS else BLOCK_K                      # inputs a step (int4_mm.scale_pair)
    smask = cols >= 0 if BF16X2 else cmask                                       # BF16X2: I % BN == 0, unmasked
    for k_step in range(k_lo, k_hi, STEP):
        g_even, g_odd = scale_pair(sg_ptr, cols, smask, k_step, G, stride_sn, stride_sg, SCALE_PER_BLOCK, SCALE_WORDS)
        u_even, u_odd = scale_pair(su_ptr, cols, smask, k_step, G, stride_sn, stride_sg, SCALE_PER_BLOCK, SCALE_WORDS)
        for u in tl.static_range(STEP // BLOCK_K):
            k0 = k_step + u * BLOCK_K
            sg = pick_scale(g_even, g_odd, u, G, BLOCK_K)
            su = pick_scale(u_even, u_odd, u, G, BLOCK_K)
            if BF16X2:
                xe, xo = x_pairs(x_ptr, tok, rmask, k0, stride_xt, stride_xh, BLOCK_K)     # [BM, BK/2] each
                ze = scale_rows(xe, scale, DOT_F32)                              # input-side scaling
                zo = scale_rows(xo, scale, DOT_F32)
                ge, go = int4_pairs_bf16(wg_ptr, cols, k0, sg, stride_wn, stride_wk, BLOCK_N, BLOCK_K)
                ue, uo = int4_pairs_bf16(wu_ptr, cols, k0, su, stride_wn, stride_wk, BLOCK_N, BLOCK_K)
                acc_g = tl.dot(ze, tl.trans(ge), acc_g)
                acc_g = tl.dot(zo, tl.trans(go), acc_g)
                acc_u = tl.dot(ze, tl.trans(ue), acc_u)
                acc_u = tl.dot(zo, tl.trans(uo), acc_u)
            else:
                k = k0 + ks                                                       # [BK]
                xt = tl.load(x_ptr + tok[:, None] * stride_xt + k[None, :] * stride_xh,
                             mask=rmask[:, None] & (k < H)[None, :], other=0.0)     # [BM, BK]
                z = scale_rows(xt, scale, DOT_F32)                               # input-side scaling
                if FMA_UNPACK:
                    acc_g = int4_fma_dot(acc_g, z, wg_ptr, cols, cmask, k0, stride_wn, sg, BLOCK_K, PRECISION,
                                         DOT_F32)
                    acc_u = int4_fma_dot(acc_u, z, wu_ptr, cols, cmask, k0, stride_wn, su, BLOCK_K, PRECISION,
                                         DOT_F32)
                else:              # not int4_mm.int4_block_dot twice: both byte tiles before both dots (tile, dot,
                                   # tile, dot left this loop 8 bytes of stack at 168 registers, sm_90a, 3.7.1)
                    wg = tl.trans(int4_tile(wg_ptr, sg_ptr, cols, cmask, k0, H, G, stride_wn, stride_wk, stride_sn,
                                            stride_sg, sg, BLOCK_N, BLOCK_K, SCALE_PER_BLOCK).to(xt.dtype))  # [BK, BN]
                    wu = tl.trans(int4_tile(wu_ptr, su_ptr, cols, cmask, k0, H, G, stride_wn, stride_wk, stride_sn,
                                            stride_sg, su, BLOCK_N, BLOCK_K, SCALE_PER_BLOCK).to(xt.dtype))
                    if DOT_F32:                                                  # interpreter: exact same products
                        z, wg, wu = z.to(tl.float32), wg.to(tl.float32), wu.to(tl.float32)
                    acc_g = tl.dot(z, wg, acc_g, input_precision=PRECISION)
                    acc_u = tl.dot(z, wu, acc_u, input_precision=PRECISION)
    return acc_g, acc_u


@triton.jit(do_not_specialize=["T"])     # one variant eager or in an engine (tile_span's T = 1)
def moe_int4_gate_up_kernel(x_ptr, gu_q_ptr, gu_s_ptr, sg_q_ptr, sg_s_ptr, su_q_ptr, su_s_ptr, act_ptr, part_ptr,
                            lock_ptr, row_tok_ptr, row_scale_ptr, tile_group_ptr, tile_row0_ptr, tile_row_end_ptr,
                            H, I, E, G: tl.constexpr, K_SPLIT, n_split,
                            stride_xt, stride_xh, stride_qe, stride_qn, stride_qk, stride_se, stride_sn, stride_sg,
                            stride_shqn, stride_shqk, stride_shsn, stride_shsg, stride_ar, stride_ai,
                            stride_ps, stride_pr, stride_pi, logits_ptr, routed_row_ptr, T, stride_le, cnt_ptr, n_cnt,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            SCALE_PER_BLOCK: tl.constexpr, SCALE_WORDS: tl.constexpr, PRECISION: tl.constexpr,
                            DOT_F32: tl.constexpr, BF16X2: tl.constexpr, FMA_UNPACK: tl.constexpr,
                            MAP_IN_KERNEL: tl.constexpr, BLOCK_G: tl.constexpr, FUSE_NORM: tl.constexpr):
    tile = tl.program_id(0)
    grp, row0, row_end, mapped, score = tile_span(tile, tile_group_ptr, tile_row0_ptr, tile_row_end_ptr, logits_ptr,
                                                  T, E, stride_le, MAP_IN_KERNEL, BLOCK_G)
    if grp <= E:                                                                 # grp == E + 1: unused tile
        rows = row0 + tl.arange(0, BLOCK_M)                                      # [BM]
        rmask = rows < row_end
        tok, scale = tile_tokens(row_tok_ptr, row_scale_ptr, routed_row_ptr, rows, rmask, mapped, score)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)               # [BN] in [0, I)
        cmask = cols < I
        split = tl.program_id(2)
        k_lo = split * K_SPLIT
        k_hi = tl.minimum(k_lo + K_SPLIT, H)
        if grp == E:                                                             # shared expert [I, H/2]
            acc_g, acc_u = _qdot_pair(x_ptr, stride_xt, stride_xh, tok, scale, rmask, sg_q_ptr, sg_s_ptr, su_q_ptr,
                                      su_s_ptr, stride_shqn, stride_shqk, stride_shsn, stride_shsg, cols, cmask, H, G,
                                      k_lo, k_hi, BLOCK_M, BLOCK_N, BLOCK_K, SCALE_PER_BLOCK, SCALE_WORDS, PRECISION,
                                      DOT_F32, BF16X2, FMA_UNPACK)
        else:                                                                    # routed expert [2I, H/2]
            wq = gu_q_ptr + grp.to(tl.int64) * stride_qe
            ws = gu_s_ptr + grp.to(tl.int64) * stride_se
            acc_g, acc_u = _qdot_pair(x_ptr, stride_xt, stride_xh, tok, scale, rmask, wq, ws, wq + I * stride_qn,
                                      ws + I * stride_sn, stride_qn, stride_qk, stride_sn, stride_sg, cols, cmask, H, G,
                                      k_lo, k_hi, BLOCK_M, BLOCK_N, BLOCK_K, SCALE_PER_BLOCK, SCALE_WORDS, PRECISION,
                                      DOT_F32, BF16X2, FMA_UNPACK)
        if n_split == 1:
            swiglu_store(acc_g, acc_u, act_ptr, rows, cols, rmask, cmask, stride_ar, stride_ai)
        else:                                                                    # part[s]: gate | up columns
            offs = rows[:, None] * stride_pr + cols[None, :] * stride_pi
            mask = rmask[:, None] & cmask[None, :]
            tl.store(part_ptr + split * stride_ps + offs, acc_g, mask=mask)
            tl.store(part_ptr + split * stride_ps + I * stride_pi + offs, acc_u, mask=mask)
            if split_k_arrive(lock_ptr + tile * tl.num_programs(1) + tl.program_id(1), n_split):
                gate = split_k_sum(part_ptr, stride_ps, offs, mask, n_split, BLOCK_M, BLOCK_N)
                up = split_k_sum(part_ptr + I * stride_pi, stride_ps, offs, mask, n_split, BLOCK_M, BLOCK_N)
                swiglu_store(gate, up, act_ptr, rows, cols, rmask, cmask, stride_ar, stride_ai)
    if FUSE_NORM:                            # the down launch's token counters (moe_norm.py), zeroed last
        zero_words(cnt_ptr, n_cnt, 64)
