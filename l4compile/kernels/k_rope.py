# BM x BN a tile of the qkv GEMM's output, D head_dim (BN a multiple of D), P rope table positions
"""The q and k transforms of a RoPE layer in the epilogue of its fused qkv GEMM (``l4::int4_mm_rope``).

A RoPE layer's new queries and keys are RoPE-rotated at their positions and, with qk-norm, RMS-normed over each head
(``ops.attention._project``: the same transform for both). A CUDA engine's step did k's in an Inductor kernel of its
own between the qkv GEMM and the attention, and q's in the attention kernel, where each key split of a decode step
redid it after q's and the tables' round trip (folded in there too, the k transform took the partial kernel to 255
registers and spills). Here the program that stores a tile of the qkv output transforms the heads in it first, for
the columns [k_col0, k_col0 + k_cols) it is given (``backends.qkv_rope_fused``: q's and k's, which are adjacent):
the GEMM is launched with BN a multiple of D and tiles aligned to the heads (``layout.rope_int4_blocks``), so a tile
holds whole heads, in registers, and nothing is reread.

Numerics as the reference: the GEMM's float32 sum is rounded to y's dtype (the qkv output), RoPE of interleaved
pairs (x0 c - x1 s, x0 s + x1 c) in float32 with c, s = cos / sin[start + t, j] is rounded again, and the RMS norm
over a head's D columns (weightless, float32) is rounded once more.
"""
import triton
import triton.language as tl


@triton.jit
def k_rope_tile(out, rows, rmask, n0, T, start_ptr, cos_ptr, sin_ptr, k_col0, k_cols, eps, sc0, sc1, ss0, ss1,
                HEAD_D: tl.constexpr, QK_NORM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``out`` [BM, BN] (y's dtype): the qkv output's columns n0 .. n0 + BN - 1 for ``rows`` [BM] (valid where
    ``rmask``; row m is token m mod T of its sequence) -> the same, with RoPE (and with QK_NORM the head's RMS norm)
    applied where the tile lies in the keys' columns [k_col0, k_col0 + k_cols); other tiles as they are. n0 and
    k_col0 are multiples of BN, BN of HEAD_D."""
    if (n0 >= k_col0) & (n0 < k_col0 + k_cols):
        pos = tl.load(start_ptr).to(tl.int32) + rows % T                         # [BM] positions
        x0, x1 = tl.split(tl.reshape(out.to(tl.float32), (BLOCK_M, BLOCK_N // 2, 2)))    # [BM, BN/2] each
        j = (tl.arange(0, BLOCK_N // 2) % (HEAD_D // 2))[None, :]                # pair within its head
        c = tl.load(cos_ptr + pos[:, None] * sc0 + j * sc1, mask=rmask[:, None], other=0.0)
        s = tl.load(sin_ptr + pos[:, None] * ss0 + j * ss1, mask=rmask[:, None], other=0.0)
        r0 = (x0 * c - x1 * s).to(out.dtype).to(tl.float32)
        r1 = (x0 * s + x1 * c).to(out.dtype).to(tl.float32)
        heads = tl.reshape(tl.join(r0, r1), (BLOCK_M, BLOCK_N // HEAD_D, HEAD_D))   # [BM, heads, D]
        if QK_NORM:
            ms = tl.sum(heads * heads, axis=2) / HEAD_D                          # [BM, heads]
            heads = heads * tl.math.rsqrt(ms + tl.cast(eps, tl.float32))[:, :, None]
        out = tl.reshape(heads, (BLOCK_M, BLOCK_N)).to(out.dtype)
    return out
