"""l4::int4_mm (Triton Int4 weight-only GEMM/GEMV) against l4::linear_int4's reference, on the quantize pass's
own packing (``l4compile.quant.quantize_int4``): group 128 and the smaller groups it shrinks to, odd sizes."""
# M rows, N output features, K input features, G group
from __future__ import annotations

import pytest
import torch

from l4compile.ops.quant import _linear_int4_impl
from l4compile.quant import quantize_int4

from .conftest import TOL, rel_err, require_cuda_kernels, require_interpreter

try:                    # module globals: Triton resolves the names a jitted function calls in its globals
    from l4compile.kernels.int4_mm import int4_fma_tile, int4_fma_words, x_eighths, x_pairs
except ImportError:     # no triton here: the kernel tests skip
    int4_fma_tile = int4_fma_words = x_eighths = x_pairs = None

# (M, N, K, group_size asked); the group used is gcd(K, group_size): 128, 64, 32, 12, 6
CASES = [(1, 33, 256, 128), (5, 48, 192, 128), (17, 20, 96, 128), (3, 16, 48, 12), (2, 24, 30, 6)]


def _data(m, n, k, group, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    w_packed, w_scale = quantize_int4(torch.randn(n, k, generator=g), group)
    x = torch.randn(m, k, generator=g).to(dtype)
    return x.to(device), w_packed.to(device), w_scale.to(device)


@pytest.mark.parametrize("m,n,k,group", CASES)
def test_int4_mm_matches_reference(m, n, k, group):
    require_interpreter()
    x, w_packed, w_scale = _data(m, n, k, group)
    out = torch.ops.l4.int4_mm(x, w_packed, w_scale)
    assert out.shape == (m, n) and rel_err(out, _linear_int4_impl(x, w_packed, w_scale)) < TOL[torch.float32]


def test_int4_mm_gathered_scales_and_block_tail():
    """Force the per-element scale gather with a K block that overhangs K (K = 80, BK = 32)."""
    require_interpreter()
    from l4compile.kernels.layout import Int4Blocks
    from l4compile.kernels.ops import int4_matmul

    x, w_packed, w_scale = _data(4, 18, 80, 16)
    out = int4_matmul(x, w_packed, w_scale, blocks=Int4Blocks(16, 16, 32, False))
    assert rel_err(out, _linear_int4_impl(x, w_packed, w_scale)) < TOL[torch.float32]


@pytest.mark.parametrize("m,n,k,group,blocks", [
    (1, 33, 256, 128, (16, 16, 64, True, 2)),          # 4 K blocks in 2 slices of 2
    (5, 48, 384, 128, (16, 32, 32, True, 4)),          # 12 K blocks in 4 slices of 3: slices cross scale groups
    (2, 24, 96, 128, (16, 16, 32, True, 8)),           # asks for 8 slices of 3 K blocks: 3 slices of 1
    (3, 20, 80, 16, (16, 16, 32, False, 2)),           # gathered scales, K blocks overhanging K = 80
    (2, 40, 1024, 128, (16, 16, 64, True, 2)),         # scales as words: 4 steps of 2G (4 K blocks each) in 2 slices
    (1, 33, 768, 128, (16, 16, 128, True, 4)),         # scales as words: 3 steps, asks for 4 slices: 3 of 1
])
def test_int4_mm_split_k(m, n, k, group, blocks):
    """Split-K: S programs per output tile each reduce one slice of K into a float32 partial; the partials add up to
    the unsplit result (float32: within summation-order rounding), whatever S does to the slice sizes."""
    require_interpreter()
    from l4compile.kernels.layout import Int4Blocks
    from l4compile.kernels.ops import int4_matmul

    x, w_packed, w_scale = _data(m, n, k, group)
    ref = _linear_int4_impl(x, w_packed, w_scale)
    out = int4_matmul(x, w_packed, w_scale, blocks=Int4Blocks(*blocks))
    assert out.shape == (m, n) and out.dtype == x.dtype and rel_err(out, ref) < TOL[torch.float32]
    xb = x.to(torch.bfloat16)
    out = int4_matmul(xb, w_packed, w_scale, blocks=Int4Blocks(*blocks))
    assert out.dtype == torch.bfloat16 and rel_err(out, _linear_int4_impl(xb, w_packed, w_scale)) < TOL[torch.bfloat16]


@pytest.mark.parametrize("dtype,blocks,group,needle", [
    (torch.bfloat16, (16, 64, 128, True), 128, "the CPU interpreter cannot run"),
])
def test_int4_mm_bf16x2_refused_where_it_cannot_run(dtype, blocks, group, needle):
    """The inline-PTX unpack is sm_90 code: the interpreter refuses it with a reason, not a crash."""
    require_interpreter()
    from l4compile.kernels.layout import Int4Blocks
    from l4compile.kernels.ops import int4_matmul

    x, w_packed, w_scale = _data(1, 64, 256, group, dtype=dtype)
    with pytest.raises(ValueError, match=needle):
        int4_matmul(x, w_packed, w_scale, blocks=Int4Blocks(*blocks, 1, True))


def test_int4_mm_bf16x2_conditions(monkeypatch):
    """Where the bf16x2 kernel does not apply (dtypes, per-element scales, small or ragged blocks), one reason."""
    from l4compile.kernels import ops
    from l4compile.kernels.layout import Int4Blocks

    monkeypatch.setattr(ops, "interpreting", lambda: False)
    bf, f32 = torch.empty(1, 256, dtype=torch.bfloat16), torch.empty(1, 256)
    s_bf, s_f32 = torch.empty(64, 2, dtype=torch.bfloat16), torch.empty(64, 2)
    for x, n, k, s, b, needle in [
        (f32, 64, 256, s_bf, Int4Blocks(16, 64, 128, True, 1, True), "must be bfloat16"),
        (bf, 64, 256, s_f32, Int4Blocks(16, 64, 128, True, 1, True), "must be bfloat16"),
        (bf, 64, 256, s_bf, Int4Blocks(16, 64, 32, False, 1, True), "SCALE_PER_BLOCK"),
        (bf, 64, 256, s_bf, Int4Blocks(16, 16, 32, True, 1, True), "BN x BK >= 1024"),
        (bf, 80, 256, s_bf, Int4Blocks(16, 64, 128, True, 1, True), "must divide by BN 64"),
    ]:
        with pytest.raises(ValueError, match=needle):
            ops._check_bf16x2(x, n, k, s, b)
    ops._check_bf16x2(bf, 64, 256, s_bf, Int4Blocks(16, 64, 128, True, 1, True))          # applies: no error


@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("k,group", [(512, 64), (192, 64)])
def test_int4_mm_scale_dtypes_and_words(scale_dtype, k, group):
    """16-bit scales with an even number of groups per row load as 32-bit words, a pair of groups each (the even
    group in the low half: ``int4_mm.scale_pair``); float32 scales and odd group counts (K/G = 3) load one scale a K
    block. Every way gives the reference's result; ``scale_words`` says which way a launch takes."""
    require_interpreter()
    from l4compile.kernels.layout import scale_words

    g = torch.Generator().manual_seed(3)
    w_packed, w_scale = quantize_int4(torch.randn(24, k, generator=g), group, scale_dtype=scale_dtype)
    x = torch.randn(3, k, generator=g)
    assert scale_words(w_scale) == (scale_dtype != torch.float32 and (k // group) % 2 == 0)
    for xd in (torch.float32, torch.bfloat16):
        out = torch.ops.l4.int4_mm(x.to(xd), w_packed, w_scale)
        assert rel_err(out, _linear_int4_impl(x.to(xd), w_packed, w_scale)) < TOL[xd], (xd, scale_dtype)


def test_scale_words_needs_aligned_pairs():
    """Scales load as words only where every pair of groups (2j, 2j + 1) of a row is one aligned 32-bit word."""
    from l4compile.kernels.layout import scale_words

    s = torch.zeros(8, 40, dtype=torch.bfloat16)
    assert scale_words(s) and scale_words(s.half()) and scale_words(torch.zeros(3, 16, 40, dtype=torch.bfloat16))
    assert scale_words(s, s[2:])                                     # a view at an even offset
    assert not scale_words(s.float())                                # 32-bit scales: already one load a scale
    assert not scale_words(torch.zeros(8, 3, dtype=torch.bfloat16))  # an odd number of groups
    assert not scale_words(s[:, 1:39])                               # odd offset: pairs straddle words
    assert not scale_words(torch.zeros(8, 41, dtype=torch.bfloat16)[:, :40])    # odd row stride
    assert not scale_words(torch.zeros(40, 8, dtype=torch.bfloat16).t())         # groups not contiguous
    assert not scale_words(s, torch.zeros(8, 3, dtype=torch.bfloat16))           # all of a launch's scales or none


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_int4_mm_low_precision(dtype):
    require_interpreter()
    x, w_packed, w_scale = _data(3, 40, 256, 128, dtype=dtype)
    out = torch.ops.l4.int4_mm(x, w_packed, w_scale)
    assert out.dtype == dtype and rel_err(out, _linear_int4_impl(x, w_packed, w_scale)) < TOL[dtype]


@pytest.mark.parametrize("m,n,k,group,blocks", [
    (1, 33, 256, 128, (16, 16, 64, True, 2)),          # 2 slices: each tile's counter used
    (2, 40, 1024, 128, (16, 16, 64, True, 4)),         # scales as words, 4 slices
    (3, 20, 80, 16, (16, 16, 32, False, 2)),           # gathered scales
    (5, 48, 192, 128, (16, 16, 32, True, 1)),          # unsplit: the counters untouched, the next block zeroed
])
def test_int4_mm_chained(m, n, k, group, blocks):
    """l4::int4_mm_chained's body (what a CUDA engine's step runs): the unchained launch's product bit for bit; the
    counters it was given (zeros) left zeros by the programs that complete their tiles; the next block it returns
    zeroed whatever it held."""
    require_interpreter()
    from l4compile.kernels.layout import SPLIT_K_LOCK_WORDS, Int4Blocks
    from l4compile.kernels.ops import int4_matmul

    x, w_packed, w_scale = _data(m, n, k, group)
    b = Int4Blocks(*blocks)
    lock = torch.zeros(SPLIT_K_LOCK_WORDS, dtype=torch.int32)
    garbage = torch.arange(SPLIT_K_LOCK_WORDS, dtype=torch.int32) + 7
    y, nxt = int4_matmul(x, w_packed, w_scale, blocks=b, lock=lock, next_lock=garbage)
    assert nxt is garbage and not nxt.any() and not lock.any()
    assert torch.equal(y, int4_matmul(x, w_packed, w_scale, blocks=b))
    y, nxt = torch.ops.l4.int4_mm_chained(x, w_packed, w_scale, lock)          # the op, default blocks
    assert nxt.shape == lock.shape and not nxt.any() and not lock.any()
    assert rel_err(y, _linear_int4_impl(x, w_packed, w_scale)) < TOL[torch.float32]
    with pytest.raises(ValueError, match=rf"lock must be \[{SPLIT_K_LOCK_WORDS}\] int32 zeros"):
        int4_matmul(x, w_packed, w_scale, lock=torch.zeros(16, dtype=torch.int32))


@pytest.mark.parametrize("chained", [False, True])
def test_int4_mm_prefill_blocks_take_the_long_steps(chained, monkeypatch, launches):
    """Steps of more than INT4_PREFILL_ROWS rows run the prefill blocks, shorter ones the decode blocks, one launch
    each (the other's grid is a constant 0 here, so it is not launched at all); either way the reference's product.
    Chained (l4::int4_mm_chained), the decode blocks split K on the counters given and leave them zeros, and the
    launch that runs, whichever, zeroes the next block."""
    require_interpreter()
    from l4compile.kernels import ops
    from l4compile.kernels.layout import SPLIT_K_LOCK_WORDS, Int4Blocks

    monkeypatch.setattr(ops, "INT4_PREFILL_ROWS", 4)
    decode, prefill = Int4Blocks(16, 16, 64, True, 2 if chained else 1), Int4Blocks(32, 32, 128, True)
    _, w_packed, w_scale = _data(1, 48, 256, 128)
    for m, bm in ((1, 16), (4, 16), (5, 32), (40, 32)):
        x = torch.randn(m, 256, generator=torch.Generator().manual_seed(m))
        ref = _linear_int4_impl(x, w_packed, w_scale)
        launches.clear()
        if chained:
            lock = torch.zeros(SPLIT_K_LOCK_WORDS, dtype=torch.int32)
            garbage = torch.arange(SPLIT_K_LOCK_WORDS, dtype=torch.int32) + 7
            y, nxt = ops.int4_matmul(x, w_packed, w_scale, blocks=decode, lock=lock, next_lock=garbage,
                                     prefill=prefill)
            assert nxt is garbage and not nxt.any() and not lock.any(), m
        else:
            y = ops.int4_matmul(x, w_packed, w_scale, blocks=decode, prefill=prefill)
        assert [kw["BLOCK_M"] for *_, kw in launches] == [bm] and rel_err(y, ref) < TOL[torch.float32], m
    launches.clear()
    ops.int4_matmul(torch.randn(40, 256), w_packed, w_scale, blocks=decode)     # blocks alone: one launch for any M
    assert [kw["BLOCK_M"] for *_, kw in launches] == [16]


def test_int4_prefill_blocks():
    """The prefill blocks: BM 128 x BN 128 x BK 128, 2 stages, 8 warps, unsplit, for bf16 activations and scales on
    128-input groups of an N of at least 128; elsewhere (fp16, float32, group 64, N 64) none, and the decode blocks
    serve every step. ``default_int4_prefill_blocks`` reads the scales' dtype and group from the weights."""
    from l4compile.kernels.layout import Int4Blocks, int4_prefill_blocks

    bf16 = torch.bfloat16
    assert int4_prefill_blocks(5120, 5120, 128, bf16, bf16) == Int4Blocks(128, 128, 128, True, num_stages=2,
                                                                          num_warps=8)
    assert int4_prefill_blocks(1024, 5120, 256, bf16, bf16).block_m == 128
    for args in ((5120, 5120, 128, torch.float16, torch.float16), (5120, 5120, 128, torch.float32, bf16),
                 (5120, 5120, 128, bf16, torch.float32), (5120, 5120, 64, bf16, bf16), (64, 5120, 128, bf16, bf16)):
        assert int4_prefill_blocks(*args) is None, args
    try:
        from l4compile.kernels.ops import default_int4_prefill_blocks
    except ImportError:
        return                                                   # no triton: the layout's choice is what matters
    w_packed, w_scale = quantize_int4(torch.randn(256, 512), 128)
    assert default_int4_prefill_blocks(w_packed, w_scale.to(bf16), bf16).block_m == 128
    assert default_int4_prefill_blocks(w_packed, w_scale.to(torch.float32), bf16) is None


class _ThreeInt4(torch.nn.Module):
    """Three Int4 linears in a row, the middle one on a weight that ``splits`` in the pass test says cannot split."""

    def __init__(self):
        super().__init__()
        for i, (n, k) in enumerate([(48, 1024), (40, 48), (24, 40)]):
            w, s = quantize_int4(torch.randn(n, k, generator=torch.Generator().manual_seed(i)), 128)
            self.register_buffer(f"w{i}", w)
            self.register_buffer(f"s{i}", s)

    def forward(self, x):
        for i in range(3):
            x = torch.ops.l4.linear_int4.default(x, getattr(self, f"w{i}"), getattr(self, f"s{i}"))
        return x


def test_split_k_locks_chained(monkeypatch):
    """``backends.inductor.split_k_locks_chained``: the l4::linear_int4 calls that may split K take their counters
    from one new_zeros block handed from call to call (each block read once, so Inductor writes it in place); a call
    that cannot split stays as it was. Run under the interpreter with every GEMM splitting 4 ways, the chained graph
    gives the original graph's output."""
    require_interpreter()
    import dataclasses

    from backends.inductor import split_k_locks_chained
    from l4compile.kernels import ops
    from l4compile.kernels.dispatch import linear_int4_chained
    from l4compile.kernels.layout import SPLIT_K_LOCK_WORDS

    gm = torch.fx.symbolic_trace(_ThreeInt4())
    linear = torch.ops.l4.linear_int4.default
    assert split_k_locks_chained(gm, {linear: (linear_int4_chained, lambda x, w, s: False)}, SPLIT_K_LOCK_WORDS) is None
    chained = split_k_locks_chained(gm, {linear: (linear_int4_chained, lambda x, w, s: w is not gm.w1)},
                                    SPLIT_K_LOCK_WORDS)
    nodes = [n for n in chained.graph.nodes if n.op == "call_function"]
    zeros = [n for n in nodes if n.target is torch.ops.aten.new_zeros.default]
    calls = [n for n in nodes if n.target is linear_int4_chained]
    assert len(zeros) == 1 and zeros[0].args[1] == [SPLIT_K_LOCK_WORDS] and len(calls) == 2
    assert [n.target for n in nodes].count(torch.ops.l4.linear_int4.default) == 1          # w1's call, unchained
    assert calls[0].args[3] is zeros[0] and calls[1].args[3].args == (calls[0], 1)         # zeros -> 1st -> 2nd
    assert all(len(n.users) == 1 for n in zeros + [u for c in calls for u in c.users if u.args[1] == 1])
    real = ops.int4_blocks
    monkeypatch.setattr(ops, "int4_blocks", lambda *a: dataclasses.replace(real(*a), split_k=4))
    x = torch.randn(3, 1024)
    assert rel_err(chained(x), gm(x)) < TOL[torch.float32]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# + the per-expert GEMVs of test_moe_q_fused_cuda's decode-T1 cases (its reference runs them through this kernel)
@pytest.mark.parametrize("m,n,k,group", CASES + [(1, 5120, 5120, 128), (32, 16384, 5120, 128), (1, 96, 64, 64),
                                                 (1, 48, 64, 64), (1, 64, 48, 16)])
def test_int4_mm_cuda(m, n, k, group, dtype):
    require_cuda_kernels()
    x, w_packed, w_scale = _data(m, n, k, group, dtype=dtype, device="cuda")
    out = torch.ops.l4.linear_int4(x, w_packed, w_scale)                          # CUDA dispatch -> l4::int4_mm
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    assert rel_err(out, _linear_int4_impl(x, w_packed, w_scale)) < tol
    if k >= 1024:                                                                  # split-K on real tensor cores
        from l4compile.kernels.layout import Int4Blocks
        from l4compile.kernels.ops import int4_matmul
        for split, warps, fma in ((2, None, True), (8, None, True), (1, 8, True), (4, 8, True), (1, None, False)):
            # warps: 8 a program too; fma False: the byte unpack
            b = Int4Blocks(16, 64, 128, True, split, num_warps=warps, fma_unpack=fma)
            assert rel_err(int4_matmul(x, w_packed, w_scale, blocks=b), _linear_int4_impl(x, w_packed, w_scale)) < tol
        from l4compile.kernels.layout import SPLIT_K_LOCK_WORDS
        lock = torch.zeros(SPLIT_K_LOCK_WORDS, dtype=torch.int32, device="cuda")
        for _ in range(3):                     # chained (l4::int4_mm_chained): the counters come back zeros each call
            out, nxt = int4_matmul(x, w_packed, w_scale, blocks=Int4Blocks(16, 64, 128, True, 8), lock=lock)
            assert rel_err(out, _linear_int4_impl(x, w_packed, w_scale)) < tol
            assert not lock.any() and not nxt.any()
        if dtype == torch.bfloat16:                                                # the inline-PTX unpack
            for split in (1, 8):
                out = int4_matmul(x, w_packed, w_scale, blocks=Int4Blocks(16, 64, 128, True, split, True))
                assert rel_err(out, _linear_int4_impl(x, w_packed, w_scale)) < tol



def _x_pairs_probe():
    """A kernel storing ``int4_mm.x_pairs``' two tiles side by side: out[r] = (x block at even k, at odd k)."""
    import triton
    import triton.language as tl

    @triton.jit
    def probe(x_ptr, out_ptr, M, k0, stride_xr, BM: tl.constexpr, BK: tl.constexpr):
        rows = tl.arange(0, BM)
        xe, xo = x_pairs(x_ptr, rows, rows < M, k0, stride_xr, 1, BK)            # [BM, BK/2] each
        c = tl.arange(0, BK // 2)
        tl.store(out_ptr + rows[:, None] * BK + c[None, :], xe)
        tl.store(out_ptr + rows[:, None] * BK + BK // 2 + c[None, :], xo)
    return probe


def test_x_pairs_splits_a_block_into_even_and_odd_inputs():
    """``int4_mm.x_pairs``, the x operand of the bf16x2 kernels (whose PTX unpack the CPU cannot run): the rows of
    one K block at its even and at its odd inputs, 0 in masked rows."""
    require_interpreter()
    x = torch.randn(3, 96)
    out = torch.full((16, 32), float("nan"))
    _x_pairs_probe()[(1,)](x, out, 3, 64, x.stride(0), BM=16, BK=32)          # the K block 64..95 of 3 rows
    block = x[:, 64:]
    assert torch.equal(out[:3], torch.cat([block[:, 0::2], block[:, 1::2]], dim=1))
    assert torch.equal(out[3:], torch.zeros(13, 32))


def _fma_probes():
    """Kernels storing the FFMA unpack's 8 tiles (``int4_mm.int4_fma_words``, ``int4_fma_tile``; out[n, j * BK/8 + m]
    = tile j [n, m], the weight of input 8m + j of row n, float32: before the cast to x's dtype) and
    ``x_eighths``' 8 tiles of an x block likewise."""
    import triton
    import triton.language as tl

    @triton.jit
    def tiles(w_ptr, s_ptr, out_ptr, N, stride_wn, BN: tl.constexpr, BK: tl.constexpr):
        rn = tl.program_id(0) * BN + tl.arange(0, BN)
        nmask = rn < N
        sc = tl.load(s_ptr + rn, mask=nmask, other=0.0)
        at, lo, hi = int4_fma_words(w_ptr, rn, nmask, 0, stride_wn, BK)
        m = tl.arange(0, BK // 8)
        for j in tl.static_range(8):
            w = int4_fma_tile(at, lo, hi, sc.to(tl.float32)[:, None], j, tl.float32)
            tl.store(out_ptr + rn[:, None] * BK + j * (BK // 8) + m[None, :], w, mask=nmask[:, None])

    @triton.jit
    def eighths(x_ptr, out_ptr, BM: tl.constexpr, BK: tl.constexpr):
        r, k = tl.arange(0, BM), tl.arange(0, BK)
        xs = x_eighths(tl.load(x_ptr + r[:, None] * BK + k[None, :]), BK)
        m = tl.arange(0, BK // 8)
        for j in tl.static_range(8):
            tl.store(out_ptr + r[:, None] * BK + j * (BK // 8) + m[None, :], xs[j])
    return tiles, eighths


def _check_fma_unpack_exact(device: str) -> None:
    """The FFMA unpack's weights on ``device`` against ``dequant_int4``'s: see the two tests below."""
    from l4compile.ops.quant import dequant_int4

    bits = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    mag = bits.float().abs()
    scales = torch.cat([bits[(mag >= 2.0 ** -100) & (mag < 2.0 ** 100)], torch.zeros(1, dtype=torch.bfloat16)])
    n, k = scales.numel(), 128
    m, j = torch.arange(k // 8)[:, None], torch.arange(8)[None, :]
    q = ((m + j) % 16).reshape(k)                                        # word m, nibble j (input 8m + j): all 16
    packed = (q[0::2] | (q[1::2] << 4)).to(torch.uint8).expand(n, k // 2).contiguous()
    packed, scales = packed.to(device), scales.to(device)
    out = torch.full((n, k), float("nan"), device=device)
    _fma_probes()[0][(-(-n // 256),)](packed, scales, out, n, packed.stride(0), BN=256, BK=k)
    ref = dequant_int4(packed, scales[:, None]).cpu()                    # [N, K] float32, k order
    got = out.cpu().view(n, 8, k // 8).transpose(1, 2).reshape(n, k)    # tile j, column m -> input 8m + j
    nonzero = ref != 0
    assert scales.numel() == 51201 and torch.equal(got, ref)                 # equal values (-0 == 0)
    assert torch.equal(got.view(torch.int32)[nonzero], ref.view(torch.int32)[nonzero])      # and the same bits


def test_int4_fma_unpack_is_exact_for_every_nibble_and_scale():
    """The FFMA unpack (1.0f's bits OR-ed around a nibble, then one FFMA) gives the reference's float32 weight
    (q - 8) * s bit for bit: every nibble value in each of the 8 positions of a word, against every bf16 scale with
    2^-100 <= |s| < 2^100 of either sign (51200 of them) and 0. The one difference is the sign of a zero weight (an
    exact sum of opposite terms is +0; the reference's 0 * s for s < 0, or (q - 8) * 0 for q < 8, is -0), which no
    sum of products can tell apart but for an all-zero sum. Under the interpreter tl.fma is a product and a sum, each
    rounded, so this also shows that no step of the unpack rounds."""
    require_interpreter()
    _check_fma_unpack_exact("cpu")


@pytest.mark.gpu
def test_int4_fma_unpack_is_exact_cuda():
    """The same on a GPU, where tl.fma is one FFMA (ptxas' code, not the interpreter's arithmetic)."""
    require_cuda_kernels()
    _check_fma_unpack_exact("cuda")


def test_x_eighths_splits_a_block_by_input_mod_8():
    """``int4_mm.x_eighths``, the x operand of the FFMA unpack: tile j of an x block is its inputs j, j + 8, .."""
    require_interpreter()
    x = torch.randn(16, 128)
    out = torch.full((16, 128), float("nan"))
    _fma_probes()[1][(1,)](x, out, BM=16, BK=128)
    assert torch.equal(out.view(16, 8, 16), x.view(16, 16, 8).transpose(1, 2))


def test_fma_unpack_applies():
    """Where the FFMA unpack runs (``layout.fma_unpack``), and each reason it does not."""
    from l4compile.kernels.layout import Int4Blocks, fma_unpack

    b = Int4Blocks(16, 64, 128, True)
    w, s = torch.zeros(64, 128, dtype=torch.uint8), torch.zeros(64, 2, dtype=torch.bfloat16)
    assert fma_unpack(b, (w,), (s,)) and fma_unpack(b, (torch.zeros(3, 64, 128, dtype=torch.uint8)[1:], w), (s, s))
    for blocks, packed, scales in [
        (Int4Blocks(16, 64, 128, True, fma_unpack=False), w, s),         # asked off (the byte unpack)
        (Int4Blocks(16, 64, 128, True, 1, True), w, s),                   # the bf16x2 unpack instead
        (Int4Blocks(16, 64, 128, False), w, s),                           # scales gathered per element
        (Int4Blocks(16, 64, 64, True), w, s),                             # 8 dots of BK/8 < 16 inputs
        (b, w, s.half()), (b, w, s.float()),                              # not bf16 scales
        (b, w[:, 2:66], s),                                               # storage offset 2: not whole words
        (b, torch.zeros(64, 130, dtype=torch.uint8)[:, :128], s),        # row stride 130
        (b, torch.zeros(128, 64, dtype=torch.uint8).t(), s),              # bytes not contiguous along K
    ]:
        assert not fma_unpack(blocks, (packed,), (scales,)), (blocks, packed.shape, packed.stride(), scales.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_mm_fma_and_byte_unpacks_agree(dtype, monkeypatch, rne_bf16):
    """The default blocks of a group-128 GEMM take the FFMA unpack (the byte unpack when asked not to); both give the
    reference's product. In bf16 (with the interpreter's casts rounding to nearest even, as GPUs do) each matches it
    bit for bit but for accumulation order: the weights are the reference's, rounded once."""
    require_interpreter()
    from l4compile.kernels import layout, ops
    from l4compile.kernels.layout import Int4Blocks

    seen = []
    monkeypatch.setattr(ops, "fma_unpack", lambda *a: seen.append(layout.fma_unpack(*a)) or seen[-1])
    x, w_packed, w_scale = _data(5, 96, 512, 128, dtype=dtype)
    ref = _linear_int4_impl(x, w_packed, w_scale)
    fma = ops.int4_matmul(x, w_packed, w_scale)
    byte = ops.int4_matmul(x, w_packed, w_scale, blocks=Int4Blocks(16, 64, 128, True, fma_unpack=False))
    assert seen == [True, False]
    for out in (fma, byte):
        assert out.dtype == dtype and rel_err(out, ref) < {torch.float32: TOL[dtype], torch.bfloat16: 8e-3}[dtype]
        if dtype == torch.bfloat16:
            assert (out == ref).float().mean() >= 0.99
