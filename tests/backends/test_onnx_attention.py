"""The ONNX translation of ``l4::attention`` / ``l4::attention_cached`` (l4compile.onnx.attention) against the ops'
aten implementations, under ONNX Runtime: every layer kind (RoPE + qk-norm + chunked, RoPE alone, NoPE with and
without temperature tuning), GQA and MHA, prefill and decode from one graph with dynamic batch and length, a ring
buffer that wraps (more new tokens than slots), float32 and float16. The whole-model parity of the ORT engines
(tests/backends/test_onnxruntime.py) runs on top of this."""
from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch

pytest.importorskip("onnxruntime", reason="needs onnxruntime (pip install 'l4compile[onnx]')")
pytest.importorskip("onnxscript", reason="needs onnxscript (pip install 'l4compile[onnx]')")

import onnxruntime as ort  # noqa: E402

from l4compile.onnx import ONNX_OPSET, TRANSLATIONS  # noqa: E402
from l4compile.ops.attention import attention_cached_impl, attention_impl, plain_rope_tables  # noqa: E402

P = 64            # table positions
# (name, n_heads, n_kv_heads, head_dim, use_rope, qk_norm, chunk, temp_tuning, slots)
LAYERS = [("rope-norm-chunked-gqa", 4, 2, 8, True, True, 4, False, 4),
          ("rope-chunked-mha", 2, 2, 8, True, False, 8, False, 8),
          ("nope-temp-full-gqa", 4, 1, 8, False, False, 0, True, 24),
          ("nope-full-mha", 2, 2, 4, False, False, 0, False, 24)]


def _tables(head_dim: int):
    return plain_rope_tables(head_dim, P)


class _Op(torch.nn.Module):
    def __init__(self, layer, cached: bool):
        super().__init__()
        _, self.hq, self.hkv, self.d, self.rope, self.norm, self.chunk, self.temp, _ = layer
        cos, sin = _tables(self.d)
        self.register_buffer("cos", cos)
        self.register_buffer("sin", sin)
        self.cached = cached

    def attrs(self):
        return (self.hq, self.hkv, self.d, self.rope, self.norm, self.chunk, self.temp, 8.0, 0.1,
                1 / math.sqrt(self.d), 1e-5)

    def forward(self, q, k, v, k_cache=None, v_cache=None, start_pos=None):
        if self.cached:
            return torch.ops.l4.attention_cached(q, k, v, k_cache, v_cache, start_pos, self.cos, self.sin,
                                                 *self.attrs())
        return torch.ops.l4.attention(q, k, v, self.cos, self.sin, *self.attrs())

    def reference(self, q, k, v, *cache):
        if self.cached:
            return attention_cached_impl(q, k, v, *cache, self.cos, self.sin, *self.attrs())
        return attention_impl(q, k, v, self.cos, self.sin, *self.attrs())


def _inputs(m: _Op, b: int, t: int, slots: int, start: int, dtype, g):
    q = torch.randn(b, t, m.hq * m.d, generator=g).to(dtype)
    k = torch.randn(b, t, m.hkv * m.d, generator=g).to(dtype)
    v = torch.randn(b, t, m.hkv * m.d, generator=g).to(dtype)
    if not m.cached:
        return q, k, v
    kc = torch.randn(b, m.hkv, slots, m.d, generator=g).to(dtype)
    vc = torch.randn(b, m.hkv, slots, m.d, generator=g).to(dtype)
    return q, k, v, kc, vc, torch.tensor([start])


def _session(m: _Op, example):
    batch, seq = torch.export.Dim("batch", min=1, max=8), torch.export.Dim("seq", min=1, max=32)
    dyn = {"q": {0: batch, 1: seq}, "k": {0: batch, 1: seq}, "v": {0: batch, 1: seq}}
    if m.cached:
        dyn |= {"k_cache": {0: batch}, "v_cache": {0: batch}, "start_pos": None}
    onx = torch.onnx.export(m, example, dynamo=True, custom_translation_table=TRANSLATIONS, dynamic_shapes=dyn,
                            opset_version=ONNX_OPSET, optimize=False, verbose=False)
    ops = Counter(n.op_type for n in onx.model.graph)
    sess = ort.InferenceSession(onx.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess, ops


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


@pytest.mark.parametrize("layer", LAYERS, ids=[x[0] for x in LAYERS])
def test_cached_matches_the_aten_implementation(layer):
    """One graph serves prefill (start 0, T up to 3x the slots) and decode (T 1) at any batch and start."""
    slots = layer[-1]
    m = _Op(layer, cached=True)
    g = torch.Generator().manual_seed(0)
    sess, ops = _session(m, _inputs(m, 2, 5, slots, 3, torch.float32, g))
    assert "l4" not in str(sorted(ops)) and ops["ScatterElements"] == 2 and ops["ScatterND"] == 0
    names = [i.name for i in sess.get_inputs()]
    for b, t, start in [(1, 1, 0), (2, 1, 7), (1, 9, 0), (2, 3, 13), (3, min(3 * slots, 32), 0), (1, 1, P - 1)]:
        x = _inputs(m, b, t, slots, start, torch.float32, g)
        got = [torch.from_numpy(a) for a in sess.run(None, dict(zip(names, (a.numpy() for a in x))))]
        want = m.reference(*x)
        assert _rel(got[0], want[0]) < 1e-5, (b, t, start)
        for c_got, c_want in zip(got[1:], want[1:]):       # the caches: the same rows in the same slots
            assert torch.allclose(c_got, c_want, atol=1e-6, rtol=1e-5), (b, t, start)


@pytest.mark.parametrize("layer", LAYERS[:3:2], ids=[x[0] for x in LAYERS[:3:2]])
def test_cacheless_matches_the_aten_implementation(layer):
    m = _Op(layer, cached=False)
    g = torch.Generator().manual_seed(1)
    sess, ops = _session(m, _inputs(m, 2, 5, 0, 0, torch.float32, g))
    names = [i.name for i in sess.get_inputs()]
    for b, t in [(1, 1), (2, 7), (1, 32)]:
        x = _inputs(m, b, t, 0, 0, torch.float32, g)
        (got,) = sess.run(None, dict(zip(names, (a.numpy() for a in x))))
        assert _rel(torch.from_numpy(got), m.reference(*x)) < 1e-5, (b, t)


def test_float16_casts_only_around_the_float32_work():
    """RoPE, the qk-norm and the temperature run in float32 as the aten ops do; scores and softmax stay float16."""
    m = _Op(LAYERS[0], cached=True).half()
    m.cos, m.sin = m.cos.float(), m.sin.float()          # the tables stay float32, as lower_irope keeps them
    g = torch.Generator().manual_seed(2)
    sess, ops = _session(m, _inputs(m, 1, 4, 4, 2, torch.float16, g))
    names = [i.name for i in sess.get_inputs()]
    for b, t, start in [(1, 6, 0), (2, 1, 9)]:
        x = _inputs(m, b, t, 4, start, torch.float16, g)
        got = [torch.from_numpy(a) for a in sess.run(None, dict(zip(names, (a.numpy() for a in x))))]
        want = m.reference(*[a.float() if a.is_floating_point() else a for a in x])   # float32 reference
        assert got[0].dtype == torch.float16 and _rel(got[0], want[0]) < 5e-3, (b, t, start)
        assert _rel(got[1], want[1]) < 5e-3


def test_benchmark_script_compares_both_paths(tmp_path, capsys):
    """benchmarks/onnx_attention.py at tiny size: both paths export, run and agree; its old path takes the
    attention translations out of l4compile.onnx and puts them back; bad input exits 2."""
    import l4compile.onnx as lo
    from tests.conftest import load_benchmark

    bench = load_benchmark("onnx_attention")
    out = tmp_path / "rows.json"
    assert bench.main(["--preset", "tiny", "--layers", "1", "--prompt", "8", "--repeats", "1",
                       "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    assert row["layers"] == 1 and row["max_rel_diff"] <= 1e-5
    assert row["decomposed_nodes"] > 0 and row["translated_nodes"] > 0 and row["translated_decode_ms"] > 0
    with bench.attention_decomposed():
        assert torch.ops.l4.attention_cached.default not in lo.TRANSLATED_OPS
    assert torch.ops.l4.attention_cached.default in lo.TRANSLATED_OPS              # restored
    capsys.readouterr()
    assert bench.main(["--layers", "0"]) == 2 and "error:" in capsys.readouterr().err
