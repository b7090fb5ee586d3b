"""Tensor-parallel attention, dense MLP and shared expert (with expert-parallel routed experts) against the
single-process engine: `compile --plan` with a TP+EP layout, run as real gloo processes (`run --nproc N`).

2 ranks (default): each rank keeps 2 of the 4 query heads and 1 of the 2 kv heads (its KV cache holds only
that head), half of the dense MLP and shared-expert widths, and 4 of the 8 experts; `l4::moe_ep` sums the
shared partial and the routed terms in one all-reduce. 4 ranks (slow): more ranks than kv heads, so ranks
0-1 and 2-3 each keep a copy of one kv head (as the planner's memory model assumes).
"""
from __future__ import annotations

import json

import pytest

from l4compile.plan.layouts import Strategy
from tests.conftest import run_cli

TP_EP = Strategy(attention="tp", dense_mlp="tp", shared="tp", experts="ep", vocab="replicate")


@pytest.mark.parametrize("nproc", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_tp_ep_engine_matches_single_process(sharded, nproc):
    plan = sharded.plan(nproc, TP_EP)
    path = sharded.engine(f"tp{nproc}", plan)
    rel, generated = sharded.run(f"tp{nproc}", nproc)
    assert rel < 1e-5
    assert generated == sharded.generated                       # greedy decode through the per-rank KV caches

    m = json.loads((path / "manifest.json").read_text())
    sh = m["sharding"]
    assert sh["execution"] == {"attention": "tp", "dense_mlp": "tp", "shared_expert": "tp", "experts": "ep",
                               "router": "replicated", "vocab": "replicated"}
    assert sh["notes"] == []                                    # nothing the plan chose was overridden
    files = ("model.pt2", "weights.safetensors", "program.pt2")
    assert sorted(m["artifacts"]) == sorted([f"rank{r}/{a}" for r in range(nproc) for a in files] + ["README.md"])
    stats = next(p for p in m["passes"] if p["name"] == "shard_tensor_parallel")["stats"]
    assert stats == {"ranks": nproc, "parts": ["attention", "dense_mlp", "shared_expert"], "attention_layers": 2,
                     "dense_layers": 1, "shared_layers": 1, "all_reduces_per_rank": 3,
                     "heads_per_rank": 4 // nproc, "kv_heads_per_rank": 1}
    assert sh["tensor_parallel"]["kv_heads"] == ([[0, 1], [1, 2]] if nproc == 2 else [[0, 1], [0, 1], [1, 2], [1, 2]])

    # the per-rank KV cache: 1 kv head, and the bytes the planner assumed (bf16 there, float32 here)
    kv = m["kv_cache"]
    assert kv["shape"] == ["batch", 1, "slots", 16] and kv["kv_heads_total"] == 2
    assert [x["slots"] for x in kv["layers"]] == [8, 64]        # ring of one chunk; NoPE layer: whole context
    assert kv == sh["kv_cache"]
    for rank in plan["ranks"]:
        assert 2 * rank["memory"]["kv_cache"] == kv["bytes_per_sequence_at_max"]
    assert all(s["shape"] == ["batch", 1, "slots", 16] for s in m["signature"]["inputs"][2:])


def test_tp_request_that_cannot_run_fails_clearly(sharded):
    plan = sharded.plan(3)                                       # 4 query heads do not split over 3 ranks
    assert all(not c["valid"] for c in plan["candidates"] if c["layout"]["attention"] == "tp")
    assert plan["layout"]["attention"] != "tp"                   # the planner does not propose it ...
    plan["layout"]["attention"] = "tp"                           # ... and a hand-edited plan is refused
    path = sharded.root / "bad-tp.plan.json"
    path.write_text(json.dumps(plan))
    r = run_cli("compile", str(sharded.ckpt), "--plan", str(path), "--out", str(sharded.root / "bad-tp"),
                "--max-seq-len", "64")
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.startswith("error: attention tensor parallelism over 3 ranks needs 3 to divide the 4 query "
                               "heads") and len(r.stderr.strip().splitlines()) == 1
    assert not (sharded.root / "bad-tp").exists()


@pytest.mark.slow
def test_quantized_tp_ep_engine_matches_single_process(sharded):
    """--plan with --quant int4: moe_ep_q and sliced int4 weights (scale groups subdivided, so the dequantized
    weights are exactly the single-process engine's) -> the same logits and tokens as the int4 engine."""
    import numpy as np
    import torch

    import l4compile
    from tests.distributed.conftest import MAX_SEQ, NEW, PROMPT

    single = l4compile.compile(str(sharded.ckpt), out=sharded.root / "single-int4", quant="int4",
                               max_seq_len=MAX_SEQ, max_batch_size=1)
    ids = torch.tensor([PROMPT])
    ref = single.prefill(ids)[0].float().numpy()
    plan_path = sharded.root / "tp2-int4.plan.json"
    plan_path.write_text(json.dumps(sharded.plan(2, TP_EP)))
    eng = l4compile.compile(str(sharded.ckpt), out=sharded.root / "tp2-int4", quant="int4", max_seq_len=MAX_SEQ,
                            max_batch_size=1, plan=plan_path)
    out = sharded.root / "tp2-int4.npy"
    r = run_cli("run", str(eng.path), "--nproc", "2", "--prompt-ids", ",".join(map(str, PROMPT)),
                "--max-new-tokens", str(NEW), "--logits-out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    logits = np.load(out)
    assert float(np.abs(logits - ref).max() / np.abs(ref).max()) < 1e-5
    assert json.loads(r.stdout.strip().splitlines()[-1])["generated_ids"] == \
        single.generate(ids, max_new_tokens=NEW)[0, len(PROMPT):].tolist()
    assert eng.manifest["quant"] == "int4" and eng.manifest["sharding"]["execution"]["shared_expert"] == "tp"
