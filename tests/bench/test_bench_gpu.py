"""benchmarks/bench_gpu.py: the issue-10 GPU benchmark fails clearly without CUDA and builds the documented commands."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_gpu.py"


def _module():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_exits_2_with_one_error_line_without_cuda():
    p = subprocess.run([sys.executable, str(SCRIPT), "--parts", "decode"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "CUDA" in lines[0]


def test_commands_cover_the_issue(tmp_path):
    cmds = _module().bench_commands(4, 3, tmp_path, ("decode", "prefill", "full"))
    assert set(cmds) == {"decode-none", "decode-int4", "prefill", "compile-scout-int4", "full-scout-int4"}
    joined = {k: " ".join(v) for k, v in cmds.items()}
    engine = str(tmp_path / "engine-scout-int4")      # compiled streamed, then benchmarked as an engine directory
    assert "--stream-weights" in joined["compile-scout-int4"] and joined["compile-scout-int4"].endswith(engine)
    assert cmds["full-scout-int4"][:2] == ["bench", engine] and "--quant" not in joined["full-scout-int4"]
    assert "--batch-sizes 1,8,32" in joined["decode-int4"] and "--quant int4" in joined["decode-int4"]
    assert "--prompt-lens 2048,8192" in joined["prefill"] and "torch-compile" in joined["prefill"]
    assert "--layers" not in joined["full-scout-int4"] and "--layers 4" in joined["decode-none"]
    assert all("--device cuda" in j and f"--out {tmp_path}" in j for k, j in joined.items() if k != "full-scout-int4")
