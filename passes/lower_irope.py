"""lower_irope: rewrite every Llama 4 attention block into one ``l4.attention`` op with real-valued RoPE.

Contract
--------
* Input: a traced Program graph. Blocks are found by provenance (nodes whose module stack holds a
  ``Llama4TextAttention``); each must have its q/k/v/o projections (``aten.linear`` on
  ``<path>.{q,k,v,o}_proj.weight``) and one attention core (``scaled_dot_product_attention``, or eager
  ``softmax``); RoPE layers must show the complex rotation. Anything else raises ``L4Error`` naming the layer.
* The o_proj input becomes ``l4.attention(q, k, v, cos, sin, ...)`` with the layer's semantics as attributes
  (rope or NoPE, qk-norm, chunk size or full causal, temperature tuning); cos/sin are float32 tables
  ``[max_seq, D/2]`` added as buffers ``l4_rope_cos`` / ``l4_rope_sin`` (llama3 scaling folded in).
* The old blocks, the complex rotary embedding and the harness's masks become dead and are removed; the pass
  then verifies that no complex-dtype value and no complex op remains. Guarantees ``irope_lowered``.
* Stats: ``{"matches": n, "chunked": c, "global": g}``.

Before (RoPE layer 0, trimmed)::

    linear = aten.linear(mul_3, q_proj_weight); view = aten.view(linear, [b, s, -1, 16])
    polar = aten.polar(ones_like(mul), mul)                      # rotary_emb, complex64
    view_as_complex = aten.view_as_complex(reshape(to(view, float32), [b, s, 4, -1, 2]))
    flatten = aten.flatten(aten.view_as_real(aten.mul(view_as_complex, unsqueeze(polar, 2))), 3)
    ... qk-norm ...; sdpa = aten.scaled_dot_product_attention(q, k, v, unsqueeze_5, scale=0.25)
    linear_3 = aten.linear(reshape(transpose(sdpa, 1, 2), [b, s, -1]), o_proj_weight)

After::

    attention = l4.attention(linear, linear_1, linear_2, l4_rope_cos, l4_rope_sin, 4, 2, 16, True, True,
                             16, True, 16.0, 0.1, 0.25, 1e-05)
    linear_3 = aten.linear(attention, o_proj_weight)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx

from l4compile.errors import L4Error
from l4compile.ops import attention as _attn_op

from ._provenance import innermost_module, layer_index
from ._registry import PassContext, PassResult, register_pass

aten = torch.ops.aten
ATTN_CLASS = "Llama4TextAttention"
COMPLEX_OPS = (aten.view_as_complex.default, aten.view_as_real.default, aten.polar.default, aten.complex.default)
_CORE_OPS = (aten.scaled_dot_product_attention.default, aten.softmax.int, aten._softmax.default)


@dataclass(frozen=True)
class LowerIropeOptions:
    max_positions: int | None = None   # rows of the cos/sin tables; default: the program's max sequence length


def _is_complex(node: torch.fx.Node) -> bool:
    val = node.meta.get("val")
    return (node.op == "call_function" and node.target in COMPLEX_OPS) or \
        (isinstance(val, torch.Tensor) and val.is_complex())


def _linear_on(nodes, weight: str):
    hits = [n for n in nodes if n.target == aten.linear.default and isinstance(n.args[1], torch.fx.Node)
            and n.args[1].op == "get_attr" and str(n.args[1].target) == weight]
    return hits[0] if len(hits) == 1 else None


@register_pass("lower_irope", after=("fuse_moe",), guarantees=("irope_lowered",), options=LowerIropeOptions)
def lower_irope(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """Rewrite each attention block into one l4.attention op (real RoPE, explicit masks, no complex ops)."""
    cfg = ctx.model_config
    opts = ctx.options or LowerIropeOptions()
    positions = opts.max_positions or int(ctx.metadata.get("max_seq", cfg.max_position_embeddings))
    graph = gm.graph
    blocks: dict[str, list[torch.fx.Node]] = {}
    for n in graph.nodes:
        path = innermost_module(n, ATTN_CLASS) if n.op == "call_function" else None
        if path is not None:
            blocks.setdefault(path, []).append(n)
    if not blocks:
        raise L4Error("lower_irope: found no Llama4TextAttention block in the graph")

    cos, sin = _attn_op.rope_tables(cfg, positions)
    gm.register_buffer("l4_rope_cos", cos)
    gm.register_buffer("l4_rope_sin", sin)
    first = next(iter(graph.nodes))
    with graph.inserting_before(first):
        cos_node, sin_node = graph.get_attr("l4_rope_cos"), graph.get_attr("l4_rope_sin")

    n_chunked = n_global = 0
    for path, nodes in blocks.items():
        layer = layer_index(path)
        prefix = str(path)
        q, k, v, o = (_linear_on(nodes, f"{prefix}.{p}_proj.weight") for p in "qkvo")
        use_rope = bool(cfg.no_rope_layers[layer])
        chunked = cfg.layer_types[layer] == "chunked_attention"
        cores = [n for n in nodes if n.target in _CORE_OPS]
        rotates = any(n.target == aten.view_as_complex.default for n in nodes)
        if None in (q, k, v, o) or len(cores) != 1 or rotates != use_rope:
            missing = [p for p, x in zip("qkvo", (q, k, v, o)) if x is None]
            why = (f"projections {missing} not found" if missing else
                   f"{len(cores)} attention cores" if len(cores) != 1 else
                   "RoPE rotation does not match config.no_rope_layers")
            raise L4Error(f"lower_irope: attention block of layer {layer} ({path}) does not match the Llama 4 "
                          f"pattern: {why}")
        attrs = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, use_rope,
                 bool(cfg.use_qk_norm and use_rope), int(cfg.attention_chunk_size) if chunked else 0,
                 bool(cfg.attn_temperature_tuning and not use_rope), float(cfg.floor_scale), float(cfg.attn_scale),
                 float(cfg.head_dim ** -0.5), float(cfg.rms_norm_eps))
        with graph.inserting_before(o):
            new = graph.call_function(torch.ops.l4.attention.default,
                                      (q, k, v, cos_node, sin_node, *attrs))
        new.meta["nn_module_stack"] = dict(o.meta.get("nn_module_stack") or {})
        new.meta["l4_layer"] = layer
        if "val" in o.args[0].meta:
            new.meta["val"] = o.args[0].meta["val"]
        o.replace_input_with(o.args[0], new)
        n_chunked += chunked
        n_global += not chunked

    # Export's dtype/layout asserts are side-effecting, so they would keep the dead complex RoPE alive.
    for n in list(graph.nodes):
        if n.target == aten._assert_tensor_metadata.default and not n.users:
            graph.erase_node(n)
    graph.eliminate_dead_code()
    for n in list(graph.nodes):   # sdpa is tagged nondeterministic (dropout), so DCE keeps it: erase by hand
        if n.target in _CORE_OPS and not n.users:
            graph.erase_node(n)
    graph.eliminate_dead_code()
    leftovers = [n.name for n in graph.nodes if _is_complex(n)]
    if leftovers:
        raise L4Error(f"lower_irope: complex values remain after lowering: {', '.join(leftovers[:5])}")
    gm.recompile()
    return PassResult(gm, stats={"matches": len(blocks), "chunked": n_chunked, "global": n_global})
