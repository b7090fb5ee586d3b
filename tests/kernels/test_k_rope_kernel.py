"""l4::int4_mm_rope: a RoPE layer's fused qkv GEMM with its keys' RoPE and qk-norm in the epilogue, against the
plain Int4 product followed by l4::attention_cached's k transform in aten (``dispatch.k_rope_reference``)."""
# B batch, T tokens, K input features, Hq / Hkv heads, D head_dim
from __future__ import annotations

import pytest
import torch

from l4compile.kernels.layout import Int4Blocks, rope_int4_blocks
from l4compile.ops.attention import plain_rope_tables
from l4compile.quant import quantize_int4

from .conftest import rel_err, require_cuda_kernels, require_interpreter

EPS = 1e-5


def _qkv(b, t, k, hq, hkv, d, dtype=torch.float32, device="cpu", seed=0):
    """x [B, T, K] and a packed Int4 qkv weight of (Hq + 2 Hkv) * D outputs (group 128, or K where smaller)."""
    g = torch.Generator().manual_seed(seed)
    w_packed, w_scale = quantize_int4(torch.randn((hq + 2 * hkv) * d, k, generator=g), 128)
    if dtype != torch.float32:
        w_scale = w_scale.to(dtype)
    x = torch.randn(b, t, k, generator=g).to(dtype)
    return x.to(device), w_packed.to(device), w_scale.to(device)


def _both(x, w_packed, w_scale, start, hq, hkv, d, qk_norm, blocks=None, lock=None):
    """(the kernel's y, the reference's y, the plain product) for keys at columns [Hq D, (Hq + Hkv) D)."""
    from l4compile.kernels import ops
    from l4compile.kernels.dispatch import k_rope_reference

    cos, sin = plain_rope_tables(d, 64, x.device)
    start_pos = torch.tensor([start], device=x.device)
    blocks = rope_int4_blocks(blocks or ops.default_int4_blocks(w_packed, w_scale), w_packed.shape[0], d, hq * d,
                              hkv * d)                              # the plain GEMM at the blocks the kernel takes
    plain = ops.int4_matmul(x.reshape(-1, x.shape[-1]), w_packed, w_scale, blocks=blocks).view(*x.shape[:2], -1)
    ref = k_rope_reference(plain, start_pos, cos, sin, hq * d, hkv * d, d, qk_norm, EPS)
    rope = ops.KRope(start_pos, cos, sin, x.shape[1], hq * d, hkv * d, d, qk_norm, EPS)
    out = ops.int4_matmul(x.reshape(-1, x.shape[-1]), w_packed, w_scale, blocks=blocks, lock=lock, rope=rope)
    y = out[0] if lock is not None else out
    return y.view(*x.shape[:2], -1), ref, plain


@pytest.mark.parametrize("qk_norm", [True, False])
@pytest.mark.parametrize("b,t,start,d,blocks", [
    (1, 1, 37, 32, None),                                  # a decode step; BN 64: two heads a tile
    (2, 5, 3, 32, None),                                   # 10 rows of 2 sequences: row m is token m mod 5
    (1, 19, 0, 16, Int4Blocks(16, 16, 64, True)),          # prefill, two row blocks, one head a tile
    (2, 1, 60, 32, Int4Blocks(16, 64, 64, True, 2)),       # split K: the summing program transforms its tile
    (1, 3, 9, 64, Int4Blocks(16, 16, 64, True)),           # BN 16 < D: raised to 64, split 4 (capped at 2 K blocks)
])
def test_int4_mm_rope_matches_plain_gemm_then_k_transform(b, t, start, d, blocks, qk_norm):
    """float32: q and v columns bit for bit the plain GEMM's; k to float32 rounding of the reference transform."""
    require_interpreter()
    hq, hkv = 4, 2
    x, w_packed, w_scale = _qkv(b, t, 128, hq, hkv, d, seed=t)
    y, ref, plain = _both(x, w_packed, w_scale, start, hq, hkv, d, qk_norm, blocks)
    k0, k1 = hq * d, (hq + hkv) * d
    assert torch.equal(y[..., :k0], plain[..., :k0]) and torch.equal(y[..., k1:], plain[..., k1:])
    assert rel_err(y[..., k0:k1], ref[..., k0:k1]) < 1e-6
    assert not torch.allclose(y[..., k0:k1], plain[..., k0:k1])                  # something was transformed


def test_int4_mm_rope_rounds_like_reference_bf16(rne_bf16):
    """bf16: the product rounds, RoPE rounds, the norm rounds, as the graph's aten ops do: within one bf16 ulp."""
    hq, hkv, d = 4, 2, 32
    x, w_packed, w_scale = _qkv(2, 3, 256, hq, hkv, d, torch.bfloat16)
    y, ref, plain = _both(x, w_packed, w_scale, 11, hq, hkv, d, True)
    k0, k1 = hq * d, (hq + hkv) * d
    assert torch.equal(y[..., :k0], plain[..., :k0]) and torch.equal(y[..., k1:], plain[..., k1:])
    diff = (y[..., k0:k1].float() - ref[..., k0:k1].float()).abs()
    assert (diff <= ref[..., k0:k1].float().abs() * 2 ** -7).all()
    assert (diff == 0).float().mean() > 0.9


def test_chained_rope_leaves_its_counters_zero():
    """The chained form splits K on its block's counters, leaves them zeros and zeroes the next block."""
    require_interpreter()
    from l4compile.kernels.layout import SPLIT_K_LOCK_WORDS

    hq, hkv, d = 4, 2, 32
    x, w_packed, w_scale = _qkv(1, 1, 256, hq, hkv, d)
    lock = torch.zeros(SPLIT_K_LOCK_WORDS, dtype=torch.int32)
    y, nxt_out = torch.ops.l4.int4_mm_rope_chained(x, w_packed, w_scale, torch.tensor([5]), *plain_rope_tables(d, 64),
                                                   hq * d, hkv * d, d, True, EPS, lock)
    ref = _both(x, w_packed, w_scale, 5, hq, hkv, d, True)[1]
    assert rel_err(y, ref) < 1e-6
    assert not lock.any() and not nxt_out.any() and nxt_out.shape == lock.shape


def test_rope_blocks_hold_whole_heads():
    """Scout's qkv (BN 64, 40 q heads and 8 kv heads of 128) -> BN 128, split doubled; BN shrinks until it divides
    the keys' columns; heads that no power-of-two tile holds -> None."""
    scout = Int4Blocks(16, 64, 128, True)
    assert rope_int4_blocks(scout, 7168, 128, 5120, 1024) == Int4Blocks(16, 128, 128, True, 2)
    assert rope_int4_blocks(Int4Blocks(16, 64, 128, True, 4), 7168, 128, 5120, 1024).split_k == 8
    assert rope_int4_blocks(Int4Blocks(16, 256, 128, True), 7168, 128, 5120, 1024).block_n == 256
    assert rope_int4_blocks(Int4Blocks(16, 256, 128, True), 7168, 128, 5120, 384).block_n == 128
    assert rope_int4_blocks(Int4Blocks(16, 64, 64, True), 128, 16, 64, 32) == Int4Blocks(16, 32, 64, True)
    assert rope_int4_blocks(Int4Blocks(16, 64, 64, True), 336, 48, 192, 96) is None          # D 48
    assert rope_int4_blocks(Int4Blocks(16, 64, 64, True), 168, 8, 96, 32) is None            # D 8 < 16
    kept = rope_int4_blocks(Int4Blocks(16, 64, 128, True, bf16x2=True), 7168, 128, 5120, 1024)
    assert kept.bf16x2 and kept.block_n == 128
    assert not rope_int4_blocks(Int4Blocks(16, 64, 128, True, bf16x2=True), 7104, 128, 5120, 1024).bf16x2


def test_rope_gemm_refuses_heads_no_tile_holds():
    require_interpreter()
    from l4compile.kernels import ops

    x, w_packed, w_scale = _qkv(1, 1, 64, 4, 2, 24)
    rope = ops.KRope(torch.tensor([0]), *plain_rope_tables(24, 8), 1, 96, 48, 24, True, EPS)
    with pytest.raises(ValueError, match="no tile width fits heads of 24"):
        ops.int4_matmul(x[0], w_packed, w_scale, rope=rope)


def test_dispatch_falls_back_to_the_reference_transform():
    """Where the kernel cannot take the heads, ``linear_int4_rope`` is the plain product and the aten transform."""
    require_interpreter()
    from l4compile.kernels.dispatch import k_rope_reference, linear_int4_rope

    x, w_packed, w_scale = _qkv(1, 2, 64, 4, 2, 24)
    cos, sin = plain_rope_tables(24, 8)
    start = torch.tensor([3])
    y = linear_int4_rope(x, w_packed, w_scale, start, cos, sin, 96, 48, 24, True, EPS)
    ref = k_rope_reference(torch.ops.l4.linear_int4(x, w_packed, w_scale), start, cos, sin, 96, 48, 24, True, EPS)
    assert torch.equal(y, ref)


@pytest.mark.gpu
@pytest.mark.parametrize("split", [1, 2, 4])
def test_int4_mm_rope_cuda_scout_width(split):
    """Scout's qkv (K 5120, 40 + 8 + 8 heads of 128) on a GPU in bf16 at decode and prefill sizes: q and v bit for
    bit the plain GEMM's at the same blocks, k within bf16 rounding of the reference transform."""
    require_cuda_kernels()
    from l4compile.kernels import ops
    from l4compile.kernels.dispatch import k_rope_reference

    hq, hkv, d, k = 40, 8, 128, 5120
    g = torch.Generator(device="cuda").manual_seed(0)
    w_packed, w_scale = quantize_int4(torch.randn((hq + 2 * hkv) * d, k, generator=g, device="cuda") * 0.02, 128)
    w_scale = w_scale.bfloat16()
    cos, sin = plain_rope_tables(d, 8192, "cuda")
    blocks = rope_int4_blocks(Int4Blocks(16, 64, 128, True, split), w_packed.shape[0], d, hq * d, hkv * d)
    for b, t, start in ((1, 1, 4000), (4, 1, 517), (1, 300, 0)):
        x = torch.randn(b, t, k, generator=g, device="cuda").bfloat16()
        start_pos = torch.tensor([start], device="cuda")
        plain = ops.int4_matmul(x.reshape(-1, k), w_packed, w_scale, blocks=blocks).view(b, t, -1)
        ref = k_rope_reference(plain, start_pos, cos, sin, hq * d, hkv * d, d, True, EPS)
        rope = ops.KRope(start_pos, cos, sin, t, hq * d, hkv * d, d, True, EPS)
        for _ in range(3):
            y = ops.int4_matmul(x.reshape(-1, k), w_packed, w_scale, blocks=blocks, rope=rope).view(b, t, -1)
            assert torch.equal(y[..., :hq * d], plain[..., :hq * d]), (b, t)
            assert rel_err(y[..., hq * d:], ref[..., hq * d:]) < 1e-2, (b, t)
