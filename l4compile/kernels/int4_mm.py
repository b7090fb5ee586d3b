# M rows (tokens), N output features, K input features, G scale group, BM/BN/BK tile sizes
"""Triton kernel: weight-only Int4 GEMM / decode GEMV on the quantize pass's packing (``l4compile.quant``).

    w[n, k] = (nibble(w_packed[n, k // 2], k % 2) - 8) * w_scale[n, k // G]     low nibble = even k
    y[m, n] = sum_k x[m, k] * w[n, k].to(x.dtype)                               fp32 accumulation

exactly ``l4::linear_int4``'s reference (dequantize in float32, round to x.dtype, matmul). Each program loads a
[BN, BK/2] block of packed bytes once (half a byte per weight from HBM), splits it into the two nibbles with
``tl.join`` (interleaved back into k order), scales and feeds tensor cores with a [BM, BK] x [BK, BN] dot.
A nibble q becomes the float q - 8 without an int-to-float conversion (a quarter-rate unit on Hopper): OR-ed into
the mantissa of 2**23 it is the float 2**23 + q exactly, and subtracting 2**23 + 8 is exact too. At Scout's q_proj
(sm_90 SASS, ``benchmarks/kernels_sm90.py --ops``) that took the K loop of ``int4_mm_kernel`` from 590 instructions
with 64 I2F to 539 without (64 weights a thread an iteration: ~8.4 instructions a weight).
``int4_tile`` (that load + unpack + scale) is shared with the fused Int4 MoE kernels (``moe_int4_*``).

Scales: with ``SCALE_PER_BLOCK`` (BK divides G, K blocks aligned) one scale per row per K block is loaded;
otherwise (small or odd groups, e.g. G = 6) scales are gathered per element.

``DOT_F32``: see ``moe_gate_up`` (set only under the CPU interpreter, for bf16).

Split-K: program (i, j, s) reduces inputs [s * K_SPLIT, (s + 1) * K_SPLIT) (K_SPLIT a multiple of BK, so K blocks
stay aligned to the scale groups) and stores its float32 partial sum into y[s]; the caller adds the S partials and
rounds once (``int4_matmul``). A decode GEMV has few output tiles (N / BN programs), each looping over all of K:
on an H200 that loop, not the weight bytes, set the time (``benchmarks/results/gpu-NVIDIA-H200``); splitting K
multiplies the programs, and the loads in flight, by S. With S = 1, K_SPLIT = K and y is the output itself.

Shapes: x [M, K]; w_packed [N, K/2] uint8; w_scale [N, K/G]; y [M, N] (x.dtype), or [S, M, N] float32 partials.
Grid: (cdiv(M, BM), cdiv(N, BN), S).
"""
import triton
import triton.language as tl


@triton.jit
def int4_tile(w_ptr, s_ptr, rn, nmask, k0, K, G, stride_wn, stride_wk, stride_sn, stride_sg,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SCALE_PER_BLOCK: tl.constexpr):
    """Rows ``rn`` [BN] (valid where ``nmask``), inputs k0 .. k0+BK-1 of a packed weight -> [BN, BK] float32
    dequantized (not yet rounded); 0 where a row is masked or k >= K."""
    kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)                                   # [BK/2] byte index
    packed = tl.load(w_ptr + rn[:, None] * stride_wn + kb[None, :] * stride_wk,
                     mask=nmask[:, None] & (kb < K // 2)[None, :], other=0x88)  # [BN, BK/2] uint8
    p32 = packed.to(tl.int32)
    lo = ((p32 & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0       # 2**23 + q - (2**23 + 8)
    hi = ((p32 >> 4) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
    q = tl.reshape(tl.join(lo, hi), (BLOCK_N, BLOCK_K))                         # [BN, BK], k order
    if SCALE_PER_BLOCK:
        sc = tl.load(s_ptr + rn * stride_sn + (k0 // G) * stride_sg, mask=nmask, other=0.0)      # [BN]
        w = q * sc.to(tl.float32)[:, None]
    else:
        k = k0 + tl.arange(0, BLOCK_K)                                           # [BK]
        sc = tl.load(s_ptr + rn[:, None] * stride_sn + (k // G)[None, :] * stride_sg,
                     mask=nmask[:, None] & (k < K)[None, :], other=0.0)            # [BN, BK]
        w = q * sc.to(tl.float32)
    return w


@triton.jit
def int4_mm_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, G, K_SPLIT,
                   stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sg, stride_ys, stride_ym, stride_yn,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   SCALE_PER_BLOCK: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)                     # [BM]
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)                     # [BN]
    split = tl.program_id(2)
    mmask = rm < M
    nmask = rn < N
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_lo = split * K_SPLIT
    for k0 in range(k_lo, tl.minimum(k_lo + K_SPLIT, K), BLOCK_K):
        k = k0 + ks                                                              # [BK]
        xt = tl.load(x_ptr + rm[:, None] * stride_xm + k[None, :] * stride_xk,
                     mask=mmask[:, None] & (k < K)[None, :], other=0.0)            # [BM, BK]
        w = int4_tile(w_ptr, s_ptr, rn, nmask, k0, K, G, stride_wn, stride_wk, stride_sn, stride_sg,
                      BLOCK_N, BLOCK_K, SCALE_PER_BLOCK)                         # [BN, BK] float32
        wt = tl.trans(w.to(xt.dtype))                                            # [BK, BN], rounded like the reference
        if DOT_F32:                                                              # interpreter (see moe_gate_up)
            xt, wt = xt.to(tl.float32), wt.to(tl.float32)
        acc = tl.dot(xt, wt, acc, input_precision=PRECISION)
    tl.store(y_ptr + split * stride_ys + rm[:, None] * stride_ym + rn[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])
