"""l4::moe_q_fused (fused Triton MoE on Int4 weights) against l4::moe_q's reference (``_moe_q_impl``): under the CPU
interpreter here, on CUDA with the gpu marker. Weights are quantized by ``quantize_int4`` in the orientation the
quantize pass produces ([E, 2I, H] / [E, H, I] experts, nn.Linear shared expert), with group 128, the smaller groups
gcd(K, 128) shrinks it to, and asked groups 6 / 12, so both scale modes (one per K block, gathered per element) and
K / N tails run."""
# T tokens, E experts, H hidden, I expert width, K top-k, G asked group size (Gh = gcd(H, G), Gi = gcd(I, G))
from __future__ import annotations

import pytest
import torch

from l4compile.kernels.layout import Int4Blocks, moe_int4_blocks
from l4compile.ops.moe import _moe_impl
from l4compile.ops.quant import _moe_q_impl, dequant_int4
from l4compile.quant import quantize_int4

from .conftest import TOL, rel_err, require_cuda_kernels, require_interpreter
from .test_moe_kernel import make_moe


def make_moe_q(n_tok: int, hidden: int, inter: int, n_exp: int, group: int, dtype=torch.float32, assign=None,
               seed=0, device="cpu"):
    """l4::moe_q's arguments (without top_k): ``make_moe``'s float MoE with every expert / shared weight quantized
    to Int4 (bf16 scales) in nn.Linear orientation; x and router_w in ``dtype``."""
    x, router_w, gate_up, down, sg, su, sd = make_moe(n_tok, hidden, inter, n_exp, assign=assign, seed=seed)
    weights = (gate_up.transpose(1, 2), down.transpose(1, 2), sg, su, sd)   # [E, 2I, H], [E, H, I], [I, H] x2, [H, I]
    packed = [t for w in weights for t in quantize_int4(w, group)]
    return tuple(t.to(device) for t in (x.to(dtype), router_w.to(dtype), *packed))


def dequant_moe_args(args, dtype):
    """The same MoE with dequantized weights rounded to ``dtype`` in l4::moe's HF layouts (for ``_moe_impl``)."""
    x, router_w, gu_q, gu_s, dn_q, dn_s, sg_q, sg_s, su_q, su_s, sd_q, sd_s = args
    w = lambda q, s: dequant_int4(q, s).to(dtype)  # noqa: E731
    return (x, router_w, w(gu_q, gu_s).transpose(1, 2), w(dn_q, dn_s).transpose(1, 2), w(sg_q, sg_s),
            w(su_q, su_s), w(sd_q, sd_s))


# (T, H, I, E, K, forced routing or None, G); tokens per expert include 0 and more than one 16-row tile
CASES = {
    "E1-top1-G32": (5, 32, 24, 1, 1, None, 128),                                  # Gh 32 (per block), Gi 8
    "E3-top1-empty-expert-G8": (19, 40, 24, 3, 1, [0] * 17 + [2, 2], 128),       # expert 1 empty, 0 gets 17 rows
    "E8-top1-G6": (13, 42, 30, 8, 1, None, 6),                                    # odd group: gathered scales, K tails
    "E5-top2-G12": (11, 48, 20, 5, 2, None, 12),                                  # Gh 12, Gi 4
    "decode-T1-G64": (1, 64, 48, 4, 1, None, 128),                                # Gh 64, Gi 16
    "decode-T1-top2": (1, 64, 48, 4, 2, None, 128),
    "E3-top2-G128": (6, 256, 128, 3, 2, None, 128),                               # Gh = Gi = 128, BK 128
    "E2-top1-G32-words": (7, 128, 128, 2, 1, None, 32),                           # scales as words: 2 steps of 2G each
}


def _case(case, dtype=torch.float32, device="cpu"):
    n_tok, hidden, inter, n_exp, top_k, assign, group = CASES[case]
    return make_moe_q(n_tok, hidden, inter, n_exp, group, dtype=dtype, assign=assign, device=device), top_k


@pytest.mark.parametrize("case", list(CASES))
def test_moe_q_fused_matches_reference_fp32(case):
    require_interpreter()
    args, top_k = _case(case)
    ref = _moe_q_impl(*args, top_k)
    out = torch.ops.l4.moe_q_fused(*args, top_k)                                 # default (static) blocks
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert rel_err(out, ref) < TOL[torch.float32]


@pytest.mark.parametrize("case,blocks", [
    ("decode-T1-G64", (Int4Blocks(16, 16, 16, True), Int4Blocks(16, 16, 16, True))),     # several K steps per group
    ("E3-top2-G128", (Int4Blocks(16, 64, 32, True), Int4Blocks(16, 64, 64, True))),      # 4 / 2 K blocks per group
    ("E3-top2-G128", (Int4Blocks(16, 64, 64, False), Int4Blocks(16, 64, 32, False))),    # gathered at G 128
    ("E3-top2-G128", (Int4Blocks(16, 64, 64, True), Int4Blocks(16, 64, 32, True, 3))),   # down: 4 K blocks in 2+2
    ("decode-T1-G64", (Int4Blocks(16, 16, 16, True), Int4Blocks(16, 16, 16, True, 3))),  # down: 3 K blocks, 1 each
    ("E8-top1-G6", (Int4Blocks(16, 16, 32, False), Int4Blocks(16, 16, 16, False, 2))),   # down: 16 + a tail of 14
    ("decode-T1-G64", (Int4Blocks(16, 16, 16, True, 4), Int4Blocks(16, 16, 16, True))),  # gate_up: 4 K blocks, 1 each
    ("E3-top2-G128", (Int4Blocks(16, 64, 32, True, 3), Int4Blocks(16, 64, 32, True, 4))),  # 8 blocks as 3+3+2; 4x1
    ("E8-top1-G6", (Int4Blocks(16, 16, 32, False, 2), Int4Blocks(16, 16, 16, False, 2))),  # gate_up: 32 + tail of 10
    ("E2-top1-G32-words", (Int4Blocks(16, 32, 16, True, 3), Int4Blocks(16, 32, 32, True, 2))),  # 2 steps: 1+1 each
])
def test_moe_q_fused_block_overrides(case, blocks):
    require_interpreter()
    from l4compile.kernels.ops import fused_moe_int4

    args, top_k = _case(case)
    assert rel_err(fused_moe_int4(*args, top_k, blocks=blocks), _moe_q_impl(*args, top_k)) < TOL[torch.float32]


def test_split_moe_counters_come_zeroed_from_the_route_kernel(monkeypatch):
    """Top-1: both split GEMMs' tile counters are allocated unset and zeroed by the route launch (no fill kernels).
    Poisoned at allocation, they still give the reference's output; without the route kernel's zeroing no program
    would see its tile complete."""
    require_interpreter()
    from l4compile.kernels import ops

    real, poisoned = ops._split_k_buffers, []

    def poison(*a, **kw):
        out = real(*a, **kw)
        if kw.get("zero_locks", a[7] if len(a) > 7 else True) is False:
            out[2].fill_(5)
            poisoned.append(out[2].numel())
        return out

    monkeypatch.setattr(ops, "_split_k_buffers", poison)
    args, top_k = _case("decode-T1-G64")
    split = (Int4Blocks(16, 16, 16, True, 4), Int4Blocks(16, 16, 16, True, 3))
    assert rel_err(ops.fused_moe_int4(*args, top_k, blocks=split), _moe_q_impl(*args, top_k)) < TOL[torch.float32]
    assert len(poisoned) == 2 and min(poisoned) > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ["E3-top1-empty-expert-G8", "E5-top2-G12", "decode-T1-G64"])
def test_moe_q_fused_low_precision(case, dtype):
    require_interpreter()
    args, top_k = _case(case, dtype)
    out = torch.ops.l4.moe_q_fused(*args, top_k)
    assert out.dtype == dtype and rel_err(out, _moe_q_impl(*args, top_k)) < TOL[dtype]


def test_moe_q_fused_refuses_the_unpack_it_cannot_run():
    require_interpreter()
    from l4compile.kernels.ops import fused_moe_int4

    args, top_k = _case("E3-top2-G128", torch.bfloat16)                           # H 256, I 128
    plain, asm = Int4Blocks(16, 64, 64, True), Int4Blocks(16, 64, 64, True, 1, True)
    for blocks, gemm in (((asm, plain), r"\[128 x 256\]"), ((plain, asm), r"\[256 x 128\]")):
        with pytest.raises(ValueError, match=gemm + ".*the CPU interpreter cannot run"):
            fused_moe_int4(*args, top_k, blocks=blocks)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_moe_q_fused_rounds_like_reference(dtype, rne_bf16):
    """Every rounding step (weight, z, gate, up, silu, act, y) sits where the reference has it: with the interpreter's
    float32 -> bf16 cast made round-to-nearest-even as on GPUs (Triton 3.7's interpreter truncates, hence TOL's loose
    bf16 bound; float16 casts already round), outputs are bit-identical to the reference (all of them here; >= 99%
    allows for accumulation-order ties), where one misplaced rounding leaves only ~40-80% identical."""
    require_interpreter()
    from l4compile.kernels.ops import fused_moe_int4

    for case in ("E1-top1-G32", "E5-top2-G12", "decode-T1-G64", "E3-top2-G128"):
        args, top_k = _case(case, dtype)
        if case == "E3-top2-G128":                      # packed as the quantize pass stores it: the FFMA unpack
            args = tuple(t.contiguous() for t in args)
        out, ref = torch.ops.l4.moe_q_fused(*args, top_k), _moe_q_impl(*args, top_k)
        assert (out == ref).float().mean() >= 0.99 and rel_err(out, ref) < TOL[torch.float16], case
    # split GEMMs round their float32 partials' sum once, where the unsplit ones round their sum; the split gate_up
    # rounds gate and up, then silu and act, only in the program that adds the last partial
    args, top_k = _case("decode-T1-G64", dtype)
    for split in ((Int4Blocks(16, 16, 16, True), Int4Blocks(16, 16, 16, True, 3)),
                  (Int4Blocks(16, 16, 16, True, 4), Int4Blocks(16, 16, 16, True, 3))):
        out, ref = fused_moe_int4(*args, top_k, blocks=split), _moe_q_impl(*args, top_k)
        assert (out == ref).float().mean() >= 0.99 and rel_err(out, ref) < TOL[torch.float16]


def test_moe_q_fused_fma_and_byte_unpacks(monkeypatch):
    """At group 128, on weights packed as the quantize pass stores them (contiguous), both GEMMs' default blocks take
    the FFMA unpack (``layout.fma_unpack``: BK 128, bf16 scales, word-aligned rows, the shared expert's too); asked
    not to, or on packed bytes strided along K (``make_moe_q``'s transposed quantization), the byte unpack. Every way
    gives the reference's output."""
    require_interpreter()
    from l4compile.kernels import layout, ops

    seen = []
    monkeypatch.setattr(ops, "fma_unpack", lambda *a: seen.append(layout.fma_unpack(*a)) or seen[-1])
    strided, top_k = _case("E3-top2-G128")                                        # H 256, I 128: BK 128 both
    args = tuple(t.contiguous() for t in strided)
    ref = _moe_q_impl(*args, top_k)
    assert rel_err(torch.ops.l4.moe_q_fused(*args, top_k), ref) < TOL[torch.float32]
    byte = (Int4Blocks(16, 64, 128, True, fma_unpack=False),) * 2
    assert rel_err(ops.fused_moe_int4(*args, top_k, blocks=byte), ref) < TOL[torch.float32]
    assert rel_err(torch.ops.l4.moe_q_fused(*strided, top_k), ref) < TOL[torch.float32]
    assert seen == [True, True, False, False, False, False]


def test_decode_steps_build_their_tiles_in_the_gemms(launches):
    """Top-1 with both GEMMs unsplit: a 1-token step launches the route kernel with an empty grid (an engine skips
    it) and the GEMMs map the step from its logits (``moe_route.tile_span``); from 2 tokens, or with a split GEMM
    (whose counters the route launch zeroes), the route kernel runs. Every way gives the reference's output. The
    bf16 MoE (``l4::moe_fused``) maps a 1-token step the same way."""
    require_interpreter()
    from l4compile.kernels import ops

    split = (Int4Blocks(16, 16, 16, True, 2), Int4Blocks(16, 16, 16, True))
    for n_tok, blocks, route_grid in ((1, None, 0), (2, None, 1), (17, None, 1), (1, split, 1)):
        args = make_moe_q(n_tok, 64, 48, 4, 128, seed=n_tok)
        launches.clear()
        out = ops.fused_moe_int4(*args, 1, blocks=blocks)
        assert rel_err(out, _moe_q_impl(*args, 1)) < TOL[torch.float32], (n_tok, blocks)
        assert [g for name, g, _ in launches if name == "moe_route_kernel"] == [(route_grid,)], (n_tok, launches)
        assert [name for name, *_ in launches][1:] == ["moe_int4_gate_up_kernel", "moe_int4_down_kernel"]
    for n_tok, route_grid in ((1, 0), (3, 1)):                                   # the bf16 MoE maps the same way
        args = make_moe(n_tok, 64, 48, 4, seed=n_tok)
        launches.clear()
        assert rel_err(ops.fused_moe(*args, 1), _moe_impl(*args, 1)) < TOL[torch.float32]
        assert [g for name, g, _ in launches if name == "moe_route_kernel"] == [(route_grid,)], (n_tok, launches)


@pytest.mark.parametrize("norm", [False, True])
def test_moe_prefill_blocks_take_the_long_steps(norm, monkeypatch, launches):
    """Top-1 steps of more than INT4_PREFILL_ROWS tokens run the prefill blocks: a route launch of their own BM (the
    decode map's launch is not made) and their gate_up and down launches; shorter steps the decode blocks' (at one
    token too, where it zeroes the split down's counters). Both tilings write the same row map, activations and
    output, so the combine (or, with ``norm``, l4::moe_q_fused_norm's combine + residual add + RMSNorm, in the
    down launch at one token and in moe_norm_kernel's launch past it) reads the step's. Every way gives the
    reference's output."""
    require_interpreter()
    from l4compile.kernels import ops

    monkeypatch.setattr(ops, "INT4_PREFILL_ROWS", 4)
    decode = (Int4Blocks(16, 16, 32, True), Int4Blocks(16, 16, 32, True, 2))     # down split: counters zeroed
    prefill = (Int4Blocks(32, 32, 64, True), Int4Blocks(32, 16, 128, True))
    for n_tok, bm in ((1, 16), (4, 16), (5, 32), (23, 32)):
        args = make_moe_q(n_tok, 128, 128, 3, 128, seed=n_tok)
        ref = _moe_q_impl(*args, 1)
        launches.clear()
        if norm:
            residual = torch.randn(n_tok, 128, generator=torch.Generator().manual_seed(n_tok))
            norm_w = 1 + 0.1 * torch.randn(128, generator=torch.Generator().manual_seed(0))
            h, xn = ops.fused_moe_int4(*args, 1, blocks=decode, prefill=prefill, norm=(residual, norm_w, 1e-5))
            h_ref = residual + ref
            x_ref = h_ref * torch.rsqrt(h_ref.pow(2).mean(-1, keepdim=True) + 1e-5) * norm_w
            assert rel_err(h, h_ref) < TOL[torch.float32] and rel_err(xn, x_ref) < TOL[torch.float32], n_tok
        else:
            out = ops.fused_moe_int4(*args, 1, blocks=decode, prefill=prefill)
            assert rel_err(out, ref) < TOL[torch.float32], n_tok
        gemms = [(name, kw["BLOCK_M"]) for name, _, kw in launches if name != "moe_norm_kernel"]
        assert gemms == [("moe_route_kernel", bm), ("moe_int4_gate_up_kernel", bm), ("moe_int4_down_kernel", bm)], \
            (n_tok, launches)
        assert launches[0][1] == (1,)         # the route runs at one token too: it zeroes the split down's counters
    args = make_moe_q(5, 128, 128, 3, 128)
    with pytest.raises(ValueError, match="prefill blocks take top-1 routing and do not split K"):
        ops.fused_moe_int4(*args, 2, blocks=decode, prefill=prefill)
    with pytest.raises(ValueError, match="prefill blocks take top-1 routing and do not split K"):
        ops.fused_moe_int4(*args, 1, blocks=decode, prefill=(prefill[0], Int4Blocks(32, 16, 128, True, 2)))
    with pytest.raises(ValueError, match="must share BM"):
        ops.fused_moe_int4(*args, 1, blocks=decode, prefill=(prefill[0], Int4Blocks(64, 16, 128, True)))


def test_moe_int4_prefill_blocks():
    """BM 64 x BN 64 x BK 128, 2 stages, 4 warps for both GEMMs, bf16 activations and scales on 128-input groups;
    none elsewhere (the decode blocks serve every step)."""
    from l4compile.kernels.layout import moe_int4_prefill_blocks

    bf16 = torch.bfloat16
    gate_up, down = moe_int4_prefill_blocks(5120, 8192, 128, 128, bf16, bf16)
    assert gate_up == down == Int4Blocks(64, 64, 128, True, num_stages=2, num_warps=4)
    assert moe_int4_prefill_blocks(5120, 8192, 128, 64, bf16, bf16) is None
    assert moe_int4_prefill_blocks(5120, 8192, 128, 128, torch.float16, torch.float16) is None
    assert moe_int4_prefill_blocks(64, 128, 64, 128, bf16, bf16) is None


def test_moe_q_fused_no_tokens():
    require_interpreter()
    args = make_moe_q(0, 32, 16, 4, 128)
    assert torch.ops.l4.moe_q_fused(*args, 1).shape == (0, 32)


def test_moe_int4_blocks():
    gate_up, down = moe_int4_blocks(5120, 8192, 128, 128)                         # Scout, group 128
    assert (gate_up.block_m, gate_up.block_k, gate_up.scale_per_block) == (16, 128, True)
    assert (down.block_m, down.block_n, down.block_k) == (16, 64, 128)
    gate_up, down = moe_int4_blocks(42, 30, 6, 6)
    assert not gate_up.scale_per_block and (gate_up.block_n, down.block_n, down.block_k) == (16, 32, 32)


def test_moe_q_cuda_registered_and_cpu_unchanged():
    """The CUDA registration leaves CPU tensors on the reference, bit for bit (no Triton needed)."""
    assert torch._C._dispatch_has_kernel_for_dispatch_key("l4::moe_q", "CUDA")
    for dtype in (torch.float32, torch.bfloat16):
        for case in ("E5-top2-G12", "decode-T1-G64"):
            args, top_k = _case(case, dtype)
            assert torch.equal(torch.ops.l4.moe_q(*args, top_k), _moe_q_impl(*args, top_k))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
def test_moe_q_fused_cuda(case, dtype):
    """CUDA dispatch of l4::moe_q -> l4::moe_q_fused against the reference on the same device (same routing): the
    op's own reference (its matmuls through l4::int4_mm) and cuBLAS on the dequantized weights (``_moe_impl``)."""
    require_cuda_kernels()
    args, top_k = _case(case, dtype, device="cuda")
    out = torch.ops.l4.moe_q(*args, top_k)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    assert out.dtype == dtype and out.is_cuda
    # both errors and the references' own disagreement in one message: the bf16 decode-T1 cases failed on the
    # 2026-12-04 H200 with their values lost; _moe_q_impl runs its GEMVs through the Triton int4_mm on CUDA
    ref_q, ref_dense = _moe_q_impl(*args, top_k), _moe_impl(*dequant_moe_args(args, dtype), top_k)
    errs = {"moe_q reference": rel_err(out, ref_q), "dequantized cuBLAS": rel_err(out, ref_dense),
            "reference vs reference": rel_err(ref_q, ref_dense)}
    if case == "E3-top2-G128":          # packed as the quantize pass stores them: both GEMMs take the FFMA unpack
        errs["FFMA unpack"] = rel_err(torch.ops.l4.moe_q(*(t.contiguous() for t in args), top_k), ref_dense)
    assert max(v for k, v in errs.items() if k != "reference vs reference") < tol, errs


@pytest.mark.gpu
def test_moe_q_fused_cuda_scout_width():
    """One Scout-width Int4 MoE block (H 5120, I 8192, 16 experts, group 128) at decode and prefill token counts."""
    require_cuda_kernels()
    hidden, inter, n_exp = 5120, 8192, 16
    g = torch.Generator(device="cuda").manual_seed(0)
    r = lambda *s, std=0.02: torch.randn(*s, generator=g, device="cuda") * std  # noqa: E731
    weights = [t for w in (r(n_exp, 2 * inter, hidden), r(n_exp, hidden, inter), r(inter, hidden), r(inter, hidden),
                           r(hidden, inter)) for t in quantize_int4(w, 128)]
    router_w = r(n_exp, hidden, std=0.3).bfloat16()
    dense = dequant_moe_args((None, router_w, *weights), torch.bfloat16)[1:]
    from l4compile.kernels.ops import fused_moe_int4

    # gate_up: 40 K blocks, 10 each; down: 64 K blocks, 16 each (the tile's last program adds the partials: on a GPU
    # the programs finish in any order, so this is where the counter's memory ordering is tested)
    split = (Int4Blocks(16, 64, 128, True, 4), Int4Blocks(16, 64, 128, True, 4))
    asm = (Int4Blocks(16, 64, 128, True, 4, True), Int4Blocks(16, 64, 128, True, 4, True))   # the PTX unpack
    for n_tok in (1, 32, 2048):
        x = r(n_tok, hidden, std=1.0).bfloat16()
        ref = _moe_impl(x, *dense, 1)
        assert rel_err(torch.ops.l4.moe_q(x, router_w, *weights, 1), ref) < 2e-2
        assert rel_err(fused_moe_int4(x, router_w, *weights, 1, blocks=split), ref) < 2e-2
        assert rel_err(fused_moe_int4(x, router_w, *weights, 1, blocks=asm), ref) < 2e-2


@pytest.mark.gpu
def test_moe_q_fused_cuda_aoti_symbolic_tokens(tmp_path):
    """What a --device cuda Int4 engine does: export with a dynamic token count, apply the CUDA decompositions
    (l4::moe_q -> l4::moe_q_fused), compile with AOTInductor and run the package at several token counts."""
    require_cuda_kernels()
    from l4compile.kernels.dispatch import cuda_decompositions

    args, top_k = _case("E3-top2-G128", torch.bfloat16, device="cuda")

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for i, t in enumerate(args[1:]):
                self.register_buffer(f"b{i}", t)

        def forward(self, x):
            return torch.ops.l4.moe_q(x, *(getattr(self, f"b{i}") for i in range(len(args) - 1)), top_k)

    ep = torch.export.export(M(), (args[0],), dynamic_shapes={"x": {0: torch.export.Dim("T", min=1, max=4096)}})
    ep = ep.run_decompositions(cuda_decompositions())
    targets = {str(n.target) for n in ep.graph.nodes}
    assert "l4.moe_q_fused.default" in targets and "l4.moe_q.default" not in targets
    with torch.no_grad():
        pkg = torch._inductor.aoti_load_package(
            torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "moe_q.pt2")))
    for n_tok in (1, 7, 300):
        x = torch.randn(n_tok, args[0].shape[1], device="cuda", dtype=torch.bfloat16)
        assert rel_err(pkg(x), _moe_q_impl(x, *args[1:], top_k)) < 2e-2
