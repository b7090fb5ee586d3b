# BM rows per tile, BK input features per block, BN output features per block, K input features
"""Triton helpers (no kernel of their own) for the FP8 grouped GEMMs ``moe_fp8_gate_up`` / ``moe_fp8_down``: the
dynamic per-row activation quantization of ``l4::linear_fp8`` done in-kernel, and the FP8 weight tile.

Per row (the reference: ``l4compile.ops.quant.fake_quant_fp8_per_token``)::

    s   = max(max_k |z[k]| / 448, 1e-12)                          (float32, IEEE division)
    q_k = float8_e4m3fn(clamp(z[k] / s, -448, 448))               (round to nearest, ties to even)
    y_n = (sum_k q_k * w_q[n, k]) * s * w_scale[n]                (fp32 accumulation)

which is the reference's ``(q * s) @ (w_q * w_scale)^T`` up to float32 rounding of the factors. A program needs s
before its first dot, so it reads its rows twice: ``rows_scale`` (one pass over K for the max) and the GEMM. That
pass asks for its loads to be staged (``tl.range(num_stages=3)``): a loop without a dot is not software-pipelined
otherwise, and each of its K / BK iterations waited out a whole load (``kernels_sm90.py``: ``loop_loads``).

Dot operands (constexprs): ``FP8_DOT`` feeds q and w_q to ``tl.dot`` as float8 (GPUs of sm_89+): on Hopper, tiles of
BM >= 64 rows become FP8 wgmma (e4m3, ``fp8_dot`` says how partial sums stay fp32), while at decode's BM = 16 Triton
3.7 converts both to f16 (exact) for mma.sync (ALU work per weight; what it costs a decode step is for a GPU to
measure: ``benchmarks/bench_kernels.py`` sweeps BM 16 and 64). Otherwise they
go in as bf16, which holds every float8 value exactly (the same products), or as float32 under ``DOT_F32`` (the CPU
interpreter, whose bf16 dots are wrong). ``EMULATE_FP8`` rounds to the float8 grid with float32 arithmetic
(``round_e4m3``): Triton 3.7's interpreter casts float32 -> float8e4nv without carrying a rounded-up mantissa into
the exponent (124.3 -> 64); on a GPU the cast is the hardware's ``cvt.rn.satfinite``.
"""
import triton
import triton.language as tl


@triton.jit
def round_e4m3(v):
    """v float32, |v| <= 448 -> the nearest float8_e4m3fn value (ties to even), as float32. e4m3 keeps 3 mantissa
    bits down to 2^-6 and has spacing 2^-9 below, so the step is 2^(max(e, -6) - 3) for |v| in [2^e, 2^(e+1));
    adding and removing 1.5 * 2^23 rounds v / step (|v / step| <= 16) to an integer, ties to even."""
    exp = ((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127                  # floor(log2 |v|) for normal v
    step_exp = tl.maximum(exp, -6) - 3                                          # in [-9, 5]
    step = ((step_exp + 127) << 23).to(tl.float32, bitcast=True)                # 2^step_exp
    inv = ((127 - step_exp) << 23).to(tl.float32, bitcast=True)                 # 2^-step_exp
    return ((v * inv + 12582912.0) - 12582912.0) * step


@triton.jit
def scaled_rows(row_ptrs, scale, rmask, k, K, stride_k):
    """[BM, BK] block of rows ``row_ptrs`` [BM] at inputs ``k`` [BK]: (x * scale).to(x.dtype) (the score scales the
    expert input, rounded as the reference rounds it), as float32; zero outside the rows / K."""
    xt = tl.load(row_ptrs[:, None] + k[None, :] * stride_k, mask=rmask[:, None] & (k < K)[None, :], other=0.0)
    return (xt.to(tl.float32) * scale[:, None]).to(xt.dtype).to(tl.float32)


@triton.jit
def rows_scale(row_ptrs, scale, rmask, K, stride_k, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """The per-row FP8 scale s [BM] (float32) of ``scaled_rows`` over all K inputs."""
    amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
    ks = tl.arange(0, BLOCK_K)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=3):
        z = scaled_rows(row_ptrs, scale, rmask, k0 + ks, K, stride_k)
        amax = tl.maximum(amax, tl.max(tl.abs(z), axis=1))
    return tl.maximum(tl.math.div_rn(amax, tl.full((BLOCK_M,), 448.0, tl.float32)), 1e-12)


@triton.jit
def quantize(z, s, FP8_DOT: tl.constexpr, DOT_F32: tl.constexpr, EMULATE_FP8: tl.constexpr):
    """z [BM, BK] float32, s [BM] -> the dot operand q = fp8(clamp(z / s, +-448)) (see the module docstring)."""
    v = tl.math.div_rn(z, tl.broadcast_to(s[:, None], z.shape))
    v = tl.minimum(tl.maximum(v, -448.0), 448.0)
    if EMULATE_FP8:
        q = round_e4m3(v)
    else:
        q = v.to(tl.float8e4nv)
    if FP8_DOT:
        return q.to(tl.float8e4nv)
    elif DOT_F32:
        return q.to(tl.float32)
    else:
        return q.to(tl.bfloat16)


@triton.jit
def weight_tile(w_ptr, cols, cmask, k, K, stride_wn, stride_wk, FP8_DOT: tl.constexpr, DOT_F32: tl.constexpr):
    """[BK, BN] dot operand of float8 weights w [N, K] (nn.Linear orientation: the tile is loaded [BN, BK] along K
    and transposed, the K-major operand FP8 tensor cores take)."""
    w = tl.load(w_ptr + cols[:, None] * stride_wn + k[None, :] * stride_wk,
                mask=cmask[:, None] & (k < K)[None, :], other=0.0)              # [BN, BK] float8
    if FP8_DOT:
        return tl.trans(w)
    elif DOT_F32:
        return tl.trans(w.to(tl.float32))
    else:
        return tl.trans(w.to(tl.bfloat16))


@triton.jit
def fp8_dot(a, w, acc, BLOCK_K: tl.constexpr, FP8_DOT: tl.constexpr):
    """acc [BM, BN] += a [BM, BK] @ w [BK, BN] with fp32 accumulation (exact products in every operand mode).
    FP8 MMAs on Hopper (wgmma, BM >= 64) keep fewer bits than fp32 in their accumulator; ``max_num_imprecise_acc``
    = BK adds each K block's partial sum into the fp32 accumulator (every 128 inputs at BK = 128). Smaller values
    make Triton 3.7 refuse wgmma (0: plain MMAs on f16-converted operands) or fail to pipeline the loop (< BK)."""
    if FP8_DOT:
        return tl.dot(a, w, acc, max_num_imprecise_acc=BLOCK_K)
    else:
        return tl.dot(a, w, acc, input_precision="ieee")
