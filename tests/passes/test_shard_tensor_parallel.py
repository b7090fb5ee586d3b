"""shard_tensor_parallel: rank-graph structure (op counts, head attributes, weight slices), the split's numerics
block by block (sum over ranks of the row-split partials == the unsplit block), and bad requests.

End-to-end numerics across real processes are in tests/distributed/test_tensor_parallel.py.
"""
from __future__ import annotations

import copy
import dataclasses
import functools

import pytest
import torch
import torch.nn.functional as F

import l4compile.ops  # noqa: F401
from l4compile.config import CompileConfig
from l4compile.errors import L4Error
from l4compile.pipeline import run_passes
from l4compile.plan.execution import pass_options_from_plan

L4 = torch.ops.l4


def _plan(world: int, layout: dict) -> dict:
    ranks = [{"experts": {str(layer): [e for e in range(8) if e * world // 8 == r] for layer in (1, 3)}}
             for r in range(world)]
    return {"gpus": world, "layout": {"experts": "ep", "vocab": "replicate", **layout}, "ranks": ranks,
            "model_config": {"experts": 8}}


def _sharded(traced, world: int, layout: dict):
    """The 'maverick' tiny case (dense layers 0, 2; MoE 1, 3; 4 heads, 2 kv heads) through every pass + plan."""
    _, prog = traced("maverick")
    prog = dataclasses.replace(prog, gm=copy.deepcopy(prog.gm), metadata=dict(prog.metadata))
    opts = pass_options_from_plan(_plan(world, layout))
    cfg = CompileConfig(max_seq_len=64, passes=tuple(f"l4compile.passes.{n}:{n}" for n in opts),
                        pass_options=tuple((k, tuple(sorted(v.items()))) for k, v in sorted(opts.items())))
    records = run_passes(prog, cfg)
    return prog, records


def _count(gm, target) -> int:
    return sum(n.target == target for n in gm.graph.nodes)


def _w(gm, node) -> torch.Tensor:
    """The tensor a get_attr node reads."""
    return functools.reduce(getattr, str(node.target).split("."), gm)


def test_rank_graphs_structure_and_block_numerics(traced):
    prog, records = _sharded(traced, 2, {"attention": "tp", "dense_mlp": "tp", "shared_expert": "tp"})
    assert [r.name for r in records][-3:] == ["shard_experts", "shard_tensor_parallel", "fuse_qkv"]
    assert not records[-1].changed and "sharded" in records[-1].stats["skipped"]   # per-rank graphs: left alone
    logical, shards = prog.gm, prog.gm.meta["l4_shards"]
    assert _count(logical, L4.all_reduce.default) == 0 and _count(logical, L4.moe.default) == 2   # unchanged
    torch.manual_seed(0)
    x = torch.randn(1, 5, 64)                                                    # [B, T, H]
    cos, sin = logical.l4_rope_cos, logical.l4_rope_sin
    full_attn = [n for n in logical.graph.nodes if n.target == L4.attention_cached.default]
    ref_o = _attention_block(logical, full_attn[0], x, cos, sin)
    parts_o = 0
    for r, gm in enumerate(shards):
        assert _count(gm, L4.all_reduce.default) == 4 + 2                        # every o_proj + dense down_proj
        attn = [n for n in gm.graph.nodes if n.target == L4.attention_cached.default]
        assert [n.args[8:10] for n in attn] == [(2, 1)] * 4                      # local query / kv heads
        assert all(len(n.users) == 1 and next(iter(n.users)).target == L4.all_reduce.default
                   for n in gm.graph.nodes if n.target == torch.ops.aten.linear.default
                   and str(n.args[1].target).endswith(("o_proj.weight", "feed_forward.down_proj.weight")))
        moes = [n for n in gm.graph.nodes if n.target == L4.moe_ep.default]
        assert len(moes) == 2 and all(n.args[9:] == (r, 2, True) for n in moes)
        assert [tuple(_w(gm, w).shape) for w in moes[0].args[4:7]] == [(64, 64), (64, 64), (64, 64)]   # I = 128
        assert gm.meta["l4_kv_cache"]["shape"] == ["batch", 1, "slots", 16]
        parts_o = parts_o + _attention_block(gm, attn[0], x, cos, sin)
    torch.testing.assert_close(parts_o, ref_o, rtol=1e-5, atol=1e-6)           # sum over ranks == unsplit block

    # dense MLP and shared expert: sum of the rank partials == the unsplit SwiGLU
    def swiglu(g, u, d, h):
        return F.linear(F.silu(F.linear(h, g)) * F.linear(h, u), d)
    moe_full = next(n for n in logical.graph.nodes if n.target == L4.moe.default)
    ref = swiglu(*(_w(logical, w) for w in moe_full.args[4:7]), x[0])
    got = sum(swiglu(*(_w(gm, w) for w in next(n for n in gm.graph.nodes if n.target == L4.moe_ep.default).args[4:7]),
                     x[0]) for gm in shards)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert records[-2].stats["all_reduces_per_rank"] == 6 and records[-2].stats["dense_layers"] == 2
    assert logical.meta["l4_sharding"]["execution"]["dense_mlp"] == "tp"


def _attention_block(gm, node, x, cos, sin):
    """o_proj(l4.attention(q, k, v)) for the attention node's weights and attributes -> [B, T, H]."""
    q, k, v = (F.linear(x, _w(gm, a.args[1])) for a in node.args[:3])
    o_lin = next(iter(next(u for u in node.users if u.args[1] == 0).users))
    out = L4.attention(q, k, v, cos, sin, *node.args[8:])
    return F.linear(out, _w(gm, o_lin.args[1]))


def test_attention_only_keeps_mlps_whole(traced):
    prog, records = _sharded(traced, 2, {"attention": "tp", "dense_mlp": "replicate", "shared_expert": "replicate"})
    for gm in prog.gm.meta["l4_shards"]:
        assert _count(gm, L4.all_reduce.default) == 4
        assert all(n.args[11:] == () for n in gm.graph.nodes if n.target == L4.moe_ep.default)   # all_to_all path
    ex = prog.gm.meta["l4_sharding"]["execution"]
    assert (ex["attention"], ex["dense_mlp"], ex["shared_expert"]) == ("tp", "replicated", "replicated")


@pytest.mark.parametrize("world,layout,words", [
    (3, {"attention": "tp"}, "needs 3 to divide the 4 query heads"),
    (3, {"dense_mlp": "tp"}, "needs 3 to divide the dense MLP width 256"),
    (5, {"shared_expert": "tp"}, "needs 5 to divide the shared expert width 128"),
])
def test_bad_requests_fail_clearly(traced, world, layout, words):
    with pytest.raises(L4Error, match=words):
        _sharded(traced, world, {"attention": "replicate", "dense_mlp": "replicate", "shared_expert": "replicate",
                                 **layout})


@pytest.mark.parametrize("quant", ["fp8", "int4"])
def test_quantized_graphs_split_the_same_way(traced, quant):
    """--plan with --quant: l4.moe_q -> l4.moe_ep_q, quantized linears sliced with their scales; int4 row splits
    keep the exact dequantized weights (scale groups subdivided), fp8 row splits keep per-row scales."""
    from l4compile.ops.quant import dequantize

    _, prog = traced("maverick")
    prog = dataclasses.replace(prog, gm=copy.deepcopy(prog.gm), metadata=dict(prog.metadata))
    opts = pass_options_from_plan(_plan(2, {"attention": "tp", "dense_mlp": "tp", "shared_expert": "tp"}))
    cfg = CompileConfig(max_seq_len=64, quant=quant, passes=tuple(f"l4compile.passes.{n}:{n}" for n in opts),
                        pass_options=tuple((k, tuple(sorted(v.items()))) for k, v in sorted(opts.items())))
    run_passes(prog, cfg)
    logical, shards = prog.gm, prog.gm.meta["l4_shards"]
    lin = L4.linear_fp8.default if quant == "fp8" else L4.linear_int4.default
    o_full = next(n for n in logical.graph.nodes if n.target == lin and next(iter(n.users)).target == torch.ops.aten.add.Tensor)
    full = dequantize(_w(logical, o_full.args[1]), _w(logical, o_full.args[2]))                    # o_proj [H, Hq*D]
    for r, gm in enumerate(shards):
        assert _count(gm, L4.moe_ep_q.default) == 2 and _count(gm, L4.moe_q.default) == 0
        assert _count(gm, L4.all_reduce.default) == 6
        assert all(n.args[14:] == (r, 2, True) for n in gm.graph.nodes if n.target == L4.moe_ep_q.default)
        ar = [n for n in gm.graph.nodes if n.target == L4.all_reduce.default]
        o = ar[0].args[0]                                                         # layer 0's o_proj
        assert o.target == lin and o.name == o_full.name
        part = dequantize(_w(gm, o.args[1]), _w(gm, o.args[2]))                   # [H, Hq*D / 2]
        torch.testing.assert_close(part, full[:, r * 32:(r + 1) * 32], rtol=0, atol=0)
