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

``FMA_UNPACK`` (the float path wherever ``layout.fma_unpack`` allows: BK 128, bf16 scales, word-aligned packed rows,
so every Scout GEMM): the packed block loads as [BN, BK/8] int32 words, 8 nibbles each, and each weight costs an AND
and one FFMA (``int4_fma_words``, ``int4_fma_tile``: 1.0f's bits around the nibble make 1 + q * u, and
fma(f, s / u, -(1/u + 8) * s) is (q - 8) * s exactly), where the byte unpack spends a conversion, an OR, an FADD and
an FMUL a weight on bytes widened one by one. Tile j holds the weights of inputs 8m + j, so a K block is 8 dots of
BK/8 inputs against x's inputs j, j + 8, .. (``x_eighths``, split in registers), the MMAs one dot of BK would
issue. K loops (sm_90a, Triton 3.7.1, ``kernels_sm90.py --ops``), a step of two K blocks at BN 64: int4_mm 674
instructions against 1017, MoE gate_up 1223 against 1753, down 668 against 1026; the byte unpack stays for
everything else and as ``Int4Blocks(fma_unpack=False)``.

Scales: with ``SCALE_PER_BLOCK`` (BK divides G, K blocks aligned) one scale per row per K block is loaded;
otherwise (small or odd groups, e.g. G = 6) scales are gathered per element. ``SCALE_WORDS`` (16-bit scales, an even
number of groups a row: ``layout.scale_words``; Scout's Int4 weights) loads them as 32-bit words, a pair of groups
each (``scale_pair``), and the K loop steps 2G inputs, the blocks of a step unrolled so that each takes its half of
the word as a compile-time choice (``pick_scale``). Why: Triton software-pipelines only loads of >= 32 bits a thread
(cp.async into the loop's stages, iterations ahead). A 16-bit scale load stayed a synchronous load, so each K
iteration waited out one HBM round trip: the H200 timed int4_mm at ~0.75 us an iteration whatever the weight bytes
(q_proj, 12.9 MiB, and kv_proj, 2.6 MiB, both 30-32 us for 40 iterations) while the bf16 MoE, whose loads all
stage, ran at 59% of HBM bandwidth. A half chosen at run time (by the parity of k0 // G) would cost the dequantized
weights a round trip through shared memory on their way to the tensor cores: Triton's layout propagation stops at
it. At Scout's q_proj (BN 64, BK 128, sm_90): every K-loop load staged (``kernels_sm90.py``: ``loop_loads``), 1017
instructions a step of two blocks (508 a block, against 537 before) and no shared-memory store in the loop.

``DOT_F32``: see ``moe_gate_up`` (set only under the CPU interpreter, for bf16).

Split-K (``split_k.py``): program (i, j, s) of S = ``n_split`` reduces inputs [s * K_SPLIT, (s + 1) * K_SPLIT)
(K_SPLIT a multiple of the K step, so K blocks stay aligned to the scale groups); the last of a tile's S programs
adds the float32 partials in split order and rounds once. A decode GEMV has few output tiles (N / BN programs), each
looping over all of K: on an H200 that loop, not the weight bytes, set the time
(``benchmarks/results/gpu-NVIDIA-H200``); splitting K multiplies the programs, and the loads in flight, by S. With
S = 1, K_SPLIT = K (no partials).

The bf16x2 unpack (``int4_pairs_bf16``, used by ``int4_mm_bf16x2_kernel`` and the fused MoE's ``BF16X2`` loops):
bf16 x and bf16 scales on sm_90 only, in inline PTX. A ``prmt`` spreads two bytes over a word, ``lop3`` ORs a nibble
into each half's mantissa of 128.0 (bf16 0x4300 + q is 128 + q), one ``sub.bf16x2`` takes 136 off (q - 8, exact)
and one ``mul.bf16x2`` scales, which rounds once as the reference's float32 product does (exact) before its cast.
The even and odd weights of a K block come out as two [BN, BK/2] tiles, each dotted with the matching half of x
(``x_pairs``: one contiguous load of the x block, split in registers), so no weight is interleaved; N and K must
divide by BN and BK, so no weight load is masked. The K loop at Scout's q_proj (BN 64, BK 128): 244 instructions
against the float path's 539 (``kernels_sm90.py --ops``; 327 while x_pairs loaded x with two stride-2 gathers,
16 narrow loads and their address arithmetic a thread an iteration); 467 a step of two blocks against 1017 with
word-loaded scales. Not yet
run on a GPU: nothing selects it but an explicit ``Int4Blocks(bf16x2=True)`` (``bench_kernels.py`` sweeps it and
checks every result before timing it; the GPU tests compare it too).

``CHAIN`` (``l4::int4_mm_chained``): the launch also zeroes ``next`` [next_words] int32, the counters of the next
split GEMM of a step (``split_k.zero_words``), and its own counters are a block it was given zeroed the same way.

``K_ROPE`` (``l4::int4_mm_rope``, a RoPE layer's fused qkv): the program that stores a tile of the keys' columns
[k_col0, k_col0 + k_cols) applies their RoPE at positions start + (row mod T) and, with ``QK_NORM``, each head's
RMS norm first (``k_rope.py``); BN is then a multiple of HEAD_D and k_col0, k_cols multiples of BN
(``layout.rope_int4_blocks``), so a tile holds whole heads. Tables cos / sin [P, D/2] float32, start [1].

Shapes: x [M, K]; w_packed [N, K/2] uint8; w_scale [N, K/G]; y [M, N] (x.dtype); part [S, M, N] float32 and lock
[>= cdiv(M, BM) * cdiv(N, BN)] int32 zeros, left zeros (both flat, unused when S = 1); next [next_words] int32
(CHAIN). Grid: (cdiv(M, BM), cdiv(N, BN), S).
"""
import triton
import triton.language as tl

from .k_rope import k_rope_tile
from .split_k import split_k_reduce, split_k_store, zero_words


@triton.jit
def scale_pair(s_ptr, rn, nmask, k0, G: tl.constexpr, stride_sn, stride_sg, SCALE_PER_BLOCK: tl.constexpr,
               SCALE_WORDS: tl.constexpr):
    """The scales a K step at k0 needs, rows ``rn`` [BN] (0 where ``nmask`` is not) -> (even, odd) [BN] in the
    scales' dtype. ``SCALE_WORDS`` (a step of 2G inputs, k0 // G even): groups k0 // G and k0 // G + 1 from ONE
    aligned 32-bit load (little-endian: the even group in the low half). Otherwise (a step of one K block): the
    block's group, twice; nothing without ``SCALE_PER_BLOCK`` (``int4_tile`` gathers per element)."""
    if SCALE_WORDS:
        words = s_ptr.to(tl.pointer_type(tl.int32), bitcast=True) + rn * (stride_sn // 2) + k0 // (2 * G)
        word = tl.load(words, mask=nmask, other=0)                                    # [BN] int32
        dt = s_ptr.dtype.element_ty
        return word.to(tl.int16).to(dt, bitcast=True), (word >> 16).to(tl.int16).to(dt, bitcast=True)
    elif SCALE_PER_BLOCK:
        sc = tl.load(s_ptr + rn * stride_sn + (k0 // G) * stride_sg, mask=nmask, other=0.0)
        return sc, sc
    else:
        z = tl.zeros(rn.shape, s_ptr.dtype.element_ty)
        return z, z


@triton.jit
def pick_scale(s_even, s_odd, U: tl.constexpr, G: tl.constexpr, BLOCK_K: tl.constexpr):
    """The scale of the U-th K block of a step (a compile-time choice): the even group's for its first G inputs."""
    if (U * BLOCK_K) // G == 0:
        return s_even
    else:
        return s_odd


@triton.jit
def int4_tile(w_ptr, s_ptr, rn, nmask, k0, K, G, stride_wn, stride_wk, stride_sn, stride_sg,
              sc, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SCALE_PER_BLOCK: tl.constexpr):
    """Rows ``rn`` [BN] (valid where ``nmask``), inputs k0 .. k0+BK-1 of a packed weight -> [BN, BK] float32
    dequantized (not yet rounded); 0 where a row is masked or k >= K. ``sc`` [BN]: the block's scales
    (``SCALE_PER_BLOCK``; otherwise ignored and gathered per element)."""
    kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)                                   # [BK/2] byte index
    packed = tl.load(w_ptr + rn[:, None] * stride_wn + kb[None, :] * stride_wk,
                     mask=nmask[:, None] & (kb < K // 2)[None, :], other=0x88)  # [BN, BK/2] uint8
    p32 = packed.to(tl.int32)
    lo = ((p32 & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0       # 2**23 + q - (2**23 + 8)
    hi = ((p32 >> 4) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
    q = tl.reshape(tl.join(lo, hi), (BLOCK_N, BLOCK_K))                         # [BN, BK], k order
    if SCALE_PER_BLOCK:
        w = q * sc.to(tl.float32)[:, None]
    else:
        k = k0 + tl.arange(0, BLOCK_K)                                           # [BK]
        sc = tl.load(s_ptr + rn[:, None] * stride_sn + (k // G)[None, :] * stride_sg,
                     mask=nmask[:, None] & (k < K)[None, :], other=0.0)            # [BN, BK]
        w = q * sc.to(tl.float32)
    return w


# FMA_UNPACK: packed weights load as 32-bit words, 8 nibbles each (nibble j of word m is input 8m + j), and a nibble
# q at bits [4p, 4p + 4) of a word OR-ed into 1.0f (0x3F800000) reads as the float f = 1 + q * u, u = 2^(4p - 23).
# Each word is read three ways (as it is, << 8, >> 12) so that every nibble sits at p = 2, 3 or 4 (u = 2^-15,
# 2^-11, 2^-7), and then
#     fma(f, s / u, -(1/u + 8) * s) = (q - 8) * s      exactly, one FFMA a weight
# for a bf16 scale s with 2^-100 <= |s| < 2^100: s / u and (1/u + 8) * s are exact in float32 (1/u + 8 has at most
# 13 significant bits, s 8), so is f * (s / u) (f has at most 16) and so is the result: fused or not (the CPU
# interpreter's tl.fma is a product, then a sum), every step is exact.
_ONE = tl.constexpr(0x3F800000)
_P2 = tl.constexpr(0x3F800F00)          # 1.0f's bits and the nibble at p = 2 (u = 2^-15)
_P3 = tl.constexpr(0x3F80F000)          # p = 3 (u = 2^-11)
_P4 = tl.constexpr(0x3F8F0000)          # p = 4 (u = 2^-7)


@triton.jit
def int4_fma_words(w_ptr, rn, nmask, k0, stride_wn, BLOCK_K: tl.constexpr):
    """Rows ``rn`` [BN] (0 where ``nmask`` is not), inputs k0 .. k0+BK-1 of a packed weight as [BN, BK/8] int32
    words (the rows' bytes must be 4-byte aligned: ``layout.fma_unpack``), read the three ways ``int4_fma_tile``
    takes them, each with 1.0f's bits OR-ed in: (as they are, << 8, >> 12). LOP3 takes one literal, so an AND and
    an OR of two literals would stay two instructions a weight; OR-ed once a word, the AND alone keeps 1.0f."""
    kw = k0 // 8 + tl.arange(0, BLOCK_K // 8)                                   # [BK/8] word index
    words = tl.load(w_ptr.to(tl.pointer_type(tl.int32), bitcast=True) + rn[:, None] * (stride_wn // 4) + kw[None, :],
                    mask=nmask[:, None], other=0)                                # [BN, BK/8] int32
    return words | _ONE, (words << 8) | _ONE, (words >> 12) | _ONE


@triton.jit
def int4_fma_tile(at, lo, hi, s, J: tl.constexpr, dtype: tl.constexpr):
    """Tile J (0..7) of a K block from ``int4_fma_words``' (at, lo, hi) and its scales s [BN, 1] float32 (from bf16):
    [BN, BK/8] of ``dtype``, column m the weight of input 8m + J, round((q - 8) * s) as the reference makes it.
    Nibbles 2, 3, 4 sit at p = 2, 3, 4 of ``at``, nibbles 0, 1 at p = 2, 3 of ``lo``, 5, 6, 7 at p = 2, 3, 4 of
    ``hi``. Computed tile by tile next to its dot, the 8 tiles are not all live at once (when written, the MoE
    gate_up: 188 registers and no spill; with all 8 tiles first, 168 and 8 bytes of stack)."""
    if J == 0 or J == 2 or J == 5:                                               # p = 2
        src = lo if J == 0 else (at if J == 2 else hi)
        return tl.fma((src & _P2).to(tl.float32, bitcast=True), s * 32768.0, s * -32776.0).to(dtype)
    elif J == 1 or J == 3 or J == 6:                                             # p = 3
        src = lo if J == 1 else (at if J == 3 else hi)
        return tl.fma((src & _P3).to(tl.float32, bitcast=True), s * 2048.0, s * -2056.0).to(dtype)
    else:                                                                        # J = 4, 7: p = 4
        src = at if J == 4 else hi
        return tl.fma((src & _P4).to(tl.float32, bitcast=True), s * 128.0, s * -136.0).to(dtype)


@triton.jit
def x_eighths(xt, BLOCK_K: tl.constexpr):
    """x [BM, BK] -> 8 tiles [BM, BK/8], tile j = x[:, j::8] (the partners of ``int4_fma_tile``), split in
    registers: j = 4c + 2b + a, split on a, then b, then c."""
    xa0, xa1 = tl.split(tl.reshape(xt, (xt.shape[0], BLOCK_K // 8, 2, 2, 2)))
    x00, x01 = tl.split(xa0)
    x10, x11 = tl.split(xa1)
    x0, x4 = tl.split(x00)
    x2, x6 = tl.split(x01)
    x1, x5 = tl.split(x10)
    x3, x7 = tl.split(x11)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def int4_fma_dot(acc, xt, w_ptr, rn, nmask, k0, stride_wn, sc, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
                 DOT_F32: tl.constexpr):
    """acc [BM, BN] + xt [BM, BK] @ W[rn, k0 .. k0+BK)^T (float32, ``sc`` [BN] the block's bf16 scales), W
    dequantized by ``int4_fma_tile`` and rounded to x's dtype as the reference rounds it: 8 dots of BK/8 inputs
    (BK >= 128), the MMAs one dot of BK would issue. ``DOT_F32``: see ``moe_gate_up``."""
    xs = x_eighths(xt, BLOCK_K)
    at, lo, hi = int4_fma_words(w_ptr, rn, nmask, k0, stride_wn, BLOCK_K)
    s = sc.to(tl.float32)[:, None]
    for j in tl.static_range(8):
        xj, wj = xs[j], tl.trans(int4_fma_tile(at, lo, hi, s, j, xt.dtype))
        if DOT_F32:
            xj, wj = xj.to(tl.float32), wj.to(tl.float32)
        acc = tl.dot(xj, wj, acc, input_precision=PRECISION)
    return acc



@triton.jit
def int4_block_dot(acc, xt, w_ptr, s_ptr, rn, nmask, k0, K, G, stride_wn, stride_wk, stride_sn, stride_sg, sc,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SCALE_PER_BLOCK: tl.constexpr,
                   PRECISION: tl.constexpr, DOT_F32: tl.constexpr, FMA_UNPACK: tl.constexpr):
    """The float path of every Int4 K loop: acc [BM, BN] + xt [BM, BK] @ W[rn, k0 .. k0+BK)^T (float32), the
    weights dequantized by the FFMA unpack (``FMA_UNPACK``, ``int4_fma_dot``) or by the byte unpack (``int4_tile``),
    rounded to x's dtype as the reference rounds them. ``sc``: the block's scales (``SCALE_PER_BLOCK``)."""
    if FMA_UNPACK:
        acc = int4_fma_dot(acc, xt, w_ptr, rn, nmask, k0, stride_wn, sc, BLOCK_K, PRECISION, DOT_F32)
    else:
        wt = tl.trans(int4_tile(w_ptr, s_ptr, rn, nmask, k0, K, G, stride_wn, stride_wk, stride_sn, stride_sg, sc,
                                BLOCK_N, BLOCK_K, SCALE_PER_BLOCK).to(xt.dtype))        # [BK, BN]
        if DOT_F32:                                                              # interpreter (see moe_gate_up)
            xt, wt = xt.to(tl.float32), wt.to(tl.float32)
        acc = tl.dot(xt, wt, acc, input_precision=PRECISION)
    return acc


# $4: four packed bytes b0..b3 (weights k0..k7, low nibble first); $5, $6: their scales as bf16 pairs (e0, e1),
# (e2, e3). Out: $0, $1 = the even weights (k0, k2), (k4, k6); $2, $3 = the odd ones (k1, k3), (k5, k7), bf16 pairs.
# One line: Inductor copies this value's repr into the kernel source it embeds in a ''' string, which torch 2.11
# does not escape (a newline there ends the engine's compile with a SyntaxError).
_UNPACK_BF16X2 = tl.constexpr(" ".join([
    "{",
    ".reg .b32 t0, t1, s0, s1, m, c, d;",
    "mov.b32 m, 0x000F000F;",
    "mov.b32 c, 0x43004300;",
    "mov.b32 d, 0x43084308;",
    "prmt.b32 t0, $4, 0, 0x4140;",
    "prmt.b32 t1, $4, 0, 0x4342;",
    "shr.u32 s0, t0, 4;",
    "shr.u32 s1, t1, 4;",
    "lop3.b32 $0, t0, m, c, 0xea;",
    "lop3.b32 $1, t1, m, c, 0xea;",
    "lop3.b32 $2, s0, m, c, 0xea;",
    "lop3.b32 $3, s1, m, c, 0xea;",
    "sub.rn.bf16x2 $0, $0, d;",
    "sub.rn.bf16x2 $1, $1, d;",
    "sub.rn.bf16x2 $2, $2, d;",
    "sub.rn.bf16x2 $3, $3, d;",
    "mul.rn.bf16x2 $0, $0, $5;",
    "mul.rn.bf16x2 $1, $1, $6;",
    "mul.rn.bf16x2 $2, $2, $5;",
    "mul.rn.bf16x2 $3, $3, $6;",
    "}",
]))


@triton.jit
def int4_pairs_bf16(w_ptr, rn, k0, sc, stride_wn, stride_wk, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Rows ``rn`` [BN] (all valid), inputs k0 .. k0+BK-1 (in range, one scale group, whose scales are ``sc`` [BN]
    bf16) of a packed weight -> (even, odd) [BN, BK/2] bf16: the weights at k0, k0+2, .. and k0+1, k0+3, .., each
    round((q - 8) * s) as the reference makes it, unpacked by ``_UNPACK_BF16X2`` (sm_90 PTX). Unmasked: the byte
    selects of a masked load cost more than the unpack."""
    kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)                                   # [BK/2] byte index
    packed = tl.load(w_ptr + rn[:, None] * stride_wn + kb[None, :] * stride_wk)  # [BN, BK/2] uint8
    sc = tl.broadcast_to(sc[:, None], (BLOCK_N, BLOCK_K // 2))
    return tl.inline_asm_elementwise(_UNPACK_BF16X2, "=r,=r,=r,=r,r,r,r", [packed, sc],
                                     dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)


@triton.jit
def x_pairs(x_ptr, rows, rmask, k0, stride_xr, stride_xk, BLOCK_K: tl.constexpr):
    """Rows ``rows`` [BM] (valid where ``rmask``) of x at the even and odd inputs of the K block at k0 -> two
    [BM, BK/2] tiles (0 in masked rows), the partners of ``int4_pairs_bf16``'s weights: the [BM, BK] block loaded
    contiguously (vector loads, pipelined like the weights) and split in registers."""
    k = k0 + tl.arange(0, BLOCK_K)
    xt = tl.load(x_ptr + rows[:, None] * stride_xr + k[None, :] * stride_xk, mask=rmask[:, None], other=0.0)
    return tl.split(tl.reshape(xt, (xt.shape[0], BLOCK_K // 2, 2)))


@triton.jit
def int4_mm_bf16x2_kernel(x_ptr, w_ptr, s_ptr, y_ptr, part_ptr, lock_ptr, M, N, K, G: tl.constexpr, K_SPLIT, n_split,
                          stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sg, stride_ym, stride_yn,
                          stride_ps, stride_pm, stride_pn, next_ptr, next_words, start_ptr, cos_ptr, sin_ptr, T,
                          k_col0, k_cols, eps, sc0, sc1, ss0, ss1,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          SCALE_WORDS: tl.constexpr, CHAIN: tl.constexpr, K_ROPE: tl.constexpr,
                          QK_NORM: tl.constexpr, HEAD_D: tl.constexpr):
    """``int4_mm_kernel`` for bf16 x and scales on sm_90, N % BN == K % BK == 0 and BK dividing G: each K block's
    weights as even and odd bf16 tiles (``int4_pairs_bf16``) dotted with x's even and odd inputs (``x_pairs``).
    G is a compile-time constant: the scale column k0 // G is then a shift, not a division in the loop."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)                     # [BM]
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)                     # [BN]
    split = tl.program_id(2)
    mmask = rm < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_lo = split * K_SPLIT
    STEP: tl.constexpr = 2 * G if SCALE_WORDS else BLOCK_K
    for k_step in range(k_lo, tl.minimum(k_lo + K_SPLIT, K), STEP):
        s_even, s_odd = scale_pair(s_ptr, rn, rn >= 0, k_step, G, stride_sn, stride_sg, True, SCALE_WORDS)  # N % BN = 0
        for u in tl.static_range(STEP // BLOCK_K):
            k0 = k_step + u * BLOCK_K
            xe, xo = x_pairs(x_ptr, rm, mmask, k0, stride_xm, stride_xk, BLOCK_K)    # [BM, BK/2] each
            we, wo = int4_pairs_bf16(w_ptr, rn, k0, pick_scale(s_even, s_odd, u, G, BLOCK_K), stride_wn, stride_wk,
                                     BLOCK_N, BLOCK_K)                           # [BN, BK/2] bf16 each
            acc = tl.dot(xe, tl.trans(we), acc)
            acc = tl.dot(xo, tl.trans(wo), acc)
    int4_mm_store(acc, y_ptr, rm, rn, mmask, mmask[:, None], stride_ym, stride_yn, part_ptr, stride_ps, stride_pm,
                  stride_pn, lock_ptr, split, n_split, start_ptr, cos_ptr, sin_ptr, T, k_col0, k_cols, eps,
                  sc0, sc1, ss0, ss1, BLOCK_M, BLOCK_N, K_ROPE, QK_NORM, HEAD_D)
    if CHAIN:                                                                    # the next GEMM's zeroed counters
        zero_words(next_ptr, next_words, 128)


@triton.jit
def int4_mm_kernel(x_ptr, w_ptr, s_ptr, y_ptr, part_ptr, lock_ptr, M, N, K, G: tl.constexpr, K_SPLIT, n_split,
                   stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sg, stride_ym, stride_yn,
                   stride_ps, stride_pm, stride_pn, next_ptr, next_words, start_ptr, cos_ptr, sin_ptr, T,
                   k_col0, k_cols, eps, sc0, sc1, ss0, ss1,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   SCALE_PER_BLOCK: tl.constexpr, SCALE_WORDS: tl.constexpr, PRECISION: tl.constexpr,
                   DOT_F32: tl.constexpr, CHAIN: tl.constexpr, FMA_UNPACK: tl.constexpr, K_ROPE: tl.constexpr,
                   QK_NORM: tl.constexpr, HEAD_D: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)                     # [BM]
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)                     # [BN]
    split = tl.program_id(2)
    mmask = rm < M
    nmask = rn < N
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_lo = split * K_SPLIT
    STEP: tl.constexpr = 2 * G if SCALE_WORDS else BLOCK_K                      # inputs a step (scale_pair)
    for k_step in range(k_lo, tl.minimum(k_lo + K_SPLIT, K), STEP):
        s_even, s_odd = scale_pair(s_ptr, rn, nmask, k_step, G, stride_sn, stride_sg, SCALE_PER_BLOCK, SCALE_WORDS)
        for u in tl.static_range(STEP // BLOCK_K):
            k0 = k_step + u * BLOCK_K
            k = k0 + ks                                                          # [BK]
            xt = tl.load(x_ptr + rm[:, None] * stride_xm + k[None, :] * stride_xk,
                         mask=mmask[:, None] & (k < K)[None, :], other=0.0)        # [BM, BK]
            acc = int4_block_dot(acc, xt, w_ptr, s_ptr, rn, nmask, k0, K, G, stride_wn, stride_wk, stride_sn,
                                 stride_sg, pick_scale(s_even, s_odd, u, G, BLOCK_K), BLOCK_N, BLOCK_K,
                                 SCALE_PER_BLOCK, PRECISION, DOT_F32, FMA_UNPACK)
    int4_mm_store(acc, y_ptr, rm, rn, mmask, mmask[:, None] & nmask[None, :], stride_ym, stride_yn, part_ptr,
                  stride_ps, stride_pm, stride_pn, lock_ptr, split, n_split, start_ptr, cos_ptr, sin_ptr, T, k_col0,
                  k_cols, eps, sc0, sc1, ss0, ss1, BLOCK_M, BLOCK_N, K_ROPE, QK_NORM, HEAD_D)
    if CHAIN:                                                                    # the next GEMM's zeroed counters
        zero_words(next_ptr, next_words, 128)


@triton.jit
def int4_mm_store(acc, y_ptr, rm, rn, mmask, mask, stride_ym, stride_yn, part_ptr, stride_ps, stride_pm, stride_pn,
                  lock_ptr, split, n_split, start_ptr, cos_ptr, sin_ptr, T, k_col0, k_cols, eps, sc0, sc1, ss0, ss1,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, K_ROPE: tl.constexpr, QK_NORM: tl.constexpr,
                  HEAD_D: tl.constexpr):
    """The Int4 GEMMs' epilogue for the tile of rows ``rm`` [BM] (valid where ``mmask``) and columns ``rn`` [BN]
    (``mask``: the tile's valid elements, [BM, BN] or [BM, 1]): split-K's (``split_k.py``; the tile's counter is
    lock[pid_m * grid_n + pid_n]), then, with K_ROPE (``l4::int4_mm_rope``), the keys' RoPE / qk-norm on the tile
    before it is stored (``k_rope.k_rope_tile``)."""
    y_offs = rm[:, None] * stride_ym + rn[None, :] * stride_yn
    part_offs = rm[:, None] * stride_pm + rn[None, :] * stride_pn
    lock = lock_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    if K_ROPE:
        stored, total = split_k_reduce(acc, part_ptr, part_offs, stride_ps, mask, lock, split, n_split,
                                       BLOCK_M, BLOCK_N)
        if stored:
            out = k_rope_tile(total.to(y_ptr.dtype.element_ty), rm, mmask, tl.program_id(1) * BLOCK_N, T, start_ptr,
                              cos_ptr, sin_ptr, k_col0, k_cols, eps, sc0, sc1, ss0, ss1, HEAD_D, QK_NORM, BLOCK_M,
                              BLOCK_N)
            tl.store(y_ptr + y_offs, out, mask=mask)
    else:
        split_k_store(acc, y_ptr, y_offs, part_ptr, part_offs, stride_ps, mask, lock, split, n_split, BLOCK_M, BLOCK_N)
