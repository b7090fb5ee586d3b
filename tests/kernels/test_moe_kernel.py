"""l4::moe_fused (Triton fused MoE) against the reference op l4::moe: under the CPU interpreter here, on CUDA with
the gpu marker. Routing is forced through the router so that some experts get no token and one gets more tokens
than a tile holds."""
# T tokens, E experts, H hidden, I expert width, K top-k
from __future__ import annotations

import pytest
import torch

from l4compile.ops.moe import _moe_impl, moe_reference

from .conftest import TOL, rel_err, require_cuda_kernels, require_interpreter


def make_moe(n_tok: int, hidden: int, inter: int, n_exp: int, dtype=torch.float32, assign=None, seed=0,
             device="cpu"):
    """(x, router_w, gate_up, down, shared_gate, shared_up, shared_down). ``assign`` [T] forces token t's top
    expert: router_w[e] = 4 * unit(e) and x[t, assign[t]] += 3 (H >= E)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, std=1.0: torch.randn(*s, generator=g) * std  # noqa: E731
    x = r(n_tok, hidden)
    router_w = r(n_exp, hidden, std=0.3)
    if assign is not None:
        router_w = torch.zeros(n_exp, hidden)
        router_w[torch.arange(n_exp), torch.arange(n_exp)] = 4.0
        x[:, :n_exp] *= 0.1
        x[torch.arange(n_tok), torch.as_tensor(assign)] += 3.0
    ws = (router_w, r(n_exp, hidden, 2 * inter, std=0.2), r(n_exp, inter, hidden, std=0.2),
          r(inter, hidden, std=0.2), r(inter, hidden, std=0.2), r(hidden, inter, std=0.2))
    return tuple(t.to(device=device, dtype=dtype) for t in (x, *ws))


# (T, H, I, E, K, forced routing or None); tokens per expert include 0 and more than one 16-row tile
CASES = {
    "E1-top1": (5, 32, 24, 1, 1, None),
    "E3-top1-empty-expert": (19, 40, 24, 3, 1, [0] * 17 + [2, 2]),          # expert 1 gets nothing, 0 gets 17
    "E8-top1-odd": (13, 37, 29, 8, 1, None),
    "E5-top2": (11, 48, 20, 5, 2, None),
    "decode-T1": (1, 64, 48, 4, 1, None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fused_moe_matches_reference_fp32(case):
    require_interpreter()
    from l4compile.kernels.ops import fused_moe

    n_tok, hidden, inter, n_exp, top_k, assign = CASES[case]
    args = make_moe(n_tok, hidden, inter, n_exp, assign=assign)
    ref = _moe_impl(*args, top_k)
    out = fused_moe(*args, top_k, blocks=(16, 16, 16))                          # several tiles / K steps
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert rel_err(out, ref) < TOL[torch.float32]
    assert rel_err(out, moe_reference(*args, top_k)) < TOL[torch.float32]     # HF's dense formula too


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_moe_low_precision(dtype):
    require_interpreter()
    args = make_moe(19, 40, 24, 3, dtype=dtype, assign=[0] * 17 + [2, 2])
    out = torch.ops.l4.moe_fused(*args, 1)                                     # the registered op, default blocks
    assert out.dtype == dtype and rel_err(out, _moe_impl(*args, 1)) < TOL[dtype]


def test_fused_moe_no_tokens():
    require_interpreter()
    args = make_moe(0, 32, 16, 4)
    out = torch.ops.l4.moe_fused(*args, 1)
    assert out.shape == (0, 32)


def test_input_side_scaling():
    """Scaling the expert OUTPUT instead of its input gives a different answer: the kernel must match the input form."""
    require_interpreter()
    from l4compile.kernels.ops import fused_moe

    args = make_moe(7, 32, 16, 2, seed=3)
    out = fused_moe(*args, 1, blocks=(16, 16, 16))
    x, router_w, gate_up, down, sg, su, sd = args
    s = torch.sigmoid((x @ router_w.t()).max(1).values)[:, None]
    e = (x @ router_w.t()).argmax(1)
    gate, up = torch.einsum("th,thi->ti", x, gate_up[e]).chunk(2, dim=1)
    wrong = torch.nn.functional.linear(torch.nn.functional.silu(x @ sg.t()) * (x @ su.t()), sd) \
        + s * torch.einsum("ti,tih->th", up * torch.nn.functional.silu(gate), down[e])
    assert rel_err(out, _moe_impl(*args, 1)) < TOL[torch.float32] and rel_err(out, wrong) > 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
def test_fused_moe_cuda(case, dtype):
    require_cuda_kernels()
    n_tok, hidden, inter, n_exp, top_k, assign = CASES[case]
    args = make_moe(n_tok, hidden, inter, n_exp, dtype=dtype, assign=assign, device="cuda")
    ref = _moe_impl(*args, top_k)
    out = torch.ops.l4.moe(*args, top_k)                                       # CUDA dispatch -> l4::moe_fused
    assert rel_err(out, ref) < {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]


@pytest.mark.gpu
def test_fused_moe_cuda_scout_width():
    """One Scout-width MoE block (H 5120, I 8192, 16 experts) at decode and prefill token counts, bf16."""
    require_cuda_kernels()
    for n_tok in (1, 32, 2048):
        args = make_moe(n_tok, 5120, 8192, 16, dtype=torch.bfloat16, device="cuda")
        assert rel_err(torch.ops.l4.moe_fused(*args, 1), _moe_impl(*args, 1)) < 2e-2
