"""kv_cache: turn the lowered prefill graph into a step graph that reads and returns per-layer KV caches.

Contract
--------
* Requires ``irope_lowered`` (every attention is one ``l4.attention`` op).
* Before: ``(input_ids [B, T]) -> logits [B, T, V]``.
  After:  ``(input_ids [B, T], start_pos [1] int64, k_0, v_0, k_1, v_1, ...) -> (logits, k_0', v_0', ...)``
  with caches ``[B, Hkv, L_i, D]`` in the model dtype: ``L_i = attention_chunk_size`` (a ring buffer) for
  chunked-attention layers and the max sequence length for global (NoPE) layers, capped at the max sequence
  length. Each ``l4.attention`` becomes ``l4.attention_cached``. Prefill is the step at start 0 with zero
  caches (any T); decode is the step with T = 1. Everything else in the graph is per-token and unchanged.
* The layout is recorded in ``gm.meta["l4_kv_cache"]`` (the engine's manifest copies it); the graph's
  inputs and outputs become plain positional ones (no pytree spec).

Before::

    attention = l4.attention(linear, linear_1, linear_2, l4_rope_cos, l4_rope_sin, 4, 2, 16, True, ...)

After::

    attention_cached = l4.attention_cached(linear, linear_1, linear_2, k_cache_0, v_cache_0, start_pos,
                                           l4_rope_cos, l4_rope_sin, 4, 2, 16, True, ...)
    getitem = attention_cached[0]; k_next_0 = attention_cached[1]; v_next_0 = attention_cached[2]
    return (logits, k_next_0, v_next_0, ...)
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx

from l4compile.errors import L4Error
from l4compile.ops import attention as _attn_op  # noqa: F401  (registers the ops)

from ._registry import PassContext, PassResult, register_pass

_DTYPE_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


@dataclass(frozen=True)
class KvCacheOptions:
    ring_buffers: bool = True   # False: every layer keeps max-sequence-length entries (for comparison)


def cache_layout(cfg, max_seq: int, dtype: torch.dtype, ring_buffers: bool = True) -> dict:
    """Per-layer cache slots and the bytes they cost, per token of context and in total."""
    per_slot = 2 * cfg.num_key_value_heads * cfg.head_dim * _DTYPE_BYTES[dtype]      # k and v, one position
    layers = []
    for i, kind in enumerate(cfg.layer_types):
        chunked = kind == "chunked_attention" and ring_buffers
        slots = min(int(cfg.attention_chunk_size), max_seq) if chunked else max_seq
        layers.append({"layer": i, "kind": "chunked" if kind == "chunked_attention" else "global",
                       "slots": slots, "ring": chunked})
    grows = [x for x in layers if not x["ring"]]
    return {
        "dtype": str(dtype).replace("torch.", ""), "shape": ["batch", cfg.num_key_value_heads, "slots", cfg.head_dim],
        "layers": layers,
        "bytes_per_token": per_slot * len(grows),                   # what each token of context adds
        "bytes_per_token_without_rings": per_slot * len(layers),    # every layer keeping the whole context
        "ring_bytes": per_slot * sum(x["slots"] for x in layers if x["ring"]),   # fixed, per sequence
        "bytes_per_sequence_at_max": per_slot * sum(x["slots"] for x in layers),
    }


@register_pass("kv_cache", requires=("irope_lowered",), guarantees=("kv_cached",), options=KvCacheOptions)
def kv_cache(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """Give the graph per-layer KV-cache inputs/outputs (ring buffers for chunked layers) for prefill + decode."""
    cfg = ctx.model_config
    opts = ctx.options or KvCacheOptions()
    max_seq = int(ctx.metadata.get("max_seq", cfg.max_position_embeddings))
    graph = gm.graph
    attn = [n for n in graph.nodes if n.target == torch.ops.l4.attention.default]
    if len(attn) != cfg.num_hidden_layers:
        raise L4Error(f"kv_cache: expected {cfg.num_hidden_layers} l4.attention ops, found {len(attn)} "
                      "(did lower_irope run?)")
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    output = next(n for n in graph.nodes if n.op == "output")
    dtype = next(p.dtype for p in gm.parameters())
    layout = cache_layout(cfg, max_seq, dtype, opts.ring_buffers)

    with graph.inserting_after(placeholders[-1]):
        start = graph.placeholder("start_pos")
    last, caches = start, []
    for i in range(len(attn)):
        with graph.inserting_after(last):
            kc = graph.placeholder(f"k_cache_{i}")
        with graph.inserting_after(kc):
            vc = graph.placeholder(f"v_cache_{i}")
        last = vc
        caches.append((kc, vc))

    new_caches = []
    for node in attn:
        layer = node.meta.get("l4_layer", attn.index(node))
        q, k, v, cos, sin, *attrs = node.args
        kc, vc = caches[attn.index(node)]
        with graph.inserting_before(node):
            step = graph.call_function(torch.ops.l4.attention_cached.default, (q, k, v, kc, vc, start, cos, sin, *attrs))
            out = graph.call_function(operator.getitem, (step, 0))
            k_next = graph.call_function(operator.getitem, (step, 1))
            v_next = graph.call_function(operator.getitem, (step, 2))
        step.meta.update({"nn_module_stack": node.meta.get("nn_module_stack", {}), "l4_layer": layer})
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        new_caches += [k_next, v_next]

    (logits,) = output.args[0] if isinstance(output.args[0], (tuple, list)) else (output.args[0],)
    graph._codegen = torch.fx.graph.CodeGen()   # plain positional inputs and a tuple output
    output.args = ((logits, *new_caches),)
    step = torch.fx.GraphModule(gm, graph, class_name="L4StepGraph")   # no export input-spec hooks
    step.meta.update(gm.meta, l4_kv_cache=layout)
    return PassResult(step, stats={"layers": len(attn), "ring_layers": sum(x["ring"] for x in layout["layers"]),
                                 "bytes_per_token": layout["bytes_per_token"],
                                 "bytes_per_token_without_rings": layout["bytes_per_token_without_rings"]})
