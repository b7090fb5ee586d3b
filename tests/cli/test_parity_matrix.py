"""`l4compile parity MODEL --backends ...`: the backend x quant x dtype matrix, run for every backend this machine
has; absent ones are reported as skipped with the reason, and any failing backend makes the command exit 1."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from l4compile import parity
from l4compile.cli import main
from tests.conftest import QUICK_INDUCTOR

HAS_ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime", "onnxscript"))


def test_matrix_every_available_backend(tmp_path, capsys):
    from l4compile.backends.tensorrt import NO_TENSORRT, tensorrt_available

    report = tmp_path / "matrix.json"
    capsys.readouterr()
    rc = main(["parity", "tiny", "--backends", "inductor,onnxruntime,tensorrt", "--quant", "none",
               "--max-seq-len", "40", "--max-batch-size", "1", "--steps", "8", "--json", str(report),
               *(f"--inductor-config={k}={v}" for k, v in QUICK_INDUCTOR.items())])   # the inductor cell only
    out = capsys.readouterr().out
    assert rc == 0, out
    d = json.loads(report.read_text())
    cells = {(r["backend"], r["quant"]): r for r in d["rows"]}
    assert d["status"] == "pass" and len(cells) == 3
    want = {"inductor": True, "onnxruntime": HAS_ONNX, "tensorrt": tensorrt_available()}
    for backend, present in want.items():
        row = cells[(backend, "none")]
        if present:
            assert row["status"] == "pass" and row["max_rel_error"] < 1e-4 and row["token_agreement"] == 1.0, row
            assert len(row["prompts"]) == 3
        else:
            assert row["status"] == "skipped" and row["reason"], row
        if present:                 # every backend lowers the quantized ops
            assert parity.unavailable(backend, "int4", "float32", "cpu") is None
    if HAS_ONNX and not want["tensorrt"]:
        # without TensorRT the cell still exported, op-checked and ran its graph under ONNX Runtime
        reason = cells[("tensorrt", "none")]["reason"]
        assert reason.startswith(NO_TENSORRT) and "op check pass" in reason and "ONNX Runtime numerics" in reason
    header, *lines = out.strip().splitlines()
    assert header.split()[:3] == ["backend", "quant", "dtype"] and len(lines) == 3


def test_any_failing_backend_exits_1(monkeypatch, tmp_path, capsys):
    rep = parity.ParityReport("onnxruntime", "float32", "none", 1e-4,
                              [parity.PromptResult(5, 3e-3, 2, 8)])
    rows = [parity.MatrixRow("inductor", "none", "float32", "skipped", "why not"), parity.from_report(rep)]
    monkeypatch.setattr(parity, "run_matrix", lambda *a, **k: rows)
    capsys.readouterr()
    assert main(["parity", "tiny", "--backends", "inductor,onnxruntime", "--json", str(tmp_path / "m.json")]) == 1
    out = capsys.readouterr().out
    assert "fail (max rel err 0.003 >= 0.0001)" in out and "skipped (why not)" in out
    assert json.loads((tmp_path / "m.json").read_text())["status"] == "fail"


@pytest.mark.parametrize("argv, needle", [
    (["--backends", "inductor,bogus"], "unknown value 'bogus'"),
    (["--backend", "inductor", "--backends", "inductor"], "not both"),
    (["--quant", "int3"], "unknown value 'int3'"),
    (["--backends", "onnxruntime", "--inductor-config", "cpp.simdlen=0"], "applies to the inductor backend"),
    (["--inductor-config", "cpp.simdlen=abc"], "cpp.simdlen must be an integer or null"),
    (["--pass-option", "kv_cache.bogus=1"], "no option 'bogus'; its options: ring_buffers"),
    (["--pass-option", "shard_experts.world_size=2"], "'shard_experts' is skipped or does not run"),
])
def test_bad_matrix_options_exit_2(argv, needle, monkeypatch, capsys):
    import l4compile

    monkeypatch.setattr(l4compile, "compile", lambda *a, **k: pytest.fail("compiled before refusing"))
    assert main(["parity", "tiny", *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1, err


def test_quant_cells_are_judged_by_logit_sqnr():
    """Quantized engines pass on logit SQNR against the unquantized model (fp8 >= 25 dB, int4 >= 18 dB)."""
    rep = parity.ParityReport("inductor", "float32", "int4", 1e-4,
                              [parity.PromptResult(5, 0.3, 2, 8, 19.0), parity.PromptResult(9, 0.2, 8, 8, 24.0)])
    assert rep.passed and rep.min_sqnr_db == 19.0
    rep.prompts.append(parity.PromptResult(3, 0.1, 8, 8, 17.5))
    row = parity.from_report(rep)
    assert row.status == "fail" and "17.5 dB < 18 dB" in row.reason
    ref = torch.randn(100)
    assert abs(parity.sqnr_db(ref + 0.1 * ref, ref) - 20.0) < 1e-4


def test_each_engine_is_compared_with_a_reference_on_its_own_device(monkeypatch):
    """A TensorRT cell runs on the GPU whatever --device says; its eager reference is loaded there too (full-size
    presets draw random weights on the loading device, and CUDA's draws differ from the CPU's). Wiring only: the
    compiles, loads and comparisons are stubbed."""
    import types

    import l4compile
    from l4compile import frontend

    loads, compiled = [], []

    def load(model, *, dtype, device, seed, layers):
        loads.append(device)
        return types.SimpleNamespace(model=types.SimpleNamespace(device=device,
                                                                 config=types.SimpleNamespace(attention_chunk_size=8)))

    def compile_(model, *, backend, device, **kw):
        compiled.append((backend, device))
        return types.SimpleNamespace(device=device, vocab_size=64, max_seq_len=32)

    def compare(eng, lm, prompts, steps):
        assert lm.device == eng.device
        return parity.ParityReport("x", "float32", "none", 1e-4, [parity.PromptResult(5, 0.0, 2, 2)])

    monkeypatch.setattr(parity, "_tensorrt_ready", lambda: True)
    monkeypatch.setattr(parity, "unavailable", lambda *a: None)
    monkeypatch.setattr(frontend, "load", load)
    monkeypatch.setattr(l4compile, "compile", compile_)
    monkeypatch.setattr(parity, "compare", compare)
    rows = parity.run_matrix("scout", ["inductor", "tensorrt", "onnxruntime"], ["none", "int4"], ["float32"],
                             device="cpu", layers=1, steps=2)
    assert [r.status for r in rows] == ["pass"] * 6
    assert compiled == [("inductor", "cpu")] * 2 + [("tensorrt", "cuda")] * 2 + [("onnxruntime", "cpu")] * 2
    assert loads == ["cpu", "cuda"]                  # one reference per device, each loaded once


def test_build_options_reach_every_cell(monkeypatch):
    """--pass-option goes to every engine, --inductor-config to the inductor ones only (wiring; compiles stubbed)."""
    import types

    import l4compile
    from l4compile import frontend

    seen = []
    lm = types.SimpleNamespace(config=types.SimpleNamespace(attention_chunk_size=8))
    monkeypatch.setattr(parity, "unavailable", lambda *a: None)
    monkeypatch.setattr(frontend, "load", lambda *a, **k: types.SimpleNamespace(model=lm))
    monkeypatch.setattr(l4compile, "compile", lambda model, **kw: seen.append(kw) or
                        types.SimpleNamespace(vocab_size=64, max_seq_len=32))
    monkeypatch.setattr(parity, "compare", lambda *a: parity.ParityReport("x", "float32", "none", 1e-4,
                                                                           [parity.PromptResult(5, 0.0, 2, 2)]))
    assert main(["parity", "tiny", "--backends", "inductor,onnxruntime", "--quant", "none,int4", "--steps", "2",
                 "--pass-option", "kv_cache.ring_buffers=false", "--pass-option", "quantize.group_size=64",
                 "--inductor-config", "max_autotune=true", "--inductor-config", "cpu_gpu_bw=2"]) == 0
    assert [(kw["backend"], kw["quant"]) for kw in seen] == [("inductor", "none"), ("inductor", "int4"),
                                                             ("onnxruntime", "none"), ("onnxruntime", "int4")]
    for kw in seen:
        assert kw["pass_options"] == {"kv_cache": {"ring_buffers": False}, "quantize": {"group_size": 64}}
        want = {"cpu_gpu_bw": 2.0, "max_autotune": True} if kw["backend"] == "inductor" else None
        assert kw["inductor_configs"] == want, kw
