"""backends.norm_router_fused: a CUDA engine's step runs each MoE layer's residual add, post-attention RMSNorm and
router as one l4::add_rms_norm_router call, whose logits the fused MoE takes. The rewritten step graph, run here on
CPU tensors with the Triton kernels under the interpreter, gives the step graph's logits; what does not match the
pattern exactly is left as it is."""
from __future__ import annotations

import copy

import pytest
import torch

from backends.norm_router_fused import norm_router_fused, rms_norm_input
from tests.kernels.conftest import rel_err, require_interpreter

MOE_OPS = ("l4.moe.default", "l4.moe_q.default")


def _program(quant: str, preset: str = "tiny"):
    from l4compile.compiler import lower
    from l4compile.config import CompileConfig
    from l4compile.progress import Progress

    return lower(preset, CompileConfig(max_seq_len=40, max_batch_size=2, quant=quant), progress=Progress()).program


def _fused(gm):
    from l4compile.kernels import dispatch

    return norm_router_fused(gm, dispatch.residual_norm_router, {torch.ops.l4.moe.default: dispatch.moe_routed,
                                                                 torch.ops.l4.moe_q.default: dispatch.moe_q_routed})


def _targets(gm) -> list[str]:
    return [str(n.target) if not callable(n.target) or hasattr(n.target, "_schema") else n.target.__name__
            for n in gm.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("quant", ["none", "int4"])
def test_step_graph_with_fused_norm_router_gives_the_same_logits(quant):
    """Every MoE layer of tiny (4) is rewritten: its norm's rsqrt and the MoE op are gone from the graph, and the
    l4::moe / l4::moe_q call became the fused MoE on the kernel's logits. A 13-token prefill (the kernel's block path)
    and a decode step (its row path) of a batch of 2 give the graph's logits."""
    require_interpreter()
    prog = _program(quant)
    gm, count = _fused(prog.gm)
    n_layers = len(prog.kv_layout["layers"])
    assert count == n_layers
    before, after = _targets(prog.gm), _targets(gm)
    assert after.count("residual_norm_router") == n_layers
    assert after.count("moe_q_routed" if quant == "int4" else "moe_routed") == n_layers
    assert not [t for t in after if t in MOE_OPS]
    assert after.count("aten.rsqrt.default") == before.count("aten.rsqrt.default") - n_layers
    assert after.count("aten.add.Tensor") == before.count("aten.add.Tensor") - 2 * n_layers   # residual, eps

    _, n_kv, _, d = prog.kv_layout["shape"]
    caches = [[torch.zeros(2, n_kv, layer["slots"], d) for layer in prog.kv_layout["layers"] for _ in (0, 1)]
              for _ in range(2)]
    ids = torch.randint(0, prog.model_config.vocab_size, (2, 14), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for x, start in ((ids[:, :13], 0), (ids[:, 13:], 13)):
            pos = torch.tensor([start])
            ref, got = prog.gm(x, pos, *caches[0]), gm(x, pos, *caches[1])
            assert rel_err(got[0], ref[0]) < 1e-5, start
            caches = [list(ref[1:]), list(got[1:])]


def test_what_does_not_match_is_left_alone():
    """A layer whose norm output is read by another node, and one routed top-2, keep their norm and MoE op; the
    others are rewritten."""
    prog = _program("int4")
    gm = copy.deepcopy(prog.gm)
    moes = [n for n in gm.graph.nodes if str(n.target) in MOE_OPS]
    norm_out = moes[0].args[0].args[0]                                       # reshape(norm, [-1, H])
    assert rms_norm_input(norm_out) is not None
    with gm.graph.inserting_after(norm_out):
        gm.graph.call_function(torch.ops.aten.mul.Tensor, (norm_out, 2.0))   # a second reader
    moes[1].args = (*moes[1].args[:-1], 2)
    fused, count = _fused(gm)
    assert count == len(moes) - 2
    left = [n for n in fused.graph.nodes if str(n.target) in MOE_OPS]
    assert len(left) == 2 and left[1].args[-1] == 2
    assert all(rms_norm_input(n.args[0].args[0]) is not None for n in left)     # their norms as they were
    assert _targets(fused).count("residual_norm_router") == len(moes) - 2


def test_norm_router_can_be_turned_off(monkeypatch):
    """L4COMPILE_NORM_ROUTER=0 builds a CUDA engine without the fusion (to time a step both ways)."""
    from backends.inductor import norm_router_enabled

    assert norm_router_enabled()
    monkeypatch.setenv("L4COMPILE_NORM_ROUTER", "0")
    assert not norm_router_enabled()
    monkeypatch.setenv("L4COMPILE_NORM_ROUTER", "1")
    assert norm_router_enabled()
