# T tokens, K hidden (projection input), Nq / Nk / Nv output features
"""fuse_qkv: each attention's q, k and v projections as ONE matmul on the concatenated weight.

Contract
--------
* For every attention op (``l4.attention_cached``, ``l4.attention``) whose q, k and v are three projections of the
  same kind (``aten.linear`` without bias, ``l4.linear_int4``, ``l4.linear_fp8``) of the SAME input, each used by that
  attention alone, with ``get_attr`` weights of one dtype and equal trailing shapes (K; Int4/FP8 scale groups):
  the three become one projection on weights concatenated along N, ``[Nq + Nk + Nv, ...]``, and three slices of
  its last dimension. Exact (every output column is the same dot product), so it keeps the output.
* Why: a decode step reads each layer's projection weights once whichever way; as one launch it is one kernel
  instead of three, and the k / v projections (Nk = Nv = 1024 at Scout) no longer run as GEMVs of a few dozen
  programs each on a 132-SM GPU.
* New weights are buffers ``l4f_<q weight name with q_proj -> qkv_proj>`` (one per weight tensor of the op); the
  three old ones are deleted from the module. Weight values are read through ``ctx.weight`` (``--stream-weights``).
  For float weights ``gm.meta["l4_fused_qkv"]`` records which rows were which transformers parameter, so
  ``l4compile.quant.float_model_from_graph`` still rebuilds the eager reference (as views, no copy).
* Runs after ``quantize`` and ``kv_cache`` (it fuses what they leave) and after the sharding passes; a sharded program
  (per-rank graphs in ``gm.meta["l4_shards"]``) is left as it is (``changed=False``, stats say why).
* A graph without attention ops is an error (``L4Error``); attention whose projections do not qualify is counted in
  the stats by reason (``unfused``), never silently.
* Stats: ``matches`` (attentions fused), ``projections`` {before, after}, ``unfused`` {reason: count}.

Before / after (int4, one layer)::

    q = l4.linear_int4(x, l4q_..q_proj_weight_w, l4q_..q_proj_weight_s)        # and k, v alike
    attn = l4.attention_cached(q, k, v, k_cache, v_cache, ...)
  ->
    qkv = l4.linear_int4(x, l4f_..qkv_proj_weight_w, l4f_..qkv_proj_weight_s)  # [T, Nq + Nk + Nv]
    attn = l4.attention_cached(slice(qkv, -1, 0, Nq), slice(qkv, -1, Nq, Nq + Nk), slice(..), k_cache, ...)
"""
from __future__ import annotations

import re

import torch
import torch.fx

from l4compile.errors import L4Error
from l4compile.program import PARAM_PREFIX
from l4compile.ops import attention as _attention_ops  # noqa: F401  (registers l4::attention / attention_cached)
from l4compile.ops import quant as _quant_ops  # noqa: F401  (registers l4::linear_fp8 / linear_int4)

from ._registry import PassContext, PassResult, register_pass
from ._slicing import LINEARS, delete_tensor, get_tensor, weights_of

aten, l4 = torch.ops.aten, torch.ops.l4
_ATTENTION = (l4.attention_cached.default, l4.attention.default)
FUSED_META = "l4_fused_qkv"   # gm.meta: fused buffer -> [(transformers parameter, rows)], for float weights


def _why_not(gm: torch.fx.GraphModule, attn: torch.fx.Node) -> str | None:
    """None when ``attn``'s q, k, v can be fused; else the reason."""
    projs = attn.args[:3]
    if not all(isinstance(p, torch.fx.Node) and p.op == "call_function" and p.target in LINEARS for p in projs):
        return "not projections"
    if len({p.target for p in projs}) != 1:
        return "mixed projection ops"
    weights = [weights_of(p) for p in projs]                                   # None: a bias or a computed weight
    if any(w is None or p.kwargs for p, w in zip(projs, weights)):
        return "bias, extra arguments or weights not attributes"
    if len({p.args[0] for p in projs}) != 1:
        return "different inputs"
    if any(len(p.users) != 1 for p in projs):
        return "projection used elsewhere"
    for same in zip(*weights):                                                 # (q's, k's, v's) i-th weight
        ts = [get_tensor(gm, str(w.target)) for w in same]
        if len({t.dtype for t in ts}) != 1 or len({tuple(t.shape[1:]) for t in ts}) != 1:
            return "weight dtypes or shapes differ"
    return None


def _fuse(gm: torch.fx.GraphModule, attn: torch.fx.Node, ctx: PassContext) -> None:
    projs = attn.args[:3]
    x, op = projs[0].args[0], projs[0].target
    old = [[str(w.target) for w in p.args[1:]] for p in projs]                 # per projection: its weight targets
    sizes = [get_tensor(gm, names[0]).shape[0] for names in old]             # Nq, Nk, Nv
    graph = gm.graph
    with graph.inserting_before(projs[0]):
        weights = []
        for i, q_name in enumerate(old[0]):
            fused = torch.cat([ctx.weight(gm, names[i]).detach() for names in old], dim=0).contiguous()
            name = "l4f_" + re.sub(r"\W", "_", q_name).replace("q_proj", "qkv_proj")
            gm.register_buffer(name, fused)
            weights.append(graph.get_attr(name))
            if q_name.startswith(PARAM_PREFIX):     # float weights: where each transformers parameter now lives
                gm.meta.setdefault(FUSED_META, {})[name] = [(names[i][len(PARAM_PREFIX):], n)
                                                            for names, n in zip(old, sizes)]
        qkv = graph.call_function(op, (x, *weights))                         # [.., Nq + Nk + Nv]
        start = 0
        for p, n in zip(projs, sizes):
            part = graph.call_function(aten.slice.Tensor, (qkv, -1, start, start + n))
            p.replace_all_uses_with(part)
            start += n
    for p in projs:
        ws = list(p.args[1:])
        graph.erase_node(p)
        for w in ws:
            if not w.users:
                graph.erase_node(w)
                if not any(n.op == "get_attr" and n.target == w.target for n in graph.nodes):
                    delete_tensor(gm, str(w.target))


@register_pass("fuse_qkv", after=("quantize", "kv_cache", "shard_experts", "shard_tensor_parallel"))
def fuse_qkv(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """Fuse every attention's q/k/v projections into one matmul (see the module docstring)."""
    if gm.meta.get("l4_shards"):
        return PassResult(gm, changed=False, stats={"matches": 0, "skipped": "sharded program (per-rank graphs)"})
    attns = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _ATTENTION]
    if not attns:
        raise L4Error("fuse_qkv: the graph has no attention op (did lower_irope run?)")
    before = sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target in LINEARS)
    unfused: dict[str, int] = {}
    for attn in attns:
        why = _why_not(gm, attn)
        if why:
            unfused[why] = unfused.get(why, 0) + 1
        else:
            _fuse(gm, attn, ctx)
    matches = len(attns) - sum(unfused.values())
    if matches:
        gm.graph.lint()
        gm.recompile()
    after = sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target in LINEARS)
    return PassResult(gm, changed=matches > 0, stats={"matches": matches,
                                                      "projections": {"before": before, "after": after},
                                                      "unfused": unfused})
