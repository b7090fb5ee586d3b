"""Expert-parallel execution (compile --plan, torchrun / run --nproc) against the single-process engine.

The checkpoint (``conftest.CKPT``) is compiled once single-process and once per plan: 2 ranks as the planner
places the experts (with data-parallel attention in the layout, which runs replicated and is noted in the
manifest), and (slow) 4 ranks with a shuffled, non-contiguous placement as calibration would produce. Each
sharded engine runs as real processes on gloo via `l4compile run --nproc N`; its prompt logits and greedy
tokens must match. Here the shared expert is replicated, so ``l4::moe_ep`` dispatches with all_to_all.
"""
from __future__ import annotations

import json

import pytest

import l4compile
from l4compile.errors import L4Error
from l4compile.plan.layouts import Strategy
from tests.conftest import run_cli

EP_ONLY = Strategy(attention="dp", dense_mlp="replicate", shared="replicate", experts="ep", vocab="replicate")


def _ep_plan(sharded, n: int) -> dict:
    plan = sharded.plan(n, EP_ONLY)                              # shared expert replicated: the all_to_all path
    assert all(r["experts"] != "all (TP)" for r in plan["ranks"])
    if n == 4:   # a non-contiguous placement: expert e of layer l on rank (3e + l) % 4
        for r, rk in enumerate(plan["ranks"]):
            rk["experts"] = {k: [e for e in range(8) if (3 * e + int(k)) % 4 == r] for k in rk["experts"]}
    return plan


@pytest.mark.parametrize("nproc", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_sharded_engine_matches_single_process(sharded, nproc):
    path = sharded.engine(f"ep{nproc}", _ep_plan(sharded, nproc))
    rel, generated = sharded.run(f"ep{nproc}", nproc)
    assert rel < 1e-5
    assert generated == sharded.generated
    m = json.loads((path / "manifest.json").read_text())
    sh = m["sharding"]
    assert sh["world_size"] == nproc and len(sh["plan_hash"]) == 16
    files = ("model.pt2", "weights.safetensors", "program.pt2")
    assert sorted(m["artifacts"]) == sorted([f"rank{r}/{a}" for r in range(nproc) for a in files] + ["README.md"])
    assert sorted(e for rk in sh["experts"] for e in rk["1"]) == list(range(8))   # every expert on one rank
    shard = next(p for p in m["passes"] if p["name"] == "shard_experts")
    assert shard["stats"]["ranks"] == nproc and shard["stats"]["layers"] == [1]
    assert not any(p["name"] == "shard_tensor_parallel" for p in m["passes"])
    assert sh["execution"] == {"attention": "replicated", "dense_mlp": "replicated", "shared_expert": "replicated",
                               "experts": "ep", "router": "replicated", "vocab": "replicated"}
    assert sh["notes"] == ["plan chose attention 'dp'; executed replicated (data-parallel attention is not "
                           "implemented)"]
    if nproc == 4:
        assert sh["experts"][1]["1"] == [0, 4]                   # the shuffled placement was honoured


def test_sharded_engine_samples_as_one_process(sharded):
    """Sampling on a sharded engine: every rank draws with the same seed, and the tokens are the single process's."""
    sharded.engine("ep2", _ep_plan(sharded, 2))
    rel, sampled = sharded.run("ep2", 2, "--temperature", "1", "--top-p", "0.95", "--seed", "5")
    assert rel < 1e-5 and sampled == sharded.sampled and sampled != sharded.generated


def test_sharded_engine_needs_a_process_group(sharded):
    path = sharded.engine("ep2", _ep_plan(sharded, 2))
    with pytest.raises(L4Error, match="--nproc 2"):
        l4compile.load_engine(path)
    r = run_cli("run", str(path), "--prompt-ids", "1,2,3")
    assert r.returncode == 2 and r.stderr.startswith("error:") and "--nproc 2" in r.stderr
    r = run_cli("run", str(path), "--nproc", "4", "--prompt-ids", "1,2,3")
    assert r.returncode == 2 and "sharded over 2 ranks" in r.stderr
