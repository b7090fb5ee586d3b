"""l4::moe_fp8_fused (fused Triton MoE on float8_e4m3fn weights, dynamic per-row FP8 activations) against l4::moe_q's
reference (``_moe_q_impl``, every matmul an ``l4::linear_fp8``): under the CPU interpreter here, on CUDA with the gpu
marker. Weights are quantized by ``quantize_fp8`` in the orientation the quantize pass produces ([E, 2I, H] /
[E, H, I] experts, nn.Linear shared expert), with float32 and bf16 scales."""
# T tokens, E experts, H hidden, I expert width, K top-k
from __future__ import annotations

import pytest
import torch

from l4compile.kernels.layout import moe_fp8_blocks
from l4compile.ops.quant import _moe_q_impl
from l4compile.quant import FP8_DTYPE, quantize_fp8

from .conftest import TOL, rel_err, require_cuda_kernels, require_interpreter
from .test_moe_kernel import make_moe


def make_moe_fp8(n_tok: int, hidden: int, inter: int, n_exp: int, dtype=torch.float32, scale_dtype=torch.float32,
                 assign=None, seed=0, device="cpu"):
    """l4::moe_q's arguments (without top_k): ``make_moe``'s float MoE with every expert / shared weight quantized to
    FP8 (one ``scale_dtype`` scale per output channel) in nn.Linear orientation; x and router_w in ``dtype``."""
    x, router_w, gate_up, down, sg, su, sd = make_moe(n_tok, hidden, inter, n_exp, assign=assign, seed=seed)
    weights = (gate_up.transpose(1, 2), down.transpose(1, 2), sg, su, sd)   # [E, 2I, H], [E, H, I], [I, H] x2, [H, I]
    quantized = [t for w in weights for t in quantize_fp8(w, scale_dtype)]
    return tuple(t.to(device) for t in (x.to(dtype), router_w.to(dtype), *quantized))


# (T, H, I, E, K, forced routing or None); tokens per expert include 0 and more than one 16-row tile
CASES = {
    "E1-top1": (5, 32, 24, 1, 1, None),
    "E3-top1-empty-expert": (19, 40, 24, 3, 1, [0] * 17 + [2, 2]),          # expert 1 gets nothing, 0 gets 17
    "E8-top1-odd": (13, 42, 30, 8, 1, None),                                 # K and N tails in both GEMMs
    "E5-top2": (11, 48, 20, 5, 2, None),
    "decode-T1": (1, 64, 48, 4, 1, None),
    "E3-top2-wide": (6, 256, 160, 3, 2, None),                               # several K blocks of 128
}


def _case(case, dtype=torch.float32, scale_dtype=torch.float32, device="cpu"):
    n_tok, hidden, inter, n_exp, top_k, assign = CASES[case]
    return make_moe_fp8(n_tok, hidden, inter, n_exp, dtype, scale_dtype, assign=assign, device=device), top_k


@pytest.mark.parametrize("case", list(CASES))
def test_moe_fp8_fused_matches_reference_fp32(case):
    require_interpreter()
    args, top_k = _case(case)
    ref = _moe_q_impl(*args, top_k)
    out = torch.ops.l4.moe_fp8_fused(*args, top_k)                               # default (static) blocks
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert rel_err(out, ref) < TOL[torch.float32]


@pytest.mark.parametrize("blocks", [((16, 16, 32), (16, 16, 32)), ((32, 64, 64), (32, 32, 128))])
def test_moe_fp8_fused_block_overrides(blocks):
    require_interpreter()
    from l4compile.kernels.ops import fused_moe_fp8

    args, top_k = _case("E3-top2-wide")
    assert rel_err(fused_moe_fp8(*args, top_k, blocks=blocks), _moe_q_impl(*args, top_k)) < TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ["E3-top1-empty-expert", "E5-top2", "decode-T1"])
def test_moe_fp8_fused_low_precision(case, dtype, rne_bf16):
    """16-bit activations, bf16 scales. The bf16 cast rounds as on GPUs (``rne_bf16``): with the interpreter's
    truncation, z and act sit up to one bf16 ulp off, which moves some float8 roundings (6% steps) and the outputs by
    ~6% of their range, an artefact of the interpreter, not of the kernel."""
    require_interpreter()
    args, top_k = _case(case, dtype, scale_dtype=torch.bfloat16)
    out, ref = torch.ops.l4.moe_fp8_fused(*args, top_k), _moe_q_impl(*args, top_k)
    assert out.dtype == dtype and rel_err(out, ref) < TOL[torch.float16]
    assert (out == ref).float().mean() >= 0.97          # rounding steps where the reference has them (see Int4's)


# the 1000x row drives some gates below -88, where the interpreter (numpy) warns that exp(-gate) overflows to inf in
# tl.sigmoid, which then gives 0 and silu(gate) = 0, its limit; the assertions below check those outputs
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
def test_moe_fp8_fused_quantizes_activations_per_row():
    """The kernel's float8 rounding of each row is the reference's: one token scaled up 1000x leaves the others'
    outputs as they were (per-row scales), and rows far from the float8 grid's ties agree to float32 rounding."""
    require_interpreter()
    args, top_k = _case("E3-top1-empty-expert")
    x = args[0].clone()
    x[3] *= 1000.0
    big = (x, *args[1:])
    out, ref = torch.ops.l4.moe_fp8_fused(*big, top_k), _moe_q_impl(*big, top_k)
    assert rel_err(out, ref) < TOL[torch.float32]
    keep = torch.arange(x.shape[0]) != 3
    assert rel_err(out[keep], torch.ops.l4.moe_fp8_fused(*args, top_k)[keep]) < TOL[torch.float32]


def test_round_e4m3_is_torch_cast():
    """The interpreter's float8 rounding (float32 arithmetic) equals torch's cast on every float8 value, every
    midpoint (ties to even) and its float32 neighbours, subnormals and random values; Triton 3.7's own interpreted
    float32 -> float8e4nv cast does not (it drops the carry of a rounded-up mantissa: 124.3 -> 64; 92 of 4096
    values drawn with std 100 come out wrong)."""
    require_interpreter()
    import triton

    from ._fp8_rounding import rounded_kernel

    grid = torch.arange(256, dtype=torch.uint8).view(FP8_DTYPE).float()
    grid = grid[grid.isfinite()].unique()
    mids = (grid[1:] + grid[:-1]) / 2
    g = torch.Generator().manual_seed(0)
    x = torch.cat([grid, mids, mids.nextafter(torch.tensor(1e9)), mids.nextafter(torch.tensor(-1e9)),
                   torch.randn(3000, generator=g) * 60, torch.randn(500, generator=g) * 1e-3,
                   torch.tensor([1e-30, -1e-30, 124.3])]).clamp(-448, 448)
    x = torch.cat([x, torch.zeros(triton.next_power_of_2(x.numel()) - x.numel())])
    y = torch.empty_like(x)
    rounded_kernel[(1,)](x, y, N=x.numel())
    assert torch.equal(y, x.to(FP8_DTYPE).float())


def test_moe_fp8_fused_no_tokens():
    require_interpreter()
    args = make_moe_fp8(0, 32, 16, 4)
    assert torch.ops.l4.moe_fp8_fused(*args, 1).shape == (0, 32)


def test_moe_fp8_blocks():
    gate_up, down = moe_fp8_blocks(5120, 8192)                                    # Scout
    assert gate_up == (16, 64, 128) and down == (16, 64, 128)
    assert moe_fp8_blocks(24, 20) == ((16, 16, 32), (16, 16, 32))               # BK >= 32: FP8 MMAs step K by 32


def test_moe_q_dispatches_fp8_to_the_fused_kernel():
    """In CUDA engines l4::moe_q on float8 weights decomposes to l4::moe_fp8_fused (same numbers), not the Int4 op; an
    activation dtype other than the router's keeps the opaque op (checked on CPU tensors: the choice reads dtypes
    only)."""
    require_interpreter()
    from torch.fx.experimental.proxy_tensor import make_fx

    from l4compile.kernels import dispatch

    args, top_k = _case("decode-T1", torch.bfloat16)
    assert dispatch.fused_moe_fp8_supported(*args)
    assert not dispatch.fused_moe_int4_supported(*args)
    assert not dispatch.fused_moe_fp8_supported(args[0].float(), *args[1:])      # router in another dtype
    decompose = dispatch.cuda_decompositions()[torch.ops.l4.moe_q.default]
    gm = make_fx(lambda *a: decompose(*a, top_k))(*args)
    ops = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    assert "l4.moe_fp8_fused.default" in ops and "l4.moe_q.default" not in ops
    assert rel_err(gm(*args), _moe_q_impl(*args, top_k)) < TOL[torch.bfloat16]
    assert dispatch.moe_q_decomposition(args[0].float(), *args[1:], top_k) is NotImplemented


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
def test_moe_fp8_fused_cuda(case, dtype):
    """CUDA dispatch of l4::moe_q on float8 weights -> l4::moe_fp8_fused against the reference on the same device
    (its matmuls through l4::linear_fp8 = torch._scaled_mm where the shapes allow)."""
    require_cuda_kernels()
    args, top_k = _case(case, dtype, device="cuda")
    out = torch.ops.l4.moe_q(*args, top_k)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    assert out.dtype == dtype and out.is_cuda
    assert rel_err(out, _moe_q_impl(*args, top_k)) < tol


@pytest.mark.gpu
def test_moe_fp8_fused_cuda_scout_width():
    """One Scout-width FP8 MoE block (H 5120, I 8192, 16 experts) at decode and prefill token counts, against the
    reference on the same GPU."""
    require_cuda_kernels()
    hidden, inter, n_exp = 5120, 8192, 16
    g = torch.Generator(device="cuda").manual_seed(0)
    r = lambda *s, std=0.02: torch.randn(*s, generator=g, device="cuda") * std  # noqa: E731
    weights = [t for w in (r(n_exp, 2 * inter, hidden), r(n_exp, hidden, inter), r(inter, hidden), r(inter, hidden),
                           r(hidden, inter)) for t in quantize_fp8(w)]
    router_w = r(n_exp, hidden, std=0.3).bfloat16()
    for n_tok in (1, 32, 2048):
        x = r(n_tok, hidden, std=1.0).bfloat16()
        assert rel_err(torch.ops.l4.moe_q(x, router_w, *weights, 1), _moe_q_impl(x, router_w, *weights, 1)) < 2e-2
