"""shard_experts: split the fused MoE experts over W ranks as a plan places them (expert parallelism).

Contract
--------
* Runs only when asked (``default=False``): ``l4compile compile --plan plan.json`` (or
  ``l4compile.compile(..., plan=...)``) selects it and gives it its options (world size, the rank of every
  expert of every MoE layer, the plan's hash; ``l4compile.plan.execution.pass_options_from_plan``).
  Requires ``moe_fused``; runs after ``kv_cache``.
* Everything except the routed experts is replicated on every rank (attention, dense MLPs, shared experts,
  router, embeddings, lm_head) unless ``shard_tensor_parallel`` (which runs after it, on these rank
  graphs) splits attention, dense MLPs or the shared expert as the plan asks.
* Output: the pass returns the graph unchanged (the logical, single-process model, so verify mode and
  ``--dump-ir`` still see the whole model) and attaches one GraphModule per rank in
  ``gm.meta["l4_shards"]``: in rank r's graph each ``l4.moe`` becomes ``l4.moe_ep`` (each quantized
  ``l4.moe_q`` becomes ``l4.moe_ep_q``) and each layer's ``experts.gate_up_proj`` / ``experts.down_proj``
  (quantized: their weights and scales) are replaced by copies holding only rank r's experts (ascending
  global ids); the full expert weights are not referenced by any rank's module.
  ``gm.meta["l4_sharding"]`` records world size, experts per rank per layer, the plan hash, the notes
  (what the plan chose and execution does not implement) and ``execution``: per layer type what runs
  (``experts: ep``, everything else ``replicated`` until a later pass says otherwise).
  A MoE layer the plan does not place, or a plan layer the graph lacks, raises ``L4Error``.
* Stats: ``{"ranks": W, "layers": [...], "experts_per_rank": [...]}``.

Before (rank-agnostic)::

    moe = l4.moe(reshape_12, router_weight, experts_gate_up_proj, experts_down_proj, sg, su, sd, 1)

After, rank 1 of 2 (``gm.meta["l4_shards"][1]``; experts_gate_up_proj is now [E/2, H, 2I])::

    moe_ep = l4.moe_ep(reshape_12, router_weight, experts_gate_up_proj, experts_down_proj, sg, su, sd, 1,
                       [0, 0, 0, 0, 1, 1, 1, 1], 1, 2)
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.fx

from l4compile.errors import L4Error
from l4compile.ops import moe_ep as _moe_ep_op  # noqa: F401  (registers l4.moe_ep, l4.moe_ep_q)
from l4compile.ops import quant as _quant_op  # noqa: F401  (registers l4.moe_q)

from ._provenance import innermost_module, layer_index
from ._registry import PassContext, PassResult, register_pass
from ._slicing import get_tensor


_EP_OF = {torch.ops.l4.moe.default: torch.ops.l4.moe_ep.default,          # float weights
          torch.ops.l4.moe_q.default: torch.ops.l4.moe_ep_q.default}      # fp8 / int4 weights (--quant)


@dataclass(frozen=True)
class ShardExpertsOptions:
    world_size: int = 0
    placement: tuple = ()          # ((layer, (rank of expert 0, rank of expert 1, ...)), ...)
    plan_hash: str = ""
    notes: tuple = ()              # what execution does differently from the plan (recorded in the manifest)
    plan_strategy: str = ""


def _layer_of(node: torch.fx.Node) -> int:
    path = innermost_module(node, "Llama4TextMoe")
    return layer_index(path) if path is not None else -1


def _set(gm: torch.nn.Module, target: str, value: torch.Tensor) -> None:
    """Replace the tensor at ``target`` keeping its kind (parameter, or buffer such as quantized weights)."""
    *path, leaf = target.split(".")
    mod = gm
    for part in path:
        mod = getattr(mod, part)
    if isinstance(getattr(mod, leaf), torch.nn.Parameter):
        setattr(mod, leaf, torch.nn.Parameter(value, requires_grad=False))
    else:
        mod.register_buffer(leaf, value)


def _dense_kind(cfg) -> str:
    """'replicated' when the model has dense (non-MoE) MLP layers, else 'n/a'."""
    moe_layers = set(getattr(cfg, "moe_layers", None) or ())
    return "replicated" if len(moe_layers) < int(cfg.num_hidden_layers) else "n/a"


def rank_graph(gm: torch.fx.GraphModule, rank: int, world: int, owners: dict[int, list[int]]) -> torch.fx.GraphModule:
    """Rank ``rank``'s GraphModule: l4.moe -> l4.moe_ep with its experts' weights only."""
    graph = copy.deepcopy(gm.graph)
    sliced: dict[str, torch.Tensor] = {}
    for n in list(graph.nodes):
        if n.target not in _EP_OF:
            continue
        owner = owners[_layer_of(n)]
        local = torch.tensor([e for e, r in enumerate(owner) if r == rank], dtype=torch.int64)
        experts = n.args[2:4] if n.target == torch.ops.l4.moe.default else n.args[2:6]   # [E, ...] tensors
        for w in experts:
            full = get_tensor(gm, str(w.target))
            sliced[str(w.target)] = full.detach().index_select(0, local.to(full.device)).contiguous()
            w.meta.pop("val", None)
        with graph.inserting_before(n):
            ep = graph.call_function(_EP_OF[n.target], (*n.args, list(owner), rank, world))
        ep.meta = dict(n.meta)
        n.replace_all_uses_with(ep)
        graph.erase_node(n)
    graph.lint()
    out = torch.fx.GraphModule(gm, graph, class_name=f"L4Rank{rank}")   # copies only what the graph reads
    for target, t in sliced.items():
        _set(out, target, t)                                            # replaces the full weights
    out.meta.update(gm.meta)
    out.meta.pop("l4_shards", None)
    return out


@register_pass("shard_experts", requires=("moe_fused",), guarantees=("experts_sharded",),
               after=("kv_cache", "eliminate_dead_code", "quantize"), options=ShardExpertsOptions, default=False)
def shard_experts(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """Expert parallelism from a plan: one graph per rank, l4.moe -> l4.moe_ep over that rank's experts."""
    opts = ctx.options
    if not isinstance(opts, ShardExpertsOptions) or opts.world_size < 1 or not opts.placement:
        raise L4Error("shard_experts needs a plan: use `l4compile compile MODEL --plan plan.json` "
                      "(plan.json from `l4compile plan MODEL --gpus N --json`)")
    world = opts.world_size
    owners = {int(layer): [int(r) for r in ranks] for layer, ranks in opts.placement}
    moes = [n for n in gm.graph.nodes if n.target in _EP_OF]
    found = sorted(_layer_of(n) for n in moes)
    if not moes:
        raise L4Error("shard_experts: the graph has no l4.moe / l4.moe_q op (did fuse_moe run?)")
    if found != sorted(owners):
        raise L4Error(f"shard_experts: the plan places experts for MoE layers {sorted(owners)} but the graph has "
                      f"MoE layers {found}; make the plan for this model")
    for n in moes:
        n_exp = get_tensor(gm, str(n.args[1].target)).shape[0]               # router [E, H]
        owner = owners[_layer_of(n)]
        if len(owner) != n_exp or any(not 0 <= r < world for r in owner):
            raise L4Error(f"shard_experts: layer {_layer_of(n)}: the plan places {len(owner)} experts on ranks "
                          f"{sorted(set(owner))}, the model has {n_exp} experts and the plan {world} ranks")
        empty = sorted(set(range(world)) - set(owner))
        if empty:
            raise L4Error(f"shard_experts: layer {_layer_of(n)}: ranks {empty} hold no expert")
    shards = [rank_graph(gm, r, world, owners) for r in range(world)]
    per_rank = [{str(layer): [e for e, o in enumerate(owner) if o == r] for layer, owner in sorted(owners.items())}
                for r in range(world)]
    gm.meta["l4_shards"] = shards
    gm.meta["l4_sharding"] = {"world_size": world, "plan_hash": opts.plan_hash, "plan_strategy": opts.plan_strategy,
                              "experts": per_rank, "notes": list(opts.notes),
                              "execution": {"attention": "replicated", "dense_mlp": _dense_kind(ctx.model_config),
                                            "shared_expert": "replicated", "experts": "ep", "router": "replicated",
                                            "vocab": "replicated"},
                              "artifacts": [f"rank{r}" for r in range(world)]}
    return PassResult(gm, changed=True, stats={"ranks": world, "layers": found,
                                              "experts_per_rank": [sum(len(v) for v in p.values()) for p in per_rank]})
