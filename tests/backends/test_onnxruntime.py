"""ONNX Runtime engines against transformers eager (float32): logits rel < 1e-4, identical greedy tokens over 32
steps through the KV cache, on every VARIANTS checkpoint; plus the exported graph's structure."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

pytest.importorskip("onnx", reason="needs onnx (pip install 'l4compile[onnx]')")
pytest.importorskip("onnxruntime", reason="needs onnxruntime (pip install 'l4compile[onnx]')")
pytest.importorskip("onnxscript", reason="needs onnxscript (pip install 'l4compile[onnx]')")

import onnx  # noqa: E402
from transformers import Llama4ForCausalLM  # noqa: E402

import l4compile  # noqa: E402
from tests.backends.parity_checks import TOL, check_run_matches_eager, eager_greedy, rel_err  # noqa: E402
from tests.conftest import VARIANTS  # noqa: E402


@pytest.fixture(scope="session")
def ort_engines(checkpoints, tmp_path_factory) -> dict:
    """Every VARIANTS checkpoint compiled once per session (onnxruntime, float32, max sequence 112)."""
    root = tmp_path_factory.mktemp("ort-engines")
    return {name: l4compile.compile(str(ckpt), backend="onnxruntime", out=root / name, max_seq_len=112,
                                    max_batch_size=2).path
            for name, ckpt in checkpoints.items()}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_run_matches_eager(variant, checkpoints, ort_engines, tmp_path, capsys):
    """`l4compile run --logits-out` on a prompt crossing 5 chunks, then 32 greedy tokens through the cache."""
    check_run_matches_eager(ort_engines[variant], checkpoints[variant], tmp_path, capsys)


def test_engine_format_and_graph(ort_engines, checkpoints):
    """The engine holds a checked opset >= 21 model with symbolic batch/seq, KV-cache I/O and no custom ops;
    MoE is lowered per expert (NonZero + ScatterND per expert and MoE layer), never densely; the caches take the new
    rows by ScatterElements on their slot axis, in their own layout (no dense rewrite, no transpose of a cache)."""
    path = ort_engines["maverick-top2-odd"]
    eng = l4compile.load_engine(path)
    m = eng.manifest
    assert m["backend"] == "onnxruntime" and "model.onnx" in m["artifacts"]
    model = onnx.load(str(path / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version >= 21
    cfg = Llama4ForCausalLM.config_class.from_pretrained(checkpoints["maverick-top2-odd"])
    n_layers, n_moe, n_exp = cfg.num_hidden_layers, len(cfg.moe_layers), cfg.num_local_experts
    ins = [i.name for i in model.graph.input]
    outs = [o.name for o in model.graph.output]
    assert ins[:2] == ["input_ids", "start_pos"] and len(ins) == 2 + 2 * n_layers
    assert outs[0] == "logits" and len(outs) == 1 + 2 * n_layers
    ids_dims = [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert ids_dims == ["batch", "seq"]
    ops = Counter(n.op_type for n in model.graph.node)
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)      # standard ops only
    assert ops["TopK"] == n_moe and ops["NonZero"] == n_moe * n_exp
    assert ops["ScatterND"] == n_moe * n_exp
    assert ops["ScatterElements"] == 2 * n_layers                      # each layer's k and v cache rows written
    caches = set(ins[2:])
    assert not [n.op_type for n in model.graph.node if n.op_type == "Transpose" and caches & set(n.input)]
    assert not [o for o in model.graph.node if o.op_type in ("l4", "attention", "attention_cached")]
    assert m["backend_info"]["opset"] >= 21 and m["backend_info"]["external_data"] is False


def test_engine_serves_every_length_and_batch(ort_engines, checkpoints):
    from l4compile import frontend

    eng = l4compile.load_engine(ort_engines["scout-like"])
    lm = frontend.load(str(checkpoints["scout-like"])).model
    g = torch.Generator().manual_seed(2)
    for b, s in [(1, 1), (2, 1), (1, 17), (2, 33), (1, eng.max_seq_len)]:
        ids = torch.randint(0, eng.vocab_size, (b, s), generator=g)
        with torch.no_grad():
            assert rel_err(eng.prefill(ids), lm(ids).logits) < TOL, (b, s)
    ids = torch.randint(0, eng.vocab_size, (2, 9), generator=g)           # batched greedy through the cache
    with torch.no_grad():
        assert torch.equal(eng.generate(ids, max_new_tokens=12), eager_greedy(lm, ids, 12)[0])


def test_cacheless_engine_with_external_data(checkpoints, tmp_path, monkeypatch):
    """--skip-pass kv_cache gives `input_ids -> logits` (l4::attention); weights over the protobuf limit go to
    external data (the limit is lowered here so a tiny model takes that path)."""
    from l4compile import frontend
    from l4compile.backends import onnxruntime as ort_backend

    monkeypatch.setattr(ort_backend, "PROTOBUF_LIMIT", 0)
    ckpt = checkpoints["deep-top2-llama3-noqk"]
    eng = l4compile.compile(str(ckpt), backend="onnxruntime", out=tmp_path / "e", max_seq_len=40,
                            max_batch_size=2, skip_passes=("kv_cache",))
    assert eng.kv_cache is None and eng.manifest["backend_info"]["external_data"] is True
    assert set(eng.manifest["artifacts"]) >= {"model.onnx", "model.onnx.data"}
    onnx.checker.check_model(str(eng.path / "model.onnx"), full_check=True)
    assert [i.name for i in onnx.load(str(eng.path / "model.onnx"), load_external_data=False).graph.input] == \
        ["input_ids"]
    lm = frontend.load(str(ckpt)).model
    ids = torch.randint(0, eng.vocab_size, (2, 23), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert rel_err(eng.prefill(ids), lm(ids).logits) < TOL
        assert torch.equal(eng.generate(ids[:1], max_new_tokens=6), eager_greedy(lm, ids[:1], 6)[0])
    (eng.path / "model.onnx.data").write_bytes(b"tampered")             # checksums cover the external data
    with pytest.raises(l4compile.L4Error, match="checksum"):
        l4compile.load_engine(eng.path)


def test_cuda_io_binding_types_and_dlpack_outputs(monkeypatch):
    """The CUDA runner's IO binding, run against a stub session (no GPU here): every dtype an engine feeds is bound
    (bool image masks, bfloat16 caches and pixel values included), and outputs reach torch through DLPack, not a
    host copy."""
    import numpy as np
    import onnxruntime as ort

    from backends.onnxruntime import OrtRunner, ort_element_type
    from l4compile.errors import L4Error

    class NoHostCopy:                      # an ORT output that may only leave through DLPack
        def __init__(self, a):
            self.ov = ort.OrtValue.ortvalue_from_numpy(a)

        def __dlpack__(self, *, stream=None):
            return self.ov.__dlpack__(stream=stream)

        def __dlpack_device__(self):
            return self.ov.__dlpack_device__()

        def numpy(self):
            raise AssertionError("output copied through the host")

    class Binding:
        def __init__(self):
            self.inputs, self.synced = [], False

        def bind_input(self, name, device, index, elem, shape, ptr):
            self.inputs.append((name, device, elem, shape))

        def bind_output(self, name, device, index):
            pass

        def synchronize_outputs(self):
            self.synced = True

        def get_outputs(self):
            return [NoHostCopy(np.arange(6, dtype=np.float32).reshape(2, 3))]

    class Session:
        binding = Binding()

        def io_binding(self):
            return self.binding

        def run_with_iobinding(self, binding):
            pass

    synced = []

    class Stream:
        def synchronize(self):
            synced.append(Session.binding.inputs[:])     # torch's stream done before ORT runs, inputs all bound

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: Stream())
    runner = OrtRunner.__new__(OrtRunner)
    runner.session, runner.device = Session(), torch.device("cpu")   # tensors stay on the CPU; the stream is stubbed
    runner.input_names, runner.output_names = ["ids", "image_mask", "k_cache_0"], ["logits"]
    (out,) = runner._run_cuda([torch.ones(1, 4, dtype=torch.int64), torch.zeros(1, 4, dtype=torch.bool),
                               torch.zeros(1, 2, 8, 16, dtype=torch.bfloat16)])
    assert torch.equal(out, torch.arange(6.0).reshape(2, 3)) and Session.binding.synced
    assert [len(s) for s in synced] == [3]
    assert Session.binding.inputs == [("ids", "cuda", np.int64, (1, 4)), ("image_mask", "cuda", np.bool_, (1, 4)),
                                      ("k_cache_0", "cuda", onnx.TensorProto.BFLOAT16, (1, 2, 8, 16))]
    with pytest.raises(L4Error, match="cannot bind torch.complex64"):
        ort_element_type(torch.complex64)
