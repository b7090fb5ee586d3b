"""shard_tensor_parallel: split attention, dense MLPs and the shared expert over W ranks (Megatron-style TP).

Contract
--------
* Runs only when asked (``default=False``): ``compile --plan plan.json`` selects it when the plan's layout
  says ``tp`` for attention, dense MLPs or the shared expert (``l4compile.plan.execution``); its options name
  the world size and which of the three to split. Runs after ``shard_experts`` and rewrites the rank graphs
  in ``gm.meta["l4_shards"]`` (so a plan can be EP for the routed experts and TP for the rest); without
  them it first makes W copies of the graph. The logical graph itself is returned unchanged (verify mode
  and ``--dump-ir`` still see the whole model).
* Attention (Hq query heads, Hkv kv heads, D head_dim): rank r keeps query heads [r*Hq/W, (r+1)*Hq/W) and
  the kv heads they read (GQA groups stay whole): ``q_proj`` rows, ``k_proj`` / ``v_proj`` rows (column
  parallel), ``o_proj`` columns (row parallel) followed by ``l4.all_reduce`` (sum); the ``l4.attention*``
  op gets the local head counts and the rank's KV caches are ``[B, Hkv/W, L_i, D]``. Needs W | Hq and
  either W | Hkv or Hkv | W (then each rank keeps the one kv head its query heads read, as the planner
  assumes: ``plan.layouts.kv_heads_local``). The rank graphs' ``l4_kv_cache`` layout and the manifest's
  (``sharding.kv_cache``) are the per-rank one.
* Dense MLP (width Imlp): ``gate_proj`` / ``up_proj`` rows [r*Imlp/W, ..) (column parallel), ``down_proj``
  the matching columns (row parallel) + ``l4.all_reduce``. Needs W | Imlp.
* Shared expert (width I): inside each ``l4.moe_ep`` its gate/up rows and down columns are sliced the same
  way and ``shared_sharded=True`` makes the op sum (one all-reduce) this rank's shared partial with its own
  experts' routed terms: the shared expert is reduced once, every routed term counted once (see
  ``l4compile.ops.moe_ep``). Needs W | I and expert parallelism (``l4.moe_ep``, from ``shard_experts``).
* Blocks are found by structure (the matmuls around each ``l4.attention*`` op; ``down(silu(gate(x)) * up(x))``
  under a ``Llama4TextMLP`` outside any MoE, one per dense layer of the config), so quantized graphs split the
  same way: ``l4.linear_fp8`` / ``linear_int4`` weights and scales are sliced with their rows; a row-split
  fp8 weight keeps its per-row scales (its input is then quantized per token over the rank's slice, the
  usual row-parallel W8A8), a row-split int4 weight keeps the exact dequantized values (its scale groups are
  subdivided where a rank's slice cuts one). The shared expert inside ``l4.moe_ep_q`` splits like
  ``l4.moe_ep``'s.
* A divisibility failure, a layer type asked for and not found, or a block that does not match the pattern
  raises ``L4Error``.
* ``gm.meta["l4_sharding"]``: ``execution`` says ``tp`` for what was split, ``tensor_parallel`` the heads
  per rank, ``kv_cache`` the per-rank cache layout. Stats: ``{"ranks", "parts", "attention_layers",
  "dense_layers", "shared_layers", "all_reduces_per_rank", "heads_per_rank", "kv_heads_per_rank"}``.

Before (rank 1 of 2, after shard_experts; Hq = 4, Hkv = 2, D = 16, H = 64)::

    linear = aten.linear(mul_3, q_proj_weight)                   # q_proj_weight [64, 64]
    attention_cached = l4.attention_cached(linear, linear_1, linear_2, k_cache_0, v_cache_0, start_pos,
                                           l4_rope_cos, l4_rope_sin, 4, 2, 16, True, ...)
    linear_3 = aten.linear(getitem_4, o_proj_weight)             # o_proj_weight [64, 64]
    add_3 = aten.add(to_3, linear_3)
    moe_ep = l4.moe_ep(reshape_12, router, gate_up, down, sg, su, sd, 2, [0, 0, 1, 1], 1, 2)

After::

    linear = aten.linear(mul_3, q_proj_weight)                   # q_proj_weight [32, 64]: heads 2, 3
    attention_cached = l4.attention_cached(linear, linear_1, linear_2, k_cache_0, v_cache_0, start_pos,
                                           l4_rope_cos, l4_rope_sin, 2, 1, 16, True, ...)   # caches [B, 1, L, 16]
    linear_3 = aten.linear(getitem_4, o_proj_weight)             # o_proj_weight [64, 32]
    all_reduce = l4.all_reduce(linear_3, 1, 2)
    add_3 = aten.add(to_3, all_reduce)
    moe_ep = l4.moe_ep(reshape_12, router, gate_up, down, sg, su, sd, 2, [0, 0, 1, 1], 1, 2, True)   # sg [I/2, H]
"""
from __future__ import annotations

import copy
import operator
from dataclasses import dataclass

import torch
import torch.fx

from l4compile.errors import L4Error
from l4compile.ops import all_reduce as _all_reduce_op  # noqa: F401  (registers torch.ops.l4.all_reduce)
from l4compile.ops import moe_ep as _moe_ep_op  # noqa: F401  (l4.moe_ep, l4.moe_ep_q)
from l4compile.ops import quant as _quant_op  # noqa: F401  (l4.linear_fp8 / linear_int4 / moe_q)
from l4compile.plan.execution import TP_PARTS

from ._provenance import innermost_module, layer_index
from ._registry import PassContext, PassResult, register_pass
from ._slicing import Slicer, weights_of

aten = torch.ops.aten
_ATTN = {torch.ops.l4.attention_cached.default: 8, torch.ops.l4.attention.default: 5}   # op -> index of n_heads
_SHARED_ARGS = {torch.ops.l4.moe_ep.default: (4, 11),      # op -> (first shared-expert arg, args before the flag)
                torch.ops.l4.moe_ep_q.default: (6, 16)}
_KV_BYTE_KEYS = ("bytes_per_token", "bytes_per_token_without_rings", "ring_bytes", "bytes_per_sequence_at_max")


@dataclass(frozen=True)
class ShardTensorParallelOptions:
    world_size: int = 0
    parts: tuple = ()              # subset of ("attention", "dense_mlp", "shared_expert")
    plan_hash: str = ""


# ------------------------------------------------------------------------------------------ graph helpers

def _insert_all_reduce(graph: torch.fx.Graph, node: torch.fx.Node, rank: int, world: int) -> torch.fx.Node:
    """node -> l4.all_reduce(node) for every user of node."""
    with graph.inserting_after(node):
        ar = graph.call_function(torch.ops.l4.all_reduce.default, (node, rank, world))
    ar.meta = {k: v for k, v in node.meta.items() if k in ("nn_module_stack", "val", "l4_layer")}
    node.replace_all_uses_with(ar, delete_user_cb=lambda user: user is not ar)
    return ar


# ------------------------------------------------------------------------------------------ per layer type

def head_split(n_heads: int, n_kv: int, world: int, rank: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """-> (query heads [lo, hi), kv heads [lo, hi)) that rank ``rank`` of ``world`` keeps."""
    per_q, group = n_heads // world, n_heads // n_kv
    q_lo, q_hi = rank * per_q, (rank + 1) * per_q
    return (q_lo, q_hi), (q_lo // group, (q_hi - 1) // group + 1)


def check_divisible(cfg, world: int, parts: tuple[str, ...]) -> None:
    """L4Error unless every requested layer type splits evenly over ``world`` ranks."""
    hq, hkv = int(cfg.num_attention_heads), int(cfg.num_key_value_heads)
    if "attention" in parts and (hq % world or (hkv % world and world % hkv)):
        raise L4Error(f"attention tensor parallelism over {world} ranks needs {world} to divide the {hq} query "
                      f"heads and to divide or be a multiple of the {hkv} kv heads; plan for another --gpus or "
                      "with attention replicated")
    for part, width, name in (("dense_mlp", getattr(cfg, "intermediate_size_mlp", 0), "dense MLP width"),
                              ("shared_expert", cfg.intermediate_size, "shared expert width")):
        if part in parts and int(width) % world:
            raise L4Error(f"{part.replace('_', ' ')} tensor parallelism over {world} ranks needs {world} to divide "
                          f"the {name} {width}; plan for another --gpus or with it replicated")


def _split_attention(gm, cfg, rank: int, world: int, cut: Slicer) -> int:
    graph, d = gm.graph, int(cfg.head_dim)
    (q_lo, q_hi), (k_lo, k_hi) = head_split(int(cfg.num_attention_heads), int(cfg.num_key_value_heads), world, rank)
    count = 0
    for node in [n for n in graph.nodes if n.target in _ATTN]:
        layer = node.meta.get("l4_layer", -1)
        qkv = [weights_of(node.args[i]) for i in range(3)]
        outs = ([u for u in node.users if u.target == operator.getitem and u.args[1] == 0]
                if node.target == torch.ops.l4.attention_cached.default else [node])
        users = list(outs[0].users) if len(outs) == 1 else []
        o_w = weights_of(users[0]) if len(users) == 1 else None
        if None in qkv or o_w is None or any(len(node.args[i].users) != 1 for i in range(3)):
            raise L4Error(f"shard_tensor_parallel: attention of layer {layer} is not q/k/v linears -> "
                          f"{node.target} -> o_proj linear; cannot split it by heads")
        cut(qkv[0], "out", q_lo * d, q_hi * d)                                   # q_proj [Hq*D, H] rows
        for w in qkv[1:]:
            cut(w, "out", k_lo * d, k_hi * d)                                    # k/v_proj [Hkv*D, H] rows
        cut(o_w, "in", q_lo * d, q_hi * d)                                       # o_proj [H, Hq*D] columns
        i = _ATTN[node.target]
        node.args = (*node.args[:i], q_hi - q_lo, k_hi - k_lo, *node.args[i + 2:])
        _insert_all_reduce(graph, users[0], rank, world)
        count += 1
    return count


def _swiglu_inputs(down: torch.fx.Node):
    """``down(silu(gate(x)) * up(x))`` -> (gate, up) weight tuples, else None."""
    prod = down.args[0]
    if not (isinstance(prod, torch.fx.Node) and prod.target == aten.mul.Tensor and len(prod.users) == 1):
        return None
    act = next((a for a in prod.args if isinstance(a, torch.fx.Node) and a.target == aten.silu.default), None)
    up = next((a for a in prod.args if a is not act), None)
    gate_w, up_w = (weights_of(act.args[0]) if act is not None else None), weights_of(up)
    return (gate_w, up_w) if gate_w and up_w and gate_w != up_w else None


def _split_dense(gm, cfg, rank: int, world: int, cut: Slicer) -> int:
    graph = gm.graph
    width = int(cfg.intermediate_size_mlp) // world
    lo, hi = rank * width, (rank + 1) * width
    blocks = []
    for down in [n for n in graph.nodes if weights_of(n) is not None]:
        path = innermost_module(down, "Llama4TextMLP")
        if path is None or innermost_module(down, "Llama4TextMoe") is not None:
            continue
        found = _swiglu_inputs(down)
        if found is not None:
            blocks.append((layer_index(path), down, found))
    dense = int(cfg.num_hidden_layers) - len(set(getattr(cfg, "moe_layers", None) or ()))
    if len(blocks) != dense:
        raise L4Error(f"shard_tensor_parallel: found {len(blocks)} dense MLPs of the form down(silu(gate(x)) * up(x)) "
                      f"(layers {[b[0] for b in blocks]}), the model has {dense}; cannot split them")
    for _, down, (gate_w, up_w) in blocks:
        cut(gate_w, "out", lo, hi)                                               # [Imlp, H] rows
        cut(up_w, "out", lo, hi)
        cut(weights_of(down), "in", lo, hi)                                        # [H, Imlp] columns
        _insert_all_reduce(graph, down, rank, world)
    return len(blocks)


def _split_shared(gm, cfg, rank: int, world: int, cut: Slicer) -> int:
    graph = gm.graph
    if any(n.target in (torch.ops.l4.moe.default, torch.ops.l4.moe_q.default) for n in graph.nodes):
        raise L4Error("shard_tensor_parallel: shared expert TP needs expert parallelism (l4.moe_ep from "
                      "shard_experts); compile with a plan whose experts are 'ep'")
    width = int(cfg.intermediate_size) // world
    lo, hi = rank * width, (rank + 1) * width
    count = 0
    for node in [n for n in graph.nodes if n.target in _SHARED_ARGS]:
        first, n_args = _SHARED_ARGS[node.target]
        ws = node.args[first:n_args - 4]                                         # 3 weights, or 3 (weight, scale)
        per = len(ws) // 3
        gate, up, down = (tuple(ws[i * per:(i + 1) * per]) for i in range(3))
        cut(gate, "out", lo, hi)                                                 # [I, H] rows
        cut(up, "out", lo, hi)
        cut(down, "in", lo, hi)                                                  # [H, I] columns
        node.args = (*node.args[:n_args], True)                                  # shared_sharded
        count += 1
    return count


def rank_cache_layout(layout: dict, kv_local: int) -> dict:
    """The kv_cache pass's layout for a rank that keeps ``kv_local`` of the kv heads (shape and bytes scaled)."""
    total = int(layout["shape"][1])
    out = dict(layout, shape=[layout["shape"][0], kv_local, *layout["shape"][2:]], kv_heads_total=total)
    for key in _KV_BYTE_KEYS:
        if key in layout:
            out[key] = int(layout[key]) * kv_local // total
    return out


# ------------------------------------------------------------------------------------------ the pass

def _copies(gm: torch.fx.GraphModule, world: int) -> list[torch.fx.GraphModule]:
    """W rank graphs sharing the logical graph's weights (used when shard_experts did not run)."""
    out = []
    for r in range(world):
        g = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph), class_name=f"L4Rank{r}")
        g.meta.update({k: v for k, v in gm.meta.items() if k not in ("l4_shards", "l4_sharding")})
        out.append(g)
    return out


@register_pass("shard_tensor_parallel", guarantees=("tensor_parallel",),
               after=("shard_experts", "kv_cache", "eliminate_dead_code", "quantize"),
               options=ShardTensorParallelOptions, default=False)
def shard_tensor_parallel(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """Tensor parallelism from a plan: heads / MLP widths split per rank, l4.all_reduce after row-split matmuls."""
    opts, cfg = ctx.options, ctx.model_config
    if not isinstance(opts, ShardTensorParallelOptions) or opts.world_size < 1 or not opts.parts:
        raise L4Error("shard_tensor_parallel needs a plan: use `l4compile compile MODEL --plan plan.json` (plan.json "
                      "from `l4compile plan MODEL --gpus N --json`)")
    parts, world = tuple(opts.parts), int(opts.world_size)
    unknown = sorted(set(parts) - set(TP_PARTS))
    if unknown:
        raise L4Error(f"shard_tensor_parallel: cannot split {unknown}; parts are {', '.join(TP_PARTS)}")
    if world == 1:
        return PassResult(gm, changed=False, stats={"ranks": 1, "parts": []})
    check_divisible(cfg, world, parts)
    shards = gm.meta.get("l4_shards") or _copies(gm, world)
    if len(shards) != world:
        raise L4Error(f"shard_tensor_parallel: {len(shards)} rank graphs from shard_experts, the plan has {world} ranks")
    split = {"attention": _split_attention, "dense_mlp": _split_dense, "shared_expert": _split_shared}
    counts = {p: [] for p in parts}
    for r, shard in enumerate(shards):
        cut = Slicer(shard)
        for p in parts:
            counts[p].append(split[p](shard, cfg, r, world, cut))
        shard.graph.lint()
        shard.recompile()
    for p in parts:
        if not counts[p][0]:
            raise L4Error(f"shard_tensor_parallel: the plan splits '{p}' but the graph has no such layer")
    (q_lo, q_hi), (k_lo, k_hi) = head_split(int(cfg.num_attention_heads), int(cfg.num_key_value_heads), world, 0)
    sharding = gm.meta.get("l4_sharding") or {
        "world_size": world, "plan_hash": opts.plan_hash, "notes": [], "artifacts": [f"rank{r}" for r in range(world)],
        "execution": {"attention": "replicated", "dense_mlp": "replicated", "shared_expert": "replicated",
                      "experts": "replicated", "router": "replicated", "vocab": "replicated"}}
    sharding["execution"] = dict(sharding["execution"], **{p: "tp" for p in parts})
    tp = {"parts": list(parts), "heads_per_rank": q_hi - q_lo if "attention" in parts else None,
          "kv_heads_per_rank": k_hi - k_lo if "attention" in parts else None}
    if "attention" in parts:
        tp["kv_heads"] = [list(head_split(int(cfg.num_attention_heads), int(cfg.num_key_value_heads), world, r)[1])
                          for r in range(world)]
        layout = gm.meta.get("l4_kv_cache")
        if layout is not None:
            per_rank = rank_cache_layout(layout, k_hi - k_lo)
            for shard in shards:
                shard.meta["l4_kv_cache"] = per_rank
            sharding["kv_cache"] = per_rank
    sharding["tensor_parallel"] = tp
    gm.meta["l4_shards"], gm.meta["l4_sharding"] = shards, sharding
    n_ar = counts.get("attention", [0])[0] + counts.get("dense_mlp", [0])[0]
    return PassResult(gm, changed=True, stats={
        "ranks": world, "parts": list(parts), "attention_layers": counts.get("attention", [0])[0],
        "dense_layers": counts.get("dense_mlp", [0])[0], "shared_layers": counts.get("shared_expert", [0])[0],
        "all_reduces_per_rank": n_ar, "heads_per_rank": tp["heads_per_rank"],
        "kv_heads_per_rank": tp["kv_heads_per_rank"]})
