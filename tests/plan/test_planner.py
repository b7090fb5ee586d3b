"""l4compile plan: published deployment facts, memory-model invariants, inventory provenance, bad input,
calibration. Full-size models are built on the meta device only (no weights)."""
from __future__ import annotations

import argparse
import json

import pytest
import torch

from l4compile.errors import L4Error
from l4compile.plan import PlanRequest, make_plan
from l4compile.plan import planner
from l4compile.plan.inventory import from_module, from_program
from l4compile.plan.layouts import Strategy, balanced_placement, even_placement, rank_loads
from l4compile.plan.memory import GiB, get_scheme, parse_size


@pytest.fixture(scope="module")
def inventories():
    from l4compile import frontend

    out = {}
    for name in ("scout", "maverick"):
        lm = frontend.load(name, meta=True, dtype="bfloat16").model
        out[name] = (from_module(lm), lm.config)
    return out


def _plan(inventories, name, gpus, mem_gib, quant="none", **kw):
    records, cfg = inventories[name]
    return make_plan(PlanRequest(name, gpus=gpus, gpu_mem=int(mem_gib * GiB), quant=quant, **kw), records, cfg)


# ------------------------------------------------------------------ published deployment facts

def test_scout_int4_fits_one_h100(inventories):
    p = _plan(inventories, "scout", 1, 80, "int4")
    assert p.feasible, p.reason
    (rank,) = p.best.ranks
    assert set(rank["memory"]["weights_by_dtype"]) == {"bf16", "int4", "scales"}
    assert 50 * GiB < rank["memory"]["weights"] < 60 * GiB
    assert not _plan(inventories, "scout", 1, 80, "none").feasible       # bf16 Scout is ~200 GiB


def test_maverick_fp8_fits_8x80(inventories):
    p = _plan(inventories, "maverick", 8, 80, "fp8")
    assert p.feasible, p.reason
    assert p.best.strategy.experts == "ep"
    ex = [set(r["experts"]["1"]) for r in p.best.ranks]
    assert all(len(x) == 16 for x in ex) and set().union(*ex) == set(range(128))
    j = p.to_json()
    assert j["max_context_tokens"] >= 430_000 and j["feasible"] is True


def test_maverick_bf16_needs_141gb(inventories):
    p = _plan(inventories, "maverick", 8, 80, "none")
    assert not p.feasible
    assert any(s.startswith("--quant fp8") for s in p.suggestions) and any("--gpus" in s for s in p.suggestions)
    assert "would fit with" in p.reason
    assert _plan(inventories, "maverick", 8, 141, "none").feasible


def test_weights_add_up(inventories):
    """Fully split layouts hold each parameter once (plus vocab padding); bf16 = 2 bytes per parameter."""
    records, cfg = inventories["maverick"]
    m = planner._Model(records, cfg, get_scheme("none"))
    s = Strategy("tp", "tp", "tp", "ep", "tp")
    ev = planner.evaluate(m, s, PlanRequest("maverick", gpus=8, gpu_mem=200 * GiB), 8192, None)
    total = sum(r["memory"]["weights"] for r in ev.ranks)
    params = sum(r.numel for r in records if r.group not in ("router", "norm", "other"))
    replicated = sum(r.numel for r in records if r.group in ("router", "norm", "other"))
    assert abs(total - 2 * (params + 8 * replicated)) < 2 * 8 * 5120       # ceil padding of the vocab split


def test_kv_matches_cache_layout(inventories):
    from l4compile.passes.kv_cache import cache_layout

    records, cfg = inventories["scout"]
    m = planner._Model(records, cfg, get_scheme("none"))
    for ctx in (100, 8192, 8193, 1_000_000):
        want = cache_layout(cfg, ctx, torch.bfloat16)["bytes_per_sequence_at_max"]
        assert planner._kv(m, 8, "bf16", ctx, 1) == want
        assert planner._kv(m, 1, "fp8", ctx, 3) == pytest.approx(3 * want / 8 / 2)
    free = 5 * GiB
    n = planner._max_context(m, 8, "bf16", free, 2)
    assert planner._kv(m, 8, "bf16", n, 2) <= free < planner._kv(m, 8, "bf16", n + 1, 2)


def test_batch_and_kv_dtype_move_max_context(inventories):
    a = _plan(inventories, "scout", 1, 80, "int4").best.max_context
    assert _plan(inventories, "scout", 1, 80, "int4", kv_dtype="fp8").best.max_context > 1.9 * a
    assert _plan(inventories, "scout", 1, 80, "int4", batch_size=4).best.max_context < a / 3
    p = _plan(inventories, "scout", 1, 80, "int4", max_seq_len=10_000_000)
    assert not p.feasible and any("--max-seq-len" in s for s in p.suggestions)


# ------------------------------------------------------------------ inventory provenance

def test_traced_inventory_matches_module():
    from l4compile import frontend
    from l4compile.program import trace

    lm = frontend.load("tiny-maverick", meta=True, dtype="bfloat16").model
    traced = {r.name: r for r in from_program(trace(lm, max_batch=2, max_seq=32, device="meta"))}
    module = {r.name: r for r in from_module(lm)}
    assert traced == module
    roles = {r.role for r in traced.values()}
    assert {"expert_gate_up", "expert_down", "router", "shared_in", "dense_in", "attn_q", "lm_head"} <= roles
    assert all(r.name.startswith("lm.") for r in traced.values())


# ------------------------------------------------------------------ placement, bad input, CLI

def test_placements():
    assert even_placement(10, 4) == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    loads = [100, 90, 5, 5, 5, 5, 1, 1]
    bal = balanced_placement(loads, 4)
    assert sorted(e for r in bal for e in r) == list(range(8)) and all(len(r) == 2 for r in bal)
    assert max(rank_loads(bal, loads)) < max(rank_loads(even_placement(8, 4), loads))


def _args(**kw):
    base = dict(model="tiny", gpus="2", gpu_mem="1GiB", quant="none", max_seq_len=None, batch_size="1",
                kv_dtype="bf16", calibrate=False, calibration_ids=None, reserve="64MiB", prefill_chunk=None,
                no_trace=False, json=True)
    base.update(kw)
    return argparse.Namespace(**base)


@pytest.mark.parametrize("kw, words", [
    (dict(gpus="0"), "--gpus"), (dict(gpu_mem="80XB"), "--gpu-mem '80XB'"), (dict(quant="int3"), "--quant"),
    (dict(kv_dtype="fp4"), "--kv-dtype"), (dict(gpu_mem="eighty"), "--gpu-mem"), (dict(batch_size="x"), "--batch-size"),
])
def test_bad_input_one_line(kw, words):
    from l4compile.plan.cli import request_from_args

    with pytest.raises(L4Error) as e:
        request_from_args(_args(**kw))
    assert words in str(e.value) and "\n" not in str(e.value)


def test_parse_size():
    assert parse_size("80GiB") == 80 * GiB and parse_size("80GB") == 80 * 10**9 and parse_size("1.5 TiB") == 3 << 39


def test_cli_json_last_line(capsys):
    from l4compile.plan import cli

    rc = cli.run(_args())
    out = capsys.readouterr().out.strip().splitlines()
    j = json.loads(out[-1])
    assert rc == 0 and j["feasible"] and j["inventory"] == "traced graph"
    for key in ("strategy", "ranks", "max_context_tokens", "reason"):
        assert key in j
    assert all(r["memory"]["total"] <= 1 * GiB for r in j["ranks"])
    assert cli.run(_args(gpu_mem="600KiB", reserve="1KiB")) == 1
    j = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert not j["feasible"] and "would fit with" in j["reason"] and any("--gpus" in s for s in j["suggestions"])


def test_calibrate_refuses_presets():
    with pytest.raises(L4Error, match="real checkpoint"):
        make_plan(PlanRequest("maverick", gpus=8, gpu_mem=80 * GiB, calibrate=True, trace=False))


def test_calibrate_balances_measured_loads(tmp_path):
    from tests.conftest import save_checkpoint
    from l4compile.plan.calibrate import measure_loads
    from l4compile.plan.inventory import load_inventory

    ckpt = save_checkpoint(tmp_path / "ck", num_local_experts=8, router_std=0.5, num_hidden_layers=2,
                           no_rope_layers=[1, 0])
    records, cfg, _ = load_inventory(str(ckpt), trace=False)
    loads = measure_loads(str(ckpt), records, cfg, None)
    assert set(loads) == {0, 1} and all(sum(v) == 8 * 128 for v in loads.values())
    req = PlanRequest(str(ckpt), gpus=4, gpu_mem=GiB, reserve=0, calibrate=True, trace=False)
    p = make_plan(req, records, cfg, loads=loads)
    for layer, lv in loads.items():
        placed = [r["experts"][str(layer)] for r in p.best.ranks]
        assert max(rank_loads(placed, lv)) <= max(rank_loads(even_placement(8, 4), lv))
    assert p.to_json()["expert_placement"].startswith("balanced")


# ------------------------------------------------------------------ the planner proposes only what executes

@pytest.mark.parametrize("hq,hkv", [(40, 8), (4, 2), (6, 3), (8, 8), (12, 4), (5, 1)])
def test_tp_layouts_the_planner_accepts_are_the_ones_execution_runs(hq, hkv):
    """``layouts.invalid_reason`` (planner) and ``shard_tensor_parallel.check_divisible`` (execution) agree on
    every rank count, and the kv heads per rank the memory model assumes are the ones execution keeps."""
    from types import SimpleNamespace

    from l4compile.passes.shard_tensor_parallel import check_divisible, head_split
    from l4compile.plan.layouts import invalid_reason, kv_heads_local

    cfg = SimpleNamespace(num_attention_heads=hq, num_key_value_heads=hkv, intermediate_size=96,
                          intermediate_size_mlp=160, num_local_experts=64)
    for n in range(1, 41):
        for part, s in (("attention", Strategy("tp", "replicate", "replicate")),
                        ("dense_mlp", Strategy("dp", "tp", "replicate")),
                        ("shared_expert", Strategy("dp", "replicate", "tp"))):
            planner_ok = invalid_reason(s, cfg, n) is None
            try:
                check_divisible(cfg, n, (part,))
                runs = True
            except L4Error as e:
                runs = False
                assert "\n" not in str(e) and f"over {n} ranks" in str(e)
            assert planner_ok == runs, (part, n)
            if part == "attention" and runs:
                for r in range(n):
                    (q_lo, q_hi), (k_lo, k_hi) = head_split(hq, hkv, n, r)
                    assert k_hi - k_lo == kv_heads_local(s, cfg, n) and q_hi - q_lo == hq // n
                    assert all(k_lo <= h // (hq // hkv) < k_hi for h in range(q_lo, q_hi))   # GQA groups whole
