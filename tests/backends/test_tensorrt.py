"""The TensorRT backend: its ONNX graph passes the parser op check and ONNX Runtime parity on any machine; without
a CUDA GPU and tensorrt, `compile --backend tensorrt` exits 2 with one clear line and leaves no engine."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("onnx", reason="needs onnx (pip install 'l4compile[onnx]')")
pytest.importorskip("onnxruntime", reason="needs onnxruntime (pip install 'l4compile[onnx]')")
pytest.importorskip("onnxscript", reason="needs onnxscript (pip install 'l4compile[onnx]')")

import onnx  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402

from l4compile.backends import tensorrt as trt_backend  # noqa: E402
from l4compile.backends.tensorrt_onnx_ops import SUPPORTED, check_graph  # noqa: E402
from l4compile.cli import main  # noqa: E402

NO_TRT = f"error: {trt_backend.NO_TENSORRT}"
needs_trt = pytest.mark.skipif(not trt_backend.tensorrt_available(), reason=trt_backend.NO_TENSORRT)


@pytest.fixture(scope="module")
def trt_bound(checkpoints, tmp_path_factory):
    """The TensorRT-bound ONNX graph of the top-2, odd-expert, interleaved variant, and its Program."""
    from l4compile import frontend
    from l4compile.backends import onnxruntime as ort_backend
    from l4compile.config import CompileConfig
    from l4compile.pipeline import run_passes
    from l4compile.program import trace

    lm = frontend.load(str(checkpoints["maverick-top2-odd"])).model
    program = trace(lm, max_batch=2, max_seq=48)
    run_passes(program, CompileConfig(backend="tensorrt", max_seq_len=48, max_batch_size=2))
    out = tmp_path_factory.mktemp("trt-onnx")
    ort_backend.export_onnx(program, out, "float32")
    return out / ort_backend.ARTIFACT, program


def test_graph_passes_tensorrt_op_check(trt_bound):
    path, _ = trt_bound
    assert trt_backend.check_ops(path) == []
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"NonZero", "ScatterND", "TopK"} <= ops <= SUPPORTED


def test_graph_matches_eager_under_onnxruntime(trt_bound):
    path, program = trt_bound
    assert trt_backend.check_numerics(path, program, "float32") < 1e-4


def _model(*nodes, inputs=("x",), initializers=()):
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3]) for n in inputs]
    out = [helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, None)]
    return helper.make_model(helper.make_graph(list(nodes), "g", vi, out, initializer=list(initializers)))


def test_unsupported_op_is_reported_by_name(trt_bound):
    path, _ = trt_bound
    problems = check_graph(onnx.load(str(path), load_external_data=False), supported=SUPPORTED - {"NonZero"})
    assert len(problems) == 1 and problems[0].startswith("NonZero (not in TensorRT's ONNX operator list)")
    m = _model(helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Unique", ["r"], ["u"], name="uniq"),
               helper.make_node("MoE", ["u"], ["y"], domain="com.microsoft"))
    problems = check_graph(m)
    assert any(p.startswith("Unique (not in TensorRT's ONNX operator list): 1 node(s), e.g. uniq") for p in problems)
    assert any(p.startswith("com.microsoft::MoE") for p in problems) and len(problems) == 2


def test_computed_topk_k_is_reported():
    k = helper.make_tensor("k", TensorProto.INT64, [1], [1])
    ok = _model(helper.make_node("TopK", ["x", "k"], ["v", "i"], axis=1), initializers=[k])
    assert check_graph(ok) == []
    bad = _model(helper.make_node("Shape", ["x"], ["s"]),
                 helper.make_node("Slice", ["s", "k", "k2"], ["kk"]),
                 helper.make_node("TopK", ["x", "kk"], ["v", "i"], axis=1),
                 initializers=[k, helper.make_tensor("k2", TensorProto.INT64, [1], [2])])
    assert check_graph(bad) == ["TopK with a computed input 1 (TensorRT needs it constant): 1 node(s), e.g. v"]


@pytest.mark.skipif(trt_backend.tensorrt_available(), reason="TensorRT and a CUDA GPU are present here")
def test_compile_without_tensorrt_checks_then_exits_2(tmp_path, capsys, monkeypatch):
    seen = {}
    real_numerics = trt_backend.check_numerics

    def spy(path, program, dtype, quant):
        seen["ops"] = trt_backend.check_ops(path)
        seen["err"] = real_numerics(path, program, dtype, quant)
        return seen["err"]

    monkeypatch.setattr(trt_backend, "check_numerics", spy)
    out = tmp_path / "trt"
    capsys.readouterr()
    rc = main(["compile", "tiny", "--backend", "tensorrt", "--out", str(out), "--max-seq-len", "40"])
    captured = capsys.readouterr()
    assert rc == 2
    assert captured.err.strip().splitlines() == [NO_TRT]
    assert seen["ops"] == [] and seen["err"] < 1e-4           # the graph was checked before giving up
    assert not out.exists() and list(tmp_path.iterdir()) == []   # no engine, no half-written sibling


@needs_trt
def test_tensorrt_engine_matches_eager(tmp_path):  # pragma: no cover - needs TensorRT and a GPU
    from l4compile import frontend, parity

    import l4compile

    eng = l4compile.compile("tiny", backend="tensorrt", out=tmp_path / "e", device="cuda", max_seq_len=64,
                            max_batch_size=2)
    assert (eng.path / "model.plan").is_file()
    lm = frontend.load("tiny").model
    rep = parity.compare(eng, lm, parity.default_prompts(eng.vocab_size, 16, 64, 16), 16)
    assert rep.passed, rep.to_dict()
    assert torch.cuda.is_available()
