"""benchmarks/bench_gpu.py: the issue-10 GPU benchmark fails clearly without CUDA and builds the documented commands."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import load_benchmark

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_gpu.py"


def _module():
    return load_benchmark("bench_gpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_exits_2_with_one_error_line_without_cuda():
    p = subprocess.run([sys.executable, str(SCRIPT), "--parts", "decode"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "CUDA" in lines[0]


def test_commands_cover_the_issue(tmp_path):
    cmds = _module().bench_commands(4, 3, tmp_path, ("decode", "prefill", "full"))
    assert set(cmds) == {"decode-none", "decode-int4", "decode-none-half", "decode-int4-half", "prefill",
                         "prefill-int4", "compile-scout-int4", "full-scout-int4"}
    joined = {k: " ".join(v) for k, v in cmds.items()}
    engine = str(tmp_path / "engine-scout-int4")      # compiled streamed, then benchmarked as an engine directory
    assert "--stream-weights" in joined["compile-scout-int4"] and joined["compile-scout-int4"].endswith(engine)
    assert cmds["full-scout-int4"][:2] == ["bench", engine] and "--quant" not in joined["full-scout-int4"]
    assert "--batch-sizes 1,8,32" in joined["decode-int4"] and "--quant int4" in joined["decode-int4"]
    assert "--prompt-lens 2048,8192" in joined["prefill"] and "torch-compile" in joined["prefill"]
    assert "--prompt-lens 2048,8192" in joined["prefill-int4"] and "--quant int4" in joined["prefill-int4"]
    assert "--layers" not in joined["full-scout-int4"] and "--layers 4" in joined["decode-none"]
    assert "--layers 2" in joined["decode-int4-half"] and "--backends inductor" in joined["decode-int4-half"]
    assert all("--device cuda" in j and f"--out {tmp_path}" in j for k, j in joined.items() if k != "full-scout-int4")
    assert "--pass-option" not in joined["compile-scout-int4"]
    lm = _module().bench_commands(4, 3, tmp_path, ("full",), lm_head_int4=True)["compile-scout-int4"]
    assert " ".join(lm).endswith(f"--pass-option quantize.quantize_lm_head=true --out {engine}")


def test_tune_kernels_reaches_every_engine_compile(tmp_path):
    """--tune-kernels: every bench that compiles the inductor engine, and the full-Scout compile, tune; the bench of
    the compiled full-Scout engine does not (an engine is benchmarked as compiled)."""
    cmds = _module().bench_commands(2, 3, tmp_path, ("layer", "decode", "full"), tune_kernels=True)
    assert all(("--tune-kernels" in argv) == (name != "full-scout-int4") for name, argv in cmds.items())
    plain = _module().bench_commands(2, 3, tmp_path, ("layer", "decode", "full"))
    assert not any("--tune-kernels" in argv for argv in plain.values())


def test_layer_part_times_one_int4_layer(tmp_path):
    """The issue's first target alone: the inductor engine at N and N/2 layers (no baselines), N profiled."""
    cmds = _module().bench_commands(2, 3, tmp_path, ("layer",))
    assert list(cmds) == ["layer-int4", "layer-int4-half"]
    full, half = (" ".join(cmds[k]) for k in cmds)
    assert "--layers 2" in full and "--layers 1" in half and "--backends inductor" in full + half
    assert "--quant int4" in half and "--batch-sizes 1,8" in half
    assert "--profile" in full and "--profile" not in half
    assert "--pass-option quantize.quantize_lm_head=true" in half                    # fixed costs (and noise) down
    assert full.endswith(f"--out {tmp_path / 'layer-int4'}")
    p = subprocess.run([sys.executable, str(SCRIPT), "--parts", "layer", "--layers", "1"], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.startswith("error: the layer part") and p.stderr.count("\n") == 1


def test_context_part_decodes_in_8k_caches(tmp_path):
    cmds = _module().bench_commands(2, 3, tmp_path, ("context",))
    assert list(cmds) == ["context-int4"]
    j = " ".join(cmds["context-int4"])
    assert "--max-seq-len 8192" in j and "--prompt-lens 128,4096" in j and "--quant int4" in j
    assert "--backends inductor" in j and "--layers 2" in j and j.endswith(f"--out {tmp_path / 'context-int4'}")


def test_modes_part_runs_the_decode_modes_script(tmp_path):
    cmds = _module().bench_commands(2, 3, tmp_path, ("modes",))
    assert list(cmds) == ["modes-int4"]
    argv = cmds["modes-int4"]
    assert argv[0].endswith("bench_decode_modes.py") and Path(argv[0]).is_file()
    assert argv[argv.index("--device") + 1] == "cuda" and argv[argv.index("--out") + 1].endswith("modes-int4.json")


def test_per_layer_rows_subtract_the_half_depth_engine():
    """4 layers at 10 ms and 2 layers at 6 ms -> 2 ms per layer; 4 GiB vs 2.5 GiB read -> 0.75 GiB per layer;
    on a 1 TB/s peak: 0.75 * 2**30 B / 2 ms / 1e12 B/s = 40.3%."""
    def report(layers, ms, nbytes):
        return {"model": {"config": {"num_hidden_layers": layers}},
                "summary": [{"backend": b, "batch": 1, "prompt_len": 128, "decode_ms_per_token": {"median": t}}
                            for b, t in (("inductor", ms), ("eager", 99.0))],
                "roofline": [{"backend": "inductor", "batch": 1, "decode_bytes_per_step": nbytes,
                              "hbm_bytes_per_s_peak": 1e12}]}
    rows = _module().per_layer_rows("int4", report(4, 10.0, 4 * 2**30), report(2, 6.0, 2.5 * 2**30))
    assert rows == ["| int4 | 1 | 2000.0 | 768.0 | 40.3% |"]


def test_summary_is_rewritten_after_every_run(tmp_path, monkeypatch):
    """A session cut off mid-way keeps SUMMARY.md for the runs done: the first decode run's rows are in it after the
    second one fails. CUDA and the runs themselves are faked (the report is test_bench's fake one)."""
    from l4compile.bench import report as rep
    from tests.bench.test_bench import fake_result

    mod = _module()
    monkeypatch.setattr(mod.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(mod.torch.cuda, "get_device_name", lambda: "Fake H200")
    seen, mid = [], []

    def run(argv, cwd):
        name = Path(argv[argv.index("--out") + 1]).name
        seen.append(name)
        if name == "decode-int4":        # what a session killed here would leave
            mid.append((tmp_path / "SUMMARY.md").read_text())
        if name == "decode-none":
            rep.write_report(rep.build_report(fake_result("cuda")), tmp_path / name)
            return subprocess.CompletedProcess(argv, 0)
        return subprocess.CompletedProcess(argv, 1 if name == "decode-none-half" else 137)

    monkeypatch.setattr(mod.subprocess, "run", run)
    assert mod.main(["--parts", "decode", "--layers", "4", "--repeats", "1", "--out", str(tmp_path)]) == 1
    assert seen == ["decode-none", "decode-none-half", "decode-int4", "decode-int4-half"]
    text = (tmp_path / "SUMMARY.md").read_text()
    assert "FAILED runs: decode-none-half, decode-int4, decode-int4-half." in text
    assert sum(line.startswith("| decode-none | inductor |") for line in text.splitlines()) == 4   # 2 batches x 2
    assert "| decode-none | inductor |" in mid[0] and "FAILED runs: decode-none-half." in mid[0]


def test_layer_part_summary_has_the_per_layer_row_and_the_profile(tmp_path, monkeypatch, capsys):
    """The layer part's two runs give SUMMARY.md its per-layer row, and the 2-layer run's profile its lines (step,
    idle share, slowest kernels; a failed profile its error); the summary is printed too (a session's log keeps it).
    CUDA and the runs are faked."""
    import dataclasses

    from l4compile.bench import profile
    from l4compile.bench import report as rep
    from tests.bench.test_bench import fake_result
    from tests.bench.test_profile import _trace

    mod = _module()
    monkeypatch.setattr(mod.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(mod.torch.cuda, "get_device_name", lambda: "Fake H200")
    run_ev, run_wall = _trace(9)
    base_ev, base_wall = _trace(1)

    def run(argv, cwd):
        name = Path(argv[argv.index("--out") + 1]).name
        result = fake_result("cuda")
        result["model_config"] = dict(result["model_config"], num_hidden_layers=2 if name == "layer-int4" else 1)
        assert "--tune-kernels" in argv
        if name == "layer-int4":
            result["config"] = dataclasses.replace(result["config"], profile=True, tune_kernels=True)
            result["backends"] = [dataclasses.replace(b, kernel_blocks=[
                {"problem": "int4_mm 7168x5120 G128", "blocks": "BN64 BK128 SK4", "us": 14.25, "static_us": 31.0,
                 "count": 2, "tokens": [1]}]) if b.name == "inductor" else b for b in result["backends"]]
            result["profiles"] = [
                {"backend": "inductor", "batch": 1, "prompt_len": 16,
                 **profile.summarize(run_ev, base_ev, 9, run_wall, base_wall)},
                {"backend": "inductor", "batch": 2, "prompt_len": 16, "error": "RuntimeError: CUPTI busy"}]
        rep.write_report(rep.build_report(result), tmp_path / name)
        return subprocess.CompletedProcess(argv, 0)

    monkeypatch.setattr(mod.subprocess, "run", run)
    assert mod.main(["--parts", "layer", "--layers", "2", "--repeats", "1", "--tune-kernels",
                     "--out", str(tmp_path)]) == 0
    text = (tmp_path / "SUMMARY.md").read_text()
    assert sum(line.startswith("| int4 | ") for line in text.splitlines()) == 2               # batch 1 and 2
    assert ("- layer-int4, inductor, batch 1: step 31 us, kernels busy 29 us (idle 6%), 2 launches; "
            "`moe_int4_gate_up_kernel` 20.0 us x1; `int4_mm_kernel` 10.0 us x1") in text
    assert "- layer-int4, inductor, batch 2: profile failed (RuntimeError: CUPTI busy)" in text
    assert "- layer-int4, inductor: int4_mm 7168x5120 G128 (x2 a step): BN64 BK128 SK4 14.2 us, layout's 31.0 us" in text
    assert text in capsys.readouterr().out


def test_full_runs_as_two_halves(tmp_path, monkeypatch, capsys):
    """full-compile and full-bench are full's two commands, alone, on one --engine-dir (two calls on a lent host:
    the compile of 48 layers may take most of one); full-bench without an engine there is one error line, exit 2."""
    mod = _module()
    engine = tmp_path / "engines" / "scout"
    both = mod.bench_commands(4, 3, tmp_path, ("full",), engine_dir=engine)
    assert mod.bench_commands(4, 3, tmp_path, ("full-compile",), engine_dir=engine) == \
        {"compile-scout-int4": both["compile-scout-int4"]}
    assert mod.bench_commands(4, 3, tmp_path, ("full-bench",), engine_dir=engine) == \
        {"full-scout-int4": both["full-scout-int4"]}
    assert both["compile-scout-int4"][-1] == str(engine) and both["full-scout-int4"][1] == str(engine)
    monkeypatch.setattr(mod.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(mod.torch.cuda, "get_device_name", lambda: "Fake H200")
    monkeypatch.setattr(mod.subprocess, "run", lambda *a, **k: pytest.fail("nothing may run"))
    assert mod.main(["--parts", "full-bench", "--engine-dir", str(engine), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: full-bench needs a compiled full-Scout engine")
