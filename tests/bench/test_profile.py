"""``l4compile bench --profile``: one decode step's kernels, from a profiled generate of N tokens against one of 1
token. The arithmetic on synthetic device traces; the profiler plumbing on this CPU machine's own trace; the CLI
refuses it without a GPU; a report carrying profiles validates and renders."""
from __future__ import annotations

import pytest
import torch

from l4compile.bench import profile
from l4compile.bench.runner import BenchConfig
from l4compile.errors import L4Error


def _trace(steps: int, gap: float = 2.0) -> tuple[list, float]:
    """A prefill (one 50 us kernel) then ``steps - 1`` decode steps of gemv 10 us + moe 20 us, overlapping by 1 us,
    each step followed by ``gap`` us of idle GPU. Returns (events, wall us)."""
    ev, t = [("prefill_kernel", 0.0, 50.0)], 50.0
    for _ in range(steps - 1):
        ev += [("int4_mm_kernel", t, t + 10.0), ("moe_int4_gate_up_kernel", t + 9.0, t + 29.0)]
        t += 29.0 + gap
    return ev, t


def test_a_decode_step_is_the_difference_of_two_runs():
    run, run_wall = _trace(9)
    base, base_wall = _trace(1)
    s = profile.summarize(run, base, 9, run_wall, base_wall)
    assert s["steps"] == 8 and s["launches_per_step"] == 2
    assert [(k["name"], k["launches_per_step"], k["us_per_step"]) for k in s["kernels"]] == [
        ("moe_int4_gate_up_kernel", 1, 20.0), ("int4_mm_kernel", 1, 10.0)]          # slowest first; no prefill
    assert s["busy_us"] == 29.0 and s["step_us"] == 31.0                            # the overlap counts once
    assert s["idle_fraction"] == round(1 - 29 / 31, 4)
    assert [k["share"] for k in s["kernels"]] == [round(20 / 29, 4), round(10 / 29, 4)]
    with pytest.raises(ValueError, match="one decode step"):
        profile.summarize(run, base, 1, run_wall, base_wall)


def test_busy_time_is_the_union_of_intervals():
    assert profile.busy_us([("a", 0, 10), ("b", 5, 7), ("c", 8, 12), ("d", 20, 21)]) == 13
    assert profile.busy_us([]) == 0
    assert profile.per_kernel([("a", 0, 1), ("a", 2, 5), ("b", 0, 1)]) == {"a": (2, 4.0), "b": (1, 1.0)}


def test_profiler_plumbing_on_this_machine():
    """decode_profile's own calls (torch.profiler, its events' names, device types and time ranges), on the CPU
    trace of a toy 'generate': one matmul a new token."""
    from torch.autograd import DeviceType

    w = torch.randn(64, 64)

    def generate(ids, n):
        x = ids.float()
        for _ in range(n):
            x = x @ w
        return x

    ids = torch.randn(1, 64)
    events, wall = profile._profiled(lambda: generate(ids, 5), "cpu")
    assert events == [] and wall > 0                                   # no device trace on a CPU run
    with pytest.raises(RuntimeError, match="recorded no cpu kernels"):  # an empty trace is an error, not a table
        profile.decode_profile(generate, ids, 5, "cpu")
    from torch.profiler import ProfilerActivity, profile as torch_profile
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        generate(ids, 5)
    cpu = profile.device_events(prof, DeviceType.CPU)
    mm = [e for e in cpu if e[0] == "aten::mm"]
    assert len(mm) == 5 and all(end >= start for _, start, end in mm)


def test_profile_needs_a_gpu():
    with pytest.raises(L4Error, match="--profile.*--device cuda"):
        BenchConfig(model="tiny", backends=("inductor",), profile=True)
    plain = BenchConfig(model="tiny", backends=("inductor",))
    assert "profile" not in plain.to_dict()                            # runs without it hash as before


def test_report_carries_profiles():
    from l4compile.bench import report as rep

    run, run_wall = _trace(5)
    base, base_wall = _trace(1)
    prof = {"backend": "inductor", "batch": 1, "prompt_len": 128, **profile.summarize(run, base, 5, run_wall, base_wall)}
    failed = {"backend": "inductor", "batch": 8, "prompt_len": 128, "error": "RuntimeError: CUPTI unavailable"}
    r = _report(profiles=[prof, failed])
    assert rep.validate(r) == []
    md = rep.render_md(r)
    assert "moe_int4_gate_up_kernel" in md and "CUPTI unavailable" in md
    r["profile"][0]["kernels"][0]["launches_per_step"] = "two"
    assert rep.validate(r)


def _report(profiles):
    """A CUDA report as build_report makes it, from test_bench's fake run, with ``profiles``."""
    import dataclasses

    from l4compile.bench import report as rep
    from tests.bench.test_bench import fake_result

    result = fake_result("cuda")
    result["config"] = dataclasses.replace(result["config"], profile=True)
    return rep.build_report(dict(result, profiles=profiles))


def test_runner_profiles_each_engine_and_batch_and_keeps_errors(monkeypatch):
    """``_profiles``: engines only (baselines are not profiled), every batch size at the first prompt length; a
    profile that raises leaves its error in the report, not a failed run."""
    from l4compile.bench import runner

    calls = []

    def fake(generate, ids, steps, device):
        calls.append((ids.shape[0], steps, device))
        if ids.shape[0] == 8:
            raise RuntimeError("CUPTI_ERROR_NOT_INITIALIZED")
        return {"steps": steps - 1, "kernels": []}

    monkeypatch.setattr(profile, "decode_profile", fake)
    cfg = BenchConfig(model="tiny", backends=("eager", "inductor"), device="cuda", batch_sizes=(1, 8),
                      prompt_lens=(128, 512), decode_steps=16, profile=True)
    runs = [runner.Runner("eager", "baseline", None, None, "hf"), runner.Runner("inductor", "engine", None, None, "x")]
    inputs = {(b, s): torch.zeros(b, s, dtype=torch.long) for b in (1, 8) for s in (128, 512)}
    out = runner._profiles(cfg, runs, inputs, runner.ProgressBar(0, enabled=False))
    assert calls == [(1, 16, "cuda"), (8, 16, "cuda")]
    assert out == [{"backend": "inductor", "batch": 1, "prompt_len": 128, "steps": 15, "kernels": []},
                   {"backend": "inductor", "batch": 8, "prompt_len": 128,
                    "error": "RuntimeError: CUPTI_ERROR_NOT_INITIALIZED"}]


def test_cli_refuses_profile_on_cpu(capsys, tmp_path):
    from l4compile.cli import main

    assert main(["bench", "tiny", "--backends", "inductor", "--profile", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --profile") and "--device cuda" in err and err.count("\n") == 1
    assert not (tmp_path / "b").exists()
