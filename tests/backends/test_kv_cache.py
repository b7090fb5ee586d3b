"""Decode through the KV cache (ring buffers on chunked layers) against transformers full recompute."""
from __future__ import annotations

import pytest
import torch
from transformers import Llama4ForCausalLM

import l4compile
from l4compile.errors import L4Error
from tests.backends.parity_checks import TOL, eager_greedy, rel_err
from tests.conftest import VARIANTS

NEW = 64

@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cached_decode_matches_full_recompute_every_step(variant, checkpoints, engines):
    """64 new tokens after a 21-token prompt cross several chunk boundaries (chunk 4 or 8); every step's
    logits match and so do the greedy tokens. Temperature tuning is visible (floor_scale 2 or 4)."""
    ref_model = Llama4ForCausalLM.from_pretrained(checkpoints[variant]).eval()
    eng = l4compile.load_engine(engines[variant])
    layout = eng.kv_cache
    chunk = ref_model.config.attention_chunk_size
    assert (21 + NEW) // chunk >= 4
    assert {x["slots"] for x in layout["layers"] if x["kind"] == "chunked"} == {chunk}
    assert {x["slots"] for x in layout["layers"] if x["kind"] == "global"} == {eng.max_seq_len}

    prompt = torch.randint(0, ref_model.config.vocab_size, (2, 21), generator=torch.Generator().manual_seed(5))
    seq, ref_steps = eager_greedy(ref_model, prompt, NEW)
    assert torch.equal(eng.generate(prompt, max_new_tokens=NEW), seq)

    logits, caches = eng.prefill_with_cache(prompt)
    assert rel_err(logits[:, -1], ref_steps[0]) < TOL
    for i in range(1, NEW):
        pos = prompt.shape[1] + i - 1
        logits, caches = eng.decode(seq[:, pos:pos + 1], pos, caches)
        assert rel_err(logits[:, -1], ref_steps[i]) < TOL, f"step {i} (position {pos})"

def test_temperature_tuning_is_visible(checkpoints):
    """Guard for the test above: the checkpoints' NoPE temperature actually changes the logits."""
    from l4compile import frontend

    lm = frontend.load(str(checkpoints["deep-top2-llama3-noqk"])).model
    ids = torch.randint(0, lm.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        on = lm(ids).logits
        for layer in lm.model.layers:
            layer.self_attn.attn_temperature_tuning = False
        off = lm(ids).logits
    assert rel_err(on, off) > 1e-3

def test_manifest_records_cache_bytes(engines):
    eng = l4compile.load_engine(engines["scout-like"])
    layout = eng.kv_cache
    per_slot = 2 * 2 * 16 * 4   # k and v x 2 kv heads x head_dim 16 x float32
    assert layout["bytes_per_token"] == per_slot * 1               # one NoPE layer of four grows with context
    assert layout["bytes_per_token_without_rings"] == per_slot * 4
    assert layout["ring_bytes"] == per_slot * 3 * 8

def test_inductor_engine_updates_caches_in_place(engines):
    """The package writes a step's new rows into the caches it is given (backends/inductor) and the runner returns
    those tensors: a decode at position p changes slot p mod L of every layer and nothing else."""
    eng = l4compile.load_engine(engines["scout-like"])
    assert eng.manifest["backend_info"]["caches"] == "in_place"
    logits, caches = eng.prefill_with_cache(torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]]))
    before = [c.clone() for c in caches]
    logits, after = eng.decode(torch.tensor([[16]]), 11, caches)
    assert all(a is c for a, c in zip(after, caches, strict=True))
    for c, b, layer in zip(after, before, [x for x in eng.kv_cache["layers"] for _ in (0, 1)]):
        changed = (c != b).any(-1).any(1)[0]                              # [slots]
        assert changed.nonzero().flatten().tolist() == [11 % layer["slots"]], layer

def test_caches_in_place_hands_each_attention_its_own_caches():
    """``backends.inductor.caches_in_place`` with an in-place attention (what --device cuda engines compile): every
    l4::attention_cached of the tiny step graph becomes one call that writes its own caches, with no copy_ back; a
    layer whose cache is also read elsewhere keeps the functional attention and its two copy_s."""
    from backends.inductor import caches_in_place
    from l4compile.compiler import lower
    from l4compile.config import CompileConfig
    from l4compile.progress import Progress

    def attend_in_place(*args):                    # a stand-in: the rewrite only places calls
        raise AssertionError("not run")

    gm = lower("tiny", CompileConfig(max_seq_len=40), progress=Progress()).program.gm
    n_layers = sum(n.target is torch.ops.l4.attention_cached.default for n in gm.graph.nodes)
    targets = lambda g: [n.target for n in g.graph.nodes if n.op == "call_function"]    # noqa: E731
    plain = targets(caches_in_place(gm))
    assert plain.count(torch.ops.l4.attention_cached.default) == n_layers == 4
    assert plain.count(torch.ops.aten.copy_.default) == 2 * n_layers and attend_in_place not in plain
    fused = caches_in_place(gm, attend_in_place)
    calls = [n for n in fused.graph.nodes if n.target is attend_in_place]
    phs = [n.name for n in fused.graph.nodes if n.op == "placeholder"]
    assert [[a.name for a in c.args[3:5]] for c in calls] == [phs[-2 * n_layers:][2 * i:2 * i + 2]
                                                              for i in range(n_layers)]
    assert torch.ops.aten.copy_.default not in targets(fused)
    assert torch.ops.l4.attention_cached.default not in targets(fused)

    k0 = next(n for n in gm.graph.nodes if n.name == "k_cache_0")          # a second reader of layer 0's k cache
    with gm.graph.inserting_after(k0):
        gm.graph.call_function(torch.ops.aten.sum.default, (k0,))
    mixed = targets(caches_in_place(gm, attend_in_place))
    assert mixed.count(attend_in_place) == n_layers - 1 and mixed.count(torch.ops.l4.attention_cached.default) == 1
    assert mixed.count(torch.ops.aten.copy_.default) == 2


def test_mutations_in_place_refuses_an_unknown_mutating_op():
    """``mutations_in_place`` reinplaces without safety checks, so it takes only the op it was made for: a program
    calling another mutating custom op is refused in one line, and left as it was."""
    from backends.inductor import mutations_in_place

    @torch.library.custom_op("l4test::bump_", mutates_args=("x",))
    def bump_(x: torch.Tensor) -> None:
        x.add_(1)

    class M(torch.nn.Module):
        def forward(self, x):
            bump_(x)
            return x * 2

    ep = torch.export.export(M(), (torch.zeros(3),)).run_decompositions({})         # functional, as engines export
    before = ep.graph_module.code
    with pytest.raises(L4Error, match=r"^inductor: the step calls mutating ops .*\['l4test.bump_.default'\]$"):
        mutations_in_place(ep)
    assert ep.graph_module.code == before


def test_decode_rejects_positions_past_max(engines):
    eng = l4compile.load_engine(engines["scout-like"])
    with pytest.raises(L4Error, match="max sequence length"):
        eng.decode(torch.tensor([[1]]), eng.max_seq_len, eng.new_caches(1))

def test_decode_rejects_caches_of_another_layout(engines):
    """A cache the engine did not lay out is refused before the step (Inductor steps write into it in place), and
    the caches given are left as they were."""
    eng = l4compile.load_engine(engines["scout-like"])
    _, caches = eng.prefill_with_cache(torch.tensor([[5, 6, 7]]))
    kept = [c.clone() for c in caches]
    bad = {
        "a list of": caches[:-1],
        "k_cache_0 is": [caches[0][:, :, :-1], *caches[1:]],                                  # one slot short
        "v_cache_0 is": [caches[0], caches[1].double(), *caches[2:]],
    }
    for match, cs in bad.items():
        with pytest.raises(L4Error, match=match):
            eng.decode(torch.tensor([[8]]), 3, cs)
    with pytest.raises(L4Error, match=r"k_cache_0 is \[1, .*\(batch 2"):                       # caches of batch 1
        eng.decode(torch.tensor([[8], [8]]), 3, caches)
    with pytest.raises(L4Error, match="must be a tensor"):
        eng.decode(torch.tensor([[8]]), 3, [None] * len(caches))
    assert all(torch.equal(c, k) for c, k in zip(caches, kept, strict=True))


def test_cuda_engine_takes_the_caches_it_makes(engines, monkeypatch):
    """A CUDA engine's manifest says "cuda" and its caches are on cuda:0; those are the same device. Checked with
    fake CUDA tensors, so it runs without a GPU; a CPU cache is still refused."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    eng = l4compile.load_engine(engines["scout-like"])
    cuda = l4compile.engine.Engine(eng.path, dict(eng.manifest, device="cuda"), runner=None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    with FakeTensorMode(allow_non_fake_inputs=True):
        caches = [torch.zeros(shape, dtype=dtype, device="cuda") for shape, dtype in cuda.cache_specs(1)]
        assert caches[0].device == torch.device("cuda", 0)
        cuda.check_caches(caches, 1)
        with pytest.raises(L4Error, match=r"k_cache_0 is .* on cpu; this engine takes .* on cuda:0"):
            cuda.check_caches([torch.zeros(caches[0].shape, dtype=caches[0].dtype, device="cpu"), *caches[1:]], 1)


def test_scout_and_maverick_cache_sizes():
    """LLAMA4.md: Scout bf16 KV is 192 KiB per token with full caches, 48 KiB with ring buffers."""

    from l4compile import frontend
    from l4compile.passes.kv_cache import cache_layout as layout_of

    for name in ("scout", "maverick"):
        cfg = frontend.load(name, meta=True, dtype="bfloat16").model.config
        lay = layout_of(cfg, 1 << 20, torch.bfloat16)
        assert lay["bytes_per_token_without_rings"] == 192 * 1024
        assert lay["bytes_per_token"] == 48 * 1024
