"""``tune_process``: kernel tuning in a child process that a faulting candidate cannot take the compile down with.
The child runs the kernels under the CPU interpreter here; ``tune_fault.py`` injects the faults a GPU can give (a
crash, a hang, a sticky CUDA error, a problem that cannot be set up)."""
# N out features, K in features, G group
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from l4compile.errors import L4Error
from l4compile.kernels import autotune, tuned_blocks
from l4compile.kernels.tune_process import tune_isolated
from l4compile.kernels.tuned_blocks import int4_key

from .conftest import require_interpreter

KEY = int4_key(48, 256, 128, torch.bfloat16)
OTHER = int4_key(32, 256, 128, torch.bfloat16)
FAULT = [sys.executable, str(Path(__file__).with_name("tune_fault.py"))]


def test_each_fault_excludes_its_candidate_and_the_rest_is_measured(tmp_path):
    """One problem meets a crash, a hang and a sticky error at three candidates, another dies being set up: four
    children run, the three candidates carry why they were left out, the other three are measured and checked, the
    second problem keeps layout's blocks, and the cache holds what the children measured."""
    require_interpreter()
    faults = [["crash", "int4_mm 48x256 G128", "BN32 BK128 SK2"], ["hang", "int4_mm 48x256 G128", "BN32 BK128 SK4"],
              ["lost", "int4_mm 48x256 G128", "BN16 BK128"], ["setup", "int4_mm 32x256 G128", None]]
    lines = []
    cache = tmp_path / "tuning.json"
    res = tune_isolated([autotune.Problem(KEY, count=2), autotune.Problem(OTHER)], "cpu", torch.float32,
                        cache=cache, log=lines.append, stall_s=4, command=[*FAULT, json.dumps(faults)])
    rec, other = res["problems"]
    errors = {c["label"]: c["error"] for c in rec["candidates"]}
    assert errors["BN32 BK128 SK2"] == "killed the tuning process (SIGSEGV)"
    assert errors["BN32 BK128 SK4"] == "made no progress for 4 s (the tuning process was killed)"
    assert errors["BN16 BK128"] == ("left the GPU unusable (RuntimeError: CUDA error: an illegal memory access was "
                                    "encountered)")
    measured = [c for c in rec["candidates"] if c["error"] is None]
    assert [c["label"] for c in measured] == ["BN32 BK128", "BN32 BK128 SK8", "BN32 BK128 SK4 NW8"]
    assert all(c["us"] > 0 and c["rel_err"] < autotune.INTERPRETER_TOLERANCE for c in measured)
    assert rec["label"] in {c["label"] for c in measured} and rec["count"] == 2
    assert other["blocks"] is None and other["error"] == "killed the tuning process (SIGKILL)"
    assert tuned_blocks.table_of(res).keys() == {KEY}
    assert [(r["label"], r["reason"].split(" (")[0]) for r in res["restarts"]] == [
        ("BN32 BK128 SK2", "killed the tuning process"), ("BN32 BK128 SK4", "made no progress for 4 s"),
        ("BN16 BK128", "left the GPU unusable"), (None, "killed the tuning process")]
    assert any("BN32 BK128 SK2 killed the tuning process" in line for line in lines)
    assert ("tune kernels: int4_mm 32x256 G128 could not be set up (killed the tuning process (SIGKILL)); layout's "
            "blocks stay") in lines
    assert autotune.summary(other) == ("int4_mm 32x256 G128: not measured (killed the tuning process (SIGKILL)); "
                                       "layout's blocks stay")
    # the faulted candidates stay out next time: answered from the cache, no process started
    again = tune_isolated([autotune.Problem(KEY)], "cpu", torch.float32, cache=cache, command=["false"])
    assert again["problems"][0]["cached"] and again["problems"][0]["candidates"] == rec["candidates"]


def test_the_default_child_measures_every_candidate():
    """``python -m l4compile.kernels.tune_process``, as ``compile --tune-kernels`` starts it: one child, every
    candidate checked and timed."""
    require_interpreter()
    res = tune_isolated([autotune.Problem(KEY)], "cpu", torch.float32, cache=False)
    (rec,) = res["problems"]
    assert res["isolated"] and res["restarts"] == [] and not rec["cached"]
    assert [c["label"] for c in rec["candidates"]] == [tuned_blocks.choice_label(c)
                                                       for c in autotune.int4_candidates(KEY, torch.float32)]
    assert all(c["error"] is None and c["us"] > 0 for c in rec["candidates"])
    # a RoPE layer's qkv crosses to the child with its rope form (tiny's: 4 + 2 + 2 heads of 16)
    qkv = autotune.Problem(int4_key(128, 256, 128, torch.bfloat16), count=4, rope=(16, 64, 32, True), rope_count=3)
    (rec,) = tune_isolated([qkv], "cpu", torch.float32, cache=False)["problems"]
    assert rec["rope"] == [16, 64, 32, True] and rec["rope_count"] == 3
    assert all(c["error"] is None for c in rec["candidates"])


def test_a_child_that_never_reaches_a_problem_hands_the_tuning_back(tmp_path):
    """A first child that dies or hangs before its first problem (a GPU in exclusive-process mode refuses it a
    context): this process tunes instead, and says so; a child that ends well having measured nothing is an error."""
    require_interpreter()
    for command, why in (([sys.executable, "-c", "import sys; print('ImportError: no triton'); sys.exit(1)"],
                          "ended the tuning process with status 1 (ImportError: no triton)"),
                         ([sys.executable, "-c", "import time; time.sleep(60)"],
                          "made no progress for 1.5 s (the tuning process was killed)")):
        lines = []
        res = tune_isolated([autotune.Problem(KEY)], "cpu", torch.float32, cache=False, log=lines.append,
                            startup_s=1.5, command=command)
        assert not res["isolated"] and res["restarts"] == [] and res["problems"][0]["blocks"] is not None
        assert lines[0] == f"tune kernels: the tuning process did not start ({why}); tuning in this process"
    with pytest.raises(L4Error, match=r"ended without measuring int4_mm 48x256 G128$"):
        tune_isolated([autotune.Problem(KEY)], "cpu", torch.float32, cache=False, command=[sys.executable, "-c", ""])


def test_the_child_ends_with_the_compile(tmp_path):
    """A compile killed while its tuning process runs (gpu_session's timeout signals the compile's process group,
    which the child has left) takes the child with it: none is left holding the GPU."""
    require_interpreter()
    pidfile = tmp_path / "child.pid"
    faults = [["hang", "int4_mm 48x256 G128", "BN32 BK128"]]
    script = tmp_path / "compile.py"
    script.write_text(
        "import torch\n"
        "from l4compile.kernels.autotune import Problem\n"
        "from l4compile.kernels.tune_process import tune_isolated\n"
        "from l4compile.kernels.tuned_blocks import int4_key\n"
        f"tune_isolated([Problem(int4_key(48, 256, 128, torch.bfloat16))], 'cpu', torch.float32, cache=False, "
        f"command={[*FAULT, json.dumps(faults)]!r})\n")
    compile_ = subprocess.Popen([sys.executable, str(script)], env={**os.environ, "L4COMPILE_TEST_PIDFILE": str(pidfile)})
    try:
        deadline = time.monotonic() + 120
        while not pidfile.exists() or not pidfile.read_text():
            assert compile_.poll() is None and time.monotonic() < deadline, "the tuning process never started"
            time.sleep(0.2)
        child = int(pidfile.read_text())
        time.sleep(1.0)
        assert _running(child)
    finally:
        compile_.kill()
        compile_.wait()
    deadline = time.monotonic() + 10
    while _running(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _running(child)


def _running(pid: int) -> bool:
    """``pid`` exists and is not a zombie (an orphan's exit is reaped by whatever adopted it, maybe never)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.gpu
def test_tuned_cuda_engine_matches_cpu_engine(tmp_path, monkeypatch):
    """compile --tune-kernels on the GPU, end to end: the child process measures every Int4 problem of a tiny Int4
    engine (nothing cached), the manifest keeps the records, and the engine built with the chosen blocks gives the
    CPU engine's logits."""
    from .conftest import rel_err, require_cuda_kernels

    require_cuda_kernels()
    import l4compile
    from l4compile.engine import read_manifest

    monkeypatch.setenv("L4COMPILE_CACHE_DIR", str(tmp_path / "cache"))
    ids = torch.tensor([[1, 5, 9, 2, 7, 3]])
    logits = {}
    for dev in ("cpu", "cuda"):
        eng = l4compile.compile("tiny", backend="inductor", out=tmp_path / dev, quant="int4", device=dev,
                                max_seq_len=32, max_batch_size=1, tune_kernels=dev == "cuda")
        logits[dev] = eng.prefill(ids.to(dev)).float().cpu()
    record = read_manifest(tmp_path / "cuda")["kernel_blocks"]
    assert record["restarts"] == [] and len(record["problems"]) == 3
    assert all(not r["cached"] and r["label"] and sum(c["us"] is not None for c in r["candidates"]) >= 2
               for r in record["problems"])
    assert rel_err(logits["cuda"], logits["cpu"]) < 1e-3
