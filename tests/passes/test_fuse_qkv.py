"""fuse_qkv: every attention's q/k/v projections become one matmul on concatenated weights, with the same logits
(float, Int4, FP8), the old weights gone, and the eager reference still rebuildable from a float graph."""
from __future__ import annotations

import collections
import copy
import dataclasses
import re

import pytest
import torch

from l4compile.config import CompileConfig
from l4compile.errors import L4Error
from l4compile.pipeline import run_passes
from l4compile.quant import float_model_from_graph
from passes._registry import PassContext
from passes.fuse_qkv import fuse_qkv

L4 = torch.ops.l4
PROJ = {"none": "aten.linear.default", "int4": "l4.linear_int4.default", "fp8": "l4.linear_fp8.default"}


def _run(traced, case: str, quant: str, skip=()):
    _, prog = traced(case)
    prog = dataclasses.replace(prog, gm=copy.deepcopy(prog.gm), metadata=dict(prog.metadata))
    records = run_passes(prog, CompileConfig(quant=quant, max_seq_len=64, skip_passes=tuple(skip)))
    return prog, {r.name: r for r in records}


def _ops(gm) -> collections.Counter:
    return collections.Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function")


@pytest.mark.parametrize("quant", ["none", "int4", "fp8"])
def test_one_projection_per_attention_same_logits(traced, quant):
    ref_prog, _ = _run(traced, "scout", quant, skip=("fuse_qkv",))
    prog, recs = _run(traced, "scout", quant)
    st = recs["fuse_qkv"].stats
    assert recs["fuse_qkv"].changed and st["matches"] == 4 and st["unfused"] == {}
    assert _ops(ref_prog.gm)[PROJ[quant]] == 4 * 4 + (quant == "none")       # q, k, v, o (+ the float lm_head)
    assert _ops(prog.gm)[PROJ[quant]] == 4 * 2 + (quant == "none")           # qkv, o
    assert st["projections"] == {"before": 4 * 4 + 1, "after": 4 * 2 + 1}
    for attn in (n for n in prog.gm.graph.nodes if n.target == L4.attention_cached.default):
        q, k, v = attn.args[:3]
        assert all(p.target == torch.ops.aten.slice.Tensor for p in (q, k, v))
        assert q.args[0] is k.args[0] is v.args[0]                            # one projection feeds all three
        assert [p.args[2:] for p in (q, k, v)] == [(0, 64), (64, 96), (96, 128)]   # Nq = 4 x 16, Nk = Nv = 2 x 16
    names = {str(n.target) for n in prog.gm.graph.nodes if n.op == "get_attr"}
    assert not any(re.search(r"(?<![qk])[qkv]_proj", t) for t in names)     # the three old weights: gone
    fused = sorted(t for t in names if "qkv_proj" in t)
    assert len(fused) == 4 * (1 if quant == "none" else 2)
    assert prog.gm.get_buffer(fused[0]).shape[0] == 128
    got, ref = prog.run_example(), ref_prog.run_example()
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-5               # exact but for the GEMM blocking


def test_float_graph_still_rebuilds_the_eager_reference(traced):
    lm, _ = traced("maverick")
    prog, recs = _run(traced, "maverick", "none")
    assert recs["fuse_qkv"].stats["matches"] == 4
    eager = float_model_from_graph(prog.gm, lm.config)
    for name, p in lm.state_dict().items():
        assert torch.equal(eager.state_dict()[name], p), name               # every parameter, split back exactly


def test_projections_used_elsewhere_stay_and_are_counted(traced):
    prog, _ = _run(traced, "scout", "int4", skip=("fuse_qkv",))
    gm = prog.gm
    attn = next(n for n in gm.graph.nodes if n.target == L4.attention_cached.default)
    with gm.graph.inserting_after(attn.args[0]):
        gm.graph.call_function(torch.ops.aten.neg.default, (attn.args[0],))  # a second user of layer 0's q
    res = fuse_qkv(gm, PassContext(model_config=None, compile_config=CompileConfig()))
    assert res.stats["matches"] == 3 and res.stats["unfused"] == {"projection used elsewhere": 1}


def test_a_graph_without_attention_is_an_error():
    gm = torch.fx.symbolic_trace(torch.nn.Linear(4, 4))
    with pytest.raises(L4Error, match="fuse_qkv: the graph has no attention op"):
        fuse_qkv(gm, PassContext(model_config=None, compile_config=CompileConfig()))
