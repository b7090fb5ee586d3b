"""Expert-parallel execution (compile --plan, torchrun / run --nproc) against the single-process engine.

One small checkpoint (2 MoE layers, 8 experts, top-2 routing so assignments of one token go to different
ranks) is compiled once single-process and once per plan: 2 ranks as the planner places the experts, 4 ranks
with a shuffled (non-contiguous) placement as calibration would produce. Each sharded engine runs as real
processes on gloo via `l4compile run --nproc N`; its prompt logits and greedy tokens must match.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import l4compile
from l4compile.errors import L4Error
from l4compile.plan import PlanRequest, make_plan
from l4compile.plan.memory import GiB
from tests.conftest import run_cli, save_checkpoint

PROMPT = [3, 17, 250, 9, 41, 77, 123, 5, 300, 64, 12, 201, 88, 19, 150, 222, 7, 99, 31]   # crosses chunks of 8
NEW = 10
MAX_SEQ = 64


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ep")
    ckpt = save_checkpoint(root / "ckpt", num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=2,
                           router_std=0.5)
    single = l4compile.compile(str(ckpt), out=root / "single", max_seq_len=MAX_SEQ, max_batch_size=1)
    ids = torch.tensor([PROMPT])
    ref = {"logits": single.prefill(ids)[0].float().numpy(),
           "generated": single.generate(ids, max_new_tokens=NEW)[0, len(PROMPT):].tolist()}
    plans = {}
    for n in (2, 4):
        plan = make_plan(PlanRequest(str(ckpt), gpus=n, gpu_mem=8 * GiB)).to_json()
        assert all(r["experts"] != "all (TP)" for r in plan["ranks"])
        if n == 4:   # a non-contiguous placement: expert e of layer l on rank (3e + l) % 4
            for r, rk in enumerate(plan["ranks"]):
                rk["experts"] = {k: [e for e in range(8) if (3 * e + int(k)) % 4 == r] for k in rk["experts"]}
        path = root / f"plan{n}.json"
        path.write_text(json.dumps(plan))
        plans[n] = l4compile.compile(str(ckpt), out=root / f"ep{n}", max_seq_len=MAX_SEQ, max_batch_size=1,
                                     plan=path).path
    return root, ref, plans


@pytest.mark.parametrize("nproc", [2, 4])
def test_sharded_engine_matches_single_process(setup, nproc):
    root, ref, plans = setup
    out = root / f"logits{nproc}.npy"
    r = run_cli("run", str(plans[nproc]), "--nproc", str(nproc), "--prompt-ids", ",".join(map(str, PROMPT)),
                "--max-new-tokens", str(NEW), "--logits-out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    logits = np.load(out)
    rel = float(np.abs(logits - ref["logits"]).max() / np.abs(ref["logits"]).max())
    print(f"nproc {nproc}: max rel logit error {rel:.3g}")
    assert logits.shape == ref["logits"].shape
    assert rel < 1e-5
    assert result["generated_ids"] == ref["generated"]


def test_manifest_and_artifacts(setup):
    _, _, plans = setup
    for n, path in plans.items():
        m = json.loads((path / "manifest.json").read_text())
        sh = m["sharding"]
        assert sh["world_size"] == n and len(sh["plan_hash"]) == 16
        assert sorted(m["artifacts"]) == sorted([f"rank{r}/model.pt2" for r in range(n)] + ["README.md"])
        for layer in ("0", "1"):   # every expert on exactly one rank
            assert sorted(e for rk in sh["experts"] for e in rk[layer]) == list(range(8))
        shard = next(p for p in m["passes"] if p["name"] == "shard_experts")
        assert shard["stats"]["ranks"] == n and shard["stats"]["layers"] == [0, 1]
    m4 = json.loads((plans[4] / "manifest.json").read_text())
    assert m4["sharding"]["experts"][1]["0"] == [3, 7]            # the shuffled placement was honoured


def test_sharded_engine_needs_a_process_group(setup):
    _, _, plans = setup
    with pytest.raises(L4Error, match="--nproc 2"):
        l4compile.load_engine(plans[2])
    r = run_cli("run", str(plans[2]), "--prompt-ids", "1,2,3")
    assert r.returncode == 2 and r.stderr.startswith("error:") and "--nproc 2" in r.stderr
    r = run_cli("run", str(plans[2]), "--nproc", "4", "--prompt-ids", "1,2,3")
    assert r.returncode == 2 and "sharded over 2 ranks" in r.stderr
