"""From a plan (``l4compile plan MODEL --gpus N --json``) to the passes and options that execute it.

``compile --plan plan.json`` calls ``pass_options_from_plan``: it validates the plan and returns the
options of every sharding pass the layout needs, keyed by pass name (the compiler selects those passes):

* ``shard_experts`` (always): the rank of every expert of every MoE layer (expert parallelism). A plan
  whose experts are not expert-parallel (more ranks than experts: ``tp``) is rejected.
* ``shard_tensor_parallel`` (when the layout chooses ``tp`` for attention, dense MLPs or the shared
  expert, on more than one rank): which of the three it splits.

What the layout chooses and execution does not implement runs replicated instead and is recorded as a
note in the manifest (``sharding.notes``): data-parallel attention (``dp``) and a vocabulary-parallel
embedding / lm_head (``vocab: tp``). The manifest's ``sharding.execution`` names, per layer type, what
runs (``tp`` / ``replicated`` / ``ep`` / ``n/a``).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from l4compile.errors import L4Error

TP_PARTS = ("attention", "dense_mlp", "shared_expert")   # layer types tensor parallelism can split
_NOT_EXECUTED = {("attention", "dp"): "data-parallel attention", ("vocab", "tp"): "a vocabulary-parallel "
                 "embedding and lm_head"}


def load_plan(plan) -> dict:
    """A plan: a dict, or the path of ``l4compile plan ... --json`` output (the last JSON line is used)."""
    if isinstance(plan, dict):
        return plan
    p = Path(plan)
    if not p.is_file():
        raise L4Error(f"--plan {plan}: no such file; write one with `l4compile plan MODEL --gpus N --json > plan.json`")
    text = p.read_text()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    for candidate in (text, lines[-1] if lines else ""):
        try:
            obj = json.loads(candidate)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            return obj
    raise L4Error(f"--plan {plan} is not the JSON of `l4compile plan MODEL --gpus N --json`")


def plan_hash(plan: dict) -> str:
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:16]


def _placement(plan: dict, world: int) -> tuple:
    """-> ((layer, (rank of expert 0, rank of expert 1, ...)), ...) from the plan's per-rank expert lists."""
    owners: dict[int, dict[int, int]] = {}
    n_exp = int((plan.get("model_config") or {}).get("experts", 0)) or None
    for r, rk in enumerate(plan["ranks"]):
        if not isinstance(rk, dict) or not isinstance(rk.get("experts"), dict):
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
    return tuple(placement)


def pass_options_from_plan(plan, backend: str = "inductor") -> dict[str, dict]:
    """plan (dict or path) -> {pass name: options dict} for the sharding passes that execute it."""
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
    if not isinstance(layout, dict) or layout.get("experts") != "ep":
        got = layout.get("experts") if isinstance(layout, dict) else layout
        raise L4Error(f"--plan: experts are '{got}', not expert-parallel; sharded execution supports expert "
                      "parallelism only (plan for at most as many GPUs as experts)")
    if world < 1 or not isinstance(ranks, list) or len(ranks) != world:
        raise L4Error(f"--plan: {len(ranks) if isinstance(ranks, list) else 0} ranks listed for {world} GPUs")
    for key in TP_PARTS:
        if layout.get(key) not in (None, "tp", "replicate", "n/a", "dp"):
            raise L4Error(f"--plan: layout '{key}' is '{layout.get(key)}'; expected tp, replicate or n/a")
    notes = [f"plan chose {key} '{choice}'; executed replicated ({what} is not implemented)"
             for (key, choice), what in _NOT_EXECUTED.items() if layout.get(key) == choice]
    if not plan.get("feasible", True):
        notes.append("the plan is marked infeasible for its GPU memory; compiled anyway")
    h = plan_hash(plan)
    out = {"shard_experts": {"world_size": world, "placement": _placement(plan, world), "plan_hash": h,
                             "notes": tuple(notes), "plan_strategy": str(plan.get("strategy"))}}
    tp = tuple(key for key in TP_PARTS if layout.get(key) == "tp")
    if tp and world > 1:
        out["shard_tensor_parallel"] = {"world_size": world, "parts": tp, "plan_hash": h}
    return out
