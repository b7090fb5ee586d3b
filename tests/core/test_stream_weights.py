"""--stream-weights: a compile traced on the meta device, reading each weight only when something needs its values,
builds the same graph as the in-memory compile (bit for bit), reads every weight once, and never holds two float
weights that the quantize pass replaces at the same time."""
# B batch, S sequence, V vocabulary
from __future__ import annotations

import dataclasses
import json
import weakref

import pytest
import torch

import l4compile
from l4compile import frontend
from l4compile.compiler import lower
from l4compile.config import CompileConfig
from l4compile.errors import L4Error
from l4compile.presets import PRESETS, get_preset
from l4compile.progress import Progress
from l4compile.quant import get_scheme, role_of, should_quantize
from l4compile.weights import RandomWeights, tensor_seed

CKPT = "maverick-top2-odd"       # dense and MoE layers, top-2 routing, 5 experts


class CountingSource:
    """Wraps a WeightSource: records each load and how many quantizable float weights were still alive then."""

    def __init__(self, inner, scheme):
        self.inner, self.scheme = inner, scheme
        self.loads: list[str] = []
        self.alive_quantizable: list[int] = []
        self._refs: list[weakref.ref] = []

    def __contains__(self, name):
        return name in self.inner

    def load(self, name, dtype, device):
        self._refs = [r for r in self._refs if r() is not None]
        t = self.inner.load(name, dtype, device)
        self.loads.append(name)
        if self.scheme is not None and should_quantize(role_of(name), self.scheme):
            self.alive_quantizable.append(len(self._refs))
            self._refs.append(weakref.ref(t))
        return t


def lowered(model, quant, stream, monkeypatch=None, **over):
    cfg = CompileConfig(quant=quant, stream_weights=stream, max_seq_len=64, max_batch_size=2, **over)
    counter = {}
    if monkeypatch is not None:
        real_load = frontend.load

        def counting_load(*a, **kw):
            loaded = real_load(*a, **kw)
            if loaded.weights is not None:
                counter["src"] = loaded.weights = CountingSource(loaded.weights,
                                                                 None if quant == "none" else get_scheme(quant))
            return loaded
        monkeypatch.setattr(frontend, "load", counting_load)
    low = lower(str(model), cfg, progress=Progress(enabled=False))
    if monkeypatch is not None:
        monkeypatch.setattr(frontend, "load", real_load)
    return low, counter.get("src")


def graph_tensors(gm) -> dict[str, torch.Tensor]:
    return dict(gm.state_dict())


LM_HEAD_INT4 = (("quantize", (("quantize_lm_head", True),)),)


@pytest.mark.parametrize("quant,options", [("none", ()), ("int4", ()), ("int4", LM_HEAD_INT4)],
                         ids=["none", "int4", "int4-lm-head"])       # fp8 takes the same path (quantize per expert)
def test_streamed_graph_equals_in_memory(checkpoints, monkeypatch, quant, options):
    mem, _ = lowered(checkpoints[CKPT], quant, stream=False, pass_options=options)
    st, src = lowered(checkpoints[CKPT], quant, stream=True, monkeypatch=monkeypatch, pass_options=options)
    names = graph_tensors(st.program.gm)                     # the lm_head streamed as Int4 where asked, else as is
    assert ("l4q_lm_head_weight_w" in names, "lm.lm_head.weight" in names) == ((True, False) if options else
                                                                              (False, True)), sorted(names)
    a, b = graph_tensors(mem.program.gm), graph_tensors(st.program.gm)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].device == b[k].device == torch.device("cpu") and torch.equal(a[k], b[k]), k
    with torch.no_grad():
        assert torch.equal(mem.program.run_example(), st.program.run_example())
    assert len(src.loads) == len(set(src.loads)), "a weight was read twice"
    if quant != "none":
        assert src.alive_quantizable and max(src.alive_quantizable) == 0, src.alive_quantizable
        assert not any(should_quantize(role_of(n), get_scheme(quant)) for n in src.loads[-3:])  # place: the rest
    placed = sum(t.numel() * t.element_size() for k, t in b.items() if k.startswith("lm."))
    assert st.placed_bytes == placed > 0
    assert st.loaded.model is None and st.program.weights is None


def test_full_size_preset_draws_the_same_weights_in_memory_and_streamed(monkeypatch):
    """Full-size presets (scout, maverick) take RandomWeights in both modes; a tiny stand-in keeps this fast."""
    monkeypatch.setitem(PRESETS, "tiny-full", dataclasses.replace(get_preset("tiny"), name="tiny-full",
                                                                 full_size=True))
    mem, _ = lowered("tiny-full", "int4", stream=False)
    st, _ = lowered("tiny-full", "int4", stream=True)
    with torch.no_grad():
        assert torch.equal(mem.program.run_example(), st.program.run_example())
    lm = frontend.load("tiny-full").model
    gu = lm.model.layers[0].feed_forward.experts.gate_up_proj
    assert abs(float(gu.std()) - 0.25) < 0.02                 # the preset's expert_init_std
    assert torch.equal(lm.model.norm.weight, torch.ones_like(lm.model.norm.weight))


def test_random_weights_are_seeded_per_tensor():
    shapes = {"model.layers.0.self_attn.q_proj.weight": (256, 128),
              "model.layers.0.feed_forward.experts.down_proj": (4, 64, 128), "model.norm.weight": (128,)}
    rw = RandomWeights(shapes, seed=3, std=0.02, expert_std=0.5)
    q = rw.load("model.layers.0.self_attn.q_proj.weight", torch.float32, "cpu")
    assert torch.equal(q, rw.load("model.layers.0.self_attn.q_proj.weight", torch.float32, "cpu"))
    assert not torch.equal(q, RandomWeights(shapes, 4, 0.02).load("model.layers.0.self_attn.q_proj.weight",
                                                                   torch.float32, "cpu"))
    assert abs(float(q.std()) - 0.02) < 0.002
    assert abs(float(rw.load("model.layers.0.feed_forward.experts.down_proj", torch.float32, "cpu").std()) - 0.5) < 0.05
    assert torch.equal(rw.load("model.norm.weight", torch.bfloat16, "cpu"), torch.ones(128, dtype=torch.bfloat16))
    assert tensor_seed(3, "a") != tensor_seed(3, "b") and tensor_seed(3, "a") != tensor_seed(4, "a")


def test_in_memory_build_that_cannot_fit_is_refused_before_allocating(checkpoints, monkeypatch):
    monkeypatch.setattr(frontend, "available_bytes", lambda device: 1024)
    with pytest.raises(L4Error, match="add --stream-weights"):
        frontend.load(str(checkpoints[CKPT]))
    assert frontend.load(str(checkpoints[CKPT]), stream=True).model.lm_head.weight.is_meta   # streaming: no check


def test_streamed_engine_end_to_end(checkpoints, tmp_path):
    """The CLI path: ORT Int4 engine compiled with --stream-weights vs the in-memory graph on the same prompt."""
    ref, _ = lowered(checkpoints[CKPT], "int4", stream=False)
    eng = l4compile.compile(str(checkpoints[CKPT]), backend="onnxruntime", out=tmp_path / "e", quant="int4",
                            max_seq_len=64, max_batch_size=2, stream_weights=True)
    m = json.loads((tmp_path / "e" / "manifest.json").read_text())
    assert m["compile_config"]["stream_weights"] is True and m["streamed_weight_bytes"] > 0
    ids = ref.program.example_inputs[0]                                          # [B, S]
    with torch.no_grad():
        want = ref.program.run_example()                                         # [B, S, V]
    got = eng.prefill(ids)
    assert float((got - want).abs().max() / want.abs().max()) < 1e-5


def test_compile_drops_its_graph_before_the_engine_loads(monkeypatch, tmp_path):
    """Two copies of full Scout Int4 (the compile's graph and the loaded engine) would not fit one GPU."""
    from l4compile import backends, compiler
    from l4compile.backends import BuildResult

    refs = []
    real_lower = compiler.lower

    def spying_lower(*a, **kw):
        low = real_lower(*a, **kw)
        refs.append(weakref.ref(low.program.gm))
        return low

    class WritesOneFile:
        @staticmethod
        def build(program, workdir, config):
            (workdir / "engine.bin").write_bytes(b"x")
            return BuildResult(["engine.bin"], {})

    def load_engine(path, defer_shards):
        assert refs and refs[0]() is None, "the compile's graph is still alive when the engine loads"
        return "loaded"

    monkeypatch.setattr(compiler, "lower", spying_lower)
    monkeypatch.setattr(backends, "get_backend", lambda name: WritesOneFile)
    monkeypatch.setattr(compiler, "load_engine", load_engine)
    assert l4compile.compile("tiny", out=tmp_path / "e", quant="int4", stream_weights=True) == "loaded"
