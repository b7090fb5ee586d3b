"""shard_experts: split the fused MoE experts over W ranks as a plan places them (expert parallelism).

Contract
--------
* Runs only when asked (``default=False``): ``l4compile compile --plan plan.json`` (or
  ``l4compile.compile(..., plan=...)``) selects it and gives it its options (world size, the rank of every
  expert of every MoE layer, the plan's hash). Requires ``moe_fused``; runs after ``kv_cache``.
* Everything except the routed experts is replicated on every rank (attention, dense MLPs, shared experts,
  router, embeddings, lm_head).
* Output: the pass returns the graph unchanged (the logical, single-process model, so verify mode and
  ``--dump-ir`` still see the whole model) and attaches one GraphModule per rank in
  ``gm.meta["l4_shards"]``: in rank r's graph each ``l4.moe`` becomes ``l4.moe_ep`` and each layer's
  ``experts.gate_up_proj`` / ``experts.down_proj`` are replaced by copies holding only rank r's experts
  (ascending global ids); the full expert weights are not referenced by any rank's module.
  ``gm.meta["l4_sharding"]`` records world size, experts per rank per layer and the plan hash.
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
from l4compile.ops import moe_ep as _moe_ep_op  # noqa: F401  (registers torch.ops.l4.moe_ep)

from ._provenance import innermost_module, layer_index
from ._registry import PassContext, PassResult, register_pass


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


def _get(gm: torch.nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _set(gm: torch.nn.Module, target: str, value: torch.Tensor) -> None:
    *path, leaf = target.split(".")
    mod = gm
    for part in path:
        mod = getattr(mod, part)
    setattr(mod, leaf, torch.nn.Parameter(value, requires_grad=False))


def rank_graph(gm: torch.fx.GraphModule, rank: int, world: int, owners: dict[int, list[int]]) -> torch.fx.GraphModule:
    """Rank ``rank``'s GraphModule: l4.moe -> l4.moe_ep with its experts' weights only."""
    graph = copy.deepcopy(gm.graph)
    sliced: dict[str, torch.Tensor] = {}
    for n in list(graph.nodes):
        if n.target != torch.ops.l4.moe.default:
            continue
        owner = owners[_layer_of(n)]
        local = torch.tensor([e for e, r in enumerate(owner) if r == rank], dtype=torch.int64)
        x, router, gate_up, down, sg, su, sd, k = n.args
        for w in (gate_up, down):
            full = _get(gm, str(w.target))
            sliced[str(w.target)] = full.detach().index_select(0, local.to(full.device)).contiguous()
            w.meta.pop("val", None)
        with graph.inserting_before(n):
            ep = graph.call_function(torch.ops.l4.moe_ep.default,
                                     (x, router, gate_up, down, sg, su, sd, k, list(owner), rank, world))
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
    moes = [n for n in gm.graph.nodes if n.target == torch.ops.l4.moe.default]
    found = sorted(_layer_of(n) for n in moes)
    if not moes:
        quantized = any("moe_q" in str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        raise L4Error("shard_experts: quantized MoE (l4.moe_q) cannot be sharded yet; use --quant none with --plan"
                      if quantized else "shard_experts: the graph has no l4.moe op (did fuse_moe run?)")
    if found != sorted(owners):
        raise L4Error(f"shard_experts: the plan places experts for MoE layers {sorted(owners)} but the graph has "
                      f"MoE layers {found}; make the plan for this model")
    for n in moes:
        n_exp = _get(gm, str(n.args[1].target)).shape[0]               # router [E, H]
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
                              "replicated": ["attention", "dense_mlp", "shared_expert", "router", "vocab"],
                              "artifacts": [f"rank{r}" for r in range(world)]}
    return PassResult(gm, changed=True, stats={"ranks": world, "layers": found,
                                              "experts_per_rank": [sum(len(v) for v in p.values()) for p in per_rank]})


# ------------------------------------------------------------------------------------------ plan -> options

_REPLICATED_KEYS = ("attention", "dense_mlp", "shared_expert", "vocab")


def load_plan(plan) -> dict:
    """A plan: a dict, or the path of ``l4compile plan ... --json`` output (the last JSON line is used)."""
    import json
    from pathlib import Path

    if isinstance(plan, dict):
        return plan
    p = Path(plan)
    if not p.is_file():
        raise L4Error(f"--plan {plan}: no such file; write one with `l4compile plan MODEL --gpus N --json > plan.json`")
    lines = [ln for ln in p.read_text().splitlines() if ln.strip()]
    for text in (p.read_text(), lines[-1] if lines else ""):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            return obj
    raise L4Error(f"--plan {plan} is not the JSON of `l4compile plan MODEL --gpus N --json`")


def plan_hash(plan: dict) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:16]


def options_from_plan(plan, backend: str = "inductor") -> dict:
    """The plan's expert placement -> this pass's options (a dict for ``pass_options["shard_experts"]``).

    Execution supports expert parallelism with everything else replicated: a plan that chose tensor
    parallelism (or data-parallel attention) for attention, dense MLPs, shared experts or the vocabulary is
    executed with those REPLICATED instead, and the override is recorded in the manifest
    (``sharding.notes``). A plan whose experts are not expert-parallel (more ranks than experts) is rejected."""
    plan = load_plan(plan)
    if backend != "inductor":
        raise L4Error(f"--plan (sharded engines) needs --backend inductor; {backend} engines run on one process")
    try:
        world = int(plan["gpus"])
        layout = plan["layout"] or {}
        ranks = plan["ranks"]
    except (KeyError, TypeError, ValueError):
        raise L4Error("--plan lacks 'gpus', 'layout' or 'ranks': give the JSON of `l4compile plan MODEL --gpus N "
                      "--json`") from None
    if layout.get("experts") != "ep":
        raise L4Error(f"--plan: experts are '{layout.get('experts')}', not expert-parallel; sharded execution "
                      "supports expert parallelism only (plan for at most as many GPUs as experts)")
    if world < 1 or len(ranks) != world:
        raise L4Error(f"--plan: {len(ranks)} ranks listed for {world} GPUs")
    owners: dict[int, list[int]] = {}
    n_exp = int((plan.get("model_config") or {}).get("experts", 0)) or None
    for r, rk in enumerate(ranks):
        if not isinstance(rk.get("experts"), dict):
            raise L4Error(f"--plan: rank {r} has no per-layer expert list")
        for layer, experts in rk["experts"].items():
            for e in experts:
                owners.setdefault(int(layer), {})[int(e)] = r
    placement = []
    for layer, by_expert in sorted(owners.items()):
        n = n_exp or (max(by_expert) + 1)
        if sorted(by_expert) != list(range(n)):
            raise L4Error(f"--plan: layer {layer} places experts {sorted(by_expert)}, expected each of 0..{n - 1} "
                          "exactly once")
        placement.append((layer, tuple(by_expert[e] for e in range(n))))
    notes = [f"plan chose {key} '{layout[key]}'; executed replicated (sharded execution replicates everything "
             "but the experts)" for key in _REPLICATED_KEYS if layout.get(key) not in (None, "replicate", "n/a")]
    if not plan.get("feasible", True):
        notes.append("the plan is marked infeasible for its GPU memory; compiled anyway")
    return {"world_size": world, "placement": tuple(placement), "plan_hash": plan_hash(plan),
            "notes": tuple(notes), "plan_strategy": str(plan.get("strategy"))}
