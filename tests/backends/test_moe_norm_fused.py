"""backends.moe_norm_fused: a CUDA engine's step runs each MoE layer's combine, the residual add after it and the next
RMSNorm (the next layer's input norm, or the final norm) in the fused MoE's launches. The rewritten step graph, run
here on CPU tensors with the Triton kernels under the interpreter, gives the step graph's logits; what does not match
the pattern exactly is left as it is."""
from __future__ import annotations

import copy

import pytest
import torch

from backends.moe_norm_fused import moe_norm_fused
from tests.backends.test_norm_router_fused import _fused as _norm_router_fused
from tests.backends.test_norm_router_fused import _program, _targets
from tests.kernels.conftest import rel_err, require_interpreter


def _fused(gm):
    from l4compile.kernels import dispatch

    return moe_norm_fused(gm, {dispatch.moe_routed: dispatch.moe_routed_norm,
                               dispatch.moe_q_routed: dispatch.moe_q_routed_norm})


@pytest.mark.parametrize("quant", ["none", "int4"])
def test_step_graph_with_moe_norm_fused_gives_the_same_logits(quant, monkeypatch):
    """Every MoE layer of tiny (4) is rewritten, the last one's with the final norm: the norms after the MoEs are
    gone from the graph (only the first layer's input norm is left) and so are the residual adds after them. A
    prefill longer than the down launch's epilogue takes (its own launch) and a decode step of a batch of 2 (the
    counters in the down launch, here taking up to 32 tokens) give the graph's logits."""
    require_interpreter()
    from l4compile.kernels import ops

    monkeypatch.setattr(ops, "MOE_NORM_DECODE_TOKENS", 32)
    prog = _program(quant)
    gm, _ = _norm_router_fused(prog.gm)
    fused, count = _fused(gm)
    n_layers = len(prog.kv_layout["layers"])
    assert count == n_layers
    before, after = _targets(gm), _targets(fused)
    routed = "moe_q_routed" if quant == "int4" else "moe_routed"
    assert after.count(routed + "_norm") == n_layers and routed not in after
    assert after.count("aten.rsqrt.default") == before.count("aten.rsqrt.default") - n_layers == 1   # layer 0's
    assert after.count("aten.add.Tensor") == before.count("aten.add.Tensor") - 2 * n_layers   # residual, eps

    _, n_kv, _, d = prog.kv_layout["shape"]
    caches = [[torch.zeros(2, n_kv, layer["slots"], d) for layer in prog.kv_layout["layers"] for _ in (0, 1)]
              for _ in range(2)]
    n_prompt = 19                                                              # 2 x 19 tokens > 32
    ids = torch.randint(0, prog.model_config.vocab_size, (2, n_prompt + 1),
                        generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for x, start in ((ids[:, :n_prompt], 0), (ids[:, n_prompt:], n_prompt)):
            pos = torch.tensor([start])
            ref, got = gm(x, pos, *caches[0]), fused(x, pos, *caches[1])
            assert rel_err(got[0], ref[0]) < 1e-5, start
            caches = [list(ref[1:]), list(got[1:])]


def test_what_does_not_match_is_left_alone():
    """A layer whose MoE output is read by another node, and one whose next norm's mean is read elsewhere, keep
    their add and norm; the others are rewritten."""
    prog = _program("int4")
    gm, _ = _norm_router_fused(prog.gm)
    gm = copy.deepcopy(gm)
    from l4compile.kernels import dispatch

    moes = [n for n in gm.graph.nodes if n.target is dispatch.moe_q_routed]
    with gm.graph.inserting_after(moes[0]):
        gm.graph.call_function(torch.ops.aten.mul.Tensor, (moes[0], 2.0))     # y read twice
    add = next(iter(next(iter(moes[1].users)).users))
    mean = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.mean.dim and n.args[0].args[0].args[0] is add)
    with gm.graph.inserting_after(mean):
        gm.graph.call_function(torch.ops.aten.mul.Tensor, (mean, 2.0))        # the norm's mean read elsewhere
    fused, count = _fused(gm)
    assert count == len(moes) - 2
    left = [n for n in fused.graph.nodes if n.target is dispatch.moe_q_routed]
    assert len(left) == 2
    assert _targets(fused).count("moe_q_routed_norm") == len(moes) - 2


def test_norms_that_fp8_linears_read_stay():
    """In an FP8 step each layer's input norm feeds its qkv's l4::linear_fp8, whose per-token activation quantization
    Inductor fuses with the norm: those stay, and only the last layer's MoE takes its norm (the final norm, which the
    bf16 lm_head reads). The step still gives the graph's logits."""
    require_interpreter()
    from l4compile.kernels import dispatch

    prog = _program("fp8")
    gm, _ = _norm_router_fused(prog.gm)
    fused, count = _fused(gm)
    assert count == 1
    after = _targets(fused)
    assert after.count("moe_q_routed_norm") == 1 and after.count("moe_q_routed") == len(prog.kv_layout["layers"]) - 1
    assert after.count("l4.linear_fp8.default") == _targets(gm).count("l4.linear_fp8.default")
    moes = [n.target for n in fused.graph.nodes if n.target in (dispatch.moe_q_routed, dispatch.moe_q_routed_norm)]
    assert moes[-1] is dispatch.moe_q_routed_norm                            # the last layer's
    _, n_kv, _, d = prog.kv_layout["shape"]
    caches = [torch.zeros(2, n_kv, layer["slots"], d) for layer in prog.kv_layout["layers"] for _ in (0, 1)]
    ids = torch.randint(0, prog.model_config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref, got = gm(ids, torch.tensor([0]), *caches), fused(ids, torch.tensor([0]), *[c.clone() for c in caches])
    assert rel_err(got[0], ref[0]) < 1e-5


def test_moe_norm_can_be_turned_off(monkeypatch):
    """L4COMPILE_MOE_NORM=0 builds a CUDA engine without the fusion (to time a step both ways)."""
    from backends.inductor import moe_norm_enabled

    assert moe_norm_enabled()
    monkeypatch.setenv("L4COMPILE_MOE_NORM", "0")
    assert not moe_norm_enabled()
