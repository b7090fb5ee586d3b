"""fuse_moe: structure (op counts before/after), numerics against transformers eager, errors, AOTI package."""
from __future__ import annotations

import copy
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import Llama4TextConfig
from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

import l4compile.ops  # noqa: F401  (registers torch.ops.l4.moe)
from l4compile.errors import L4Error
from l4compile.passes import PassContext
from l4compile.passes.fuse_moe import FuseMoeOptions, fuse_moe

from .conftest import CASES, TINY, tiny_llama4  # noqa: F401

aten = torch.ops.aten
MOE_ONLY_OPS = (aten.bmm.default, aten.repeat.default, aten.topk.default, aten.scatter_.src)


def _count(gm, targets) -> int:
    return sum(n.op == "call_function" and n.target in targets for n in gm.graph.nodes)


def _run_pass(gm, cfg, **opts):
    return fuse_moe(gm, PassContext(model_config=cfg, compile_config=None, options=FuseMoeOptions(**opts)))


def _rel_err(out, ref) -> float:
    return ((out - ref).abs().max() / ref.abs().max()).item()


# ---------------------------------------------------------------------------------------------- the op


def _hf_moe(n_exp: int, top_k: int, seed: int) -> Llama4TextMoe:
    torch.manual_seed(seed)
    cfg = Llama4TextConfig(**{**TINY, "num_local_experts": n_exp, "num_experts_per_tok": top_k})
    moe = Llama4TextMoe(cfg).eval()
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return moe


def _op_args(moe: Llama4TextMoe):
    se = moe.shared_expert
    return (moe.router.weight, moe.experts.gate_up_proj, moe.experts.down_proj,
            se.gate_proj.weight, se.up_proj.weight, se.down_proj.weight, moe.top_k)


@pytest.mark.parametrize("top_k,n_exp", [(1, 16), (2, 5)])
@pytest.mark.parametrize("tokens", [1, 7, 64])
def test_op_matches_transformers_moe(top_k, n_exp, tokens):
    moe = _hf_moe(n_exp, top_k, seed=tokens)
    x = torch.randn(tokens, TINY["hidden_size"])
    with torch.no_grad():
        ref = moe(x)[0]
        out = torch.ops.l4.moe(x, *_op_args(moe))
        dec = l4compile.ops.moe.moe_decomposition(x, *_op_args(moe))
    assert out.shape == ref.shape == (tokens, TINY["hidden_size"])
    assert _rel_err(out, ref) < 1e-5
    assert _rel_err(dec, ref) < 1e-5


# -------------------------------------------------------------------------------------------- the pass


@pytest.mark.parametrize("case", list(CASES))
def test_fuse_moe_structure_and_numerics(traced, case):
    lm, prog = traced(case)
    cfg = lm.config
    gm = copy.deepcopy(prog.gm)
    moe_layers = list(cfg.moe_layers)
    before = _count(gm, MOE_ONLY_OPS)
    assert _count(gm, (aten.bmm.default,)) == 2 * len(moe_layers)
    assert _count(gm, (aten.topk.default,)) == len(moe_layers)
    dense = [n.target for n in gm.graph.nodes if n.op == "get_attr" and ".feed_forward.gate_proj." in n.target]

    res = _run_pass(gm, cfg)

    assert before > 0 and res.changed
    assert res.stats == {"matches": len(moe_layers), "layers": moe_layers}
    assert _count(res.gm, (torch.ops.l4.moe.default,)) == len(moe_layers)
    assert _count(res.gm, MOE_ONLY_OPS) == 0
    assert [n.target for n in res.gm.graph.nodes if n.op == "get_attr"
            and ".feed_forward.gate_proj." in n.target] == dense   # dense MLP layers untouched
    if case == "maverick":
        assert len(dense) == 2 and moe_layers == [1, 3]
    ids = torch.randint(0, cfg.vocab_size, (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = lm(ids).logits
        out = res.gm(ids)
    assert _rel_err(out, ref) < 1e-4
    assert torch.equal(out.argmax(-1), ref.argmax(-1))


def _block_node(gm, layer: int, pred):
    for n in gm.graph.nodes:
        stack = list((n.meta.get("nn_module_stack") or {}).values())
        if stack and f"layers.{layer}.feed_forward" in stack[-1][0] and pred(n):
            return n
    raise AssertionError("node not found")


def test_missing_shared_expert_raises_naming_layer(traced):
    lm, prog = traced("maverick")
    gm = copy.deepcopy(prog.gm)
    sd = _block_node(gm, 3, lambda n: n.target == aten.linear.default
                     and "shared_expert.down_proj" in str(n.args[1].target))
    sd.replace_all_uses_with(sd.args[0])       # "delete" the shared expert's down projection
    gm.graph.erase_node(sd)
    with pytest.raises(L4Error, match=r"layer 3 .*shared down"):
        _run_pass(gm, lm.config)


def test_swapped_topk_raises_naming_layer(traced):
    lm, prog = traced("maverick")
    gm = copy.deepcopy(prog.gm)
    _block_node(gm, 1, lambda n: n.target == aten.topk.default).target = aten.sort.default
    with pytest.raises(L4Error, match=r"layer 1 .*topk"):
        _run_pass(gm, lm.config)


def test_config_moe_layer_missing_from_graph_raises(traced):
    lm, prog = traced("maverick")
    cfg = copy.copy(lm.config)
    cfg.moe_layers = [0, 1, 2, 3]
    with pytest.raises(L4Error, match=r"MoE layers \[0, 2\]"):
        _run_pass(copy.deepcopy(prog.gm), cfg)


# ----------------------------------------------------------------------- AOTInductor, fresh process

_LOADER = textwrap.dedent("""
    import sys, torch
    import l4compile.ops
    pkg = torch._inductor.aoti_load_package(sys.argv[1])
    ids = torch.load(sys.argv[2])
    torch.save([pkg(i) for i in ids], sys.argv[3])
""")


@pytest.mark.slow   # an extra AOTI compile; keeps the default suite inside its 15-minute budget
def test_aoti_package_loads_in_fresh_process(traced, tmp_path):
    lm, prog = traced("top2")
    res = _run_pass(copy.deepcopy(prog.gm), lm.config)
    prog = copy.copy(prog)
    prog.gm = res.gm
    ep = prog.export()
    assert sum(n.target == torch.ops.l4.moe.default for n in ep.graph.nodes) == len(lm.config.moe_layers)
    pt2 = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "moe.pt2"))

    g = torch.Generator().manual_seed(2)
    ids = [torch.randint(0, lm.config.vocab_size, (1, 5), generator=g),
           torch.randint(0, lm.config.vocab_size, (2, 41), generator=g)]
    torch.save(ids, tmp_path / "ids.pt")
    proc = subprocess.run([sys.executable, "-c", _LOADER, pt2, str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    outs = torch.load(tmp_path / "out.pt")
    routings = set()
    for i, out in zip(ids, outs):
        with torch.no_grad():
            ref = lm(i).logits
        assert _rel_err(out, ref) < 1e-4
        assert torch.equal(out.argmax(-1), ref.argmax(-1))
        routings.add(i.shape)
    assert len(routings) == 2
