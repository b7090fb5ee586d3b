"""lower_irope: no complex op remains, attention ops counted by kind, numerics equal to transformers eager."""
from __future__ import annotations


import pytest
import torch

from l4compile.config import CompileConfig
from l4compile.errors import L4Error
from l4compile.passes import PassContext
from l4compile.passes.lower_irope import COMPLEX_OPS, lower_irope
from l4compile.program import trace
from tests.conftest import LLAMA3, make_model

CASES = {
    "qk-norm+llama3": dict(rope_parameters=LLAMA3),
    "no-qk-norm+default-rope": dict(use_qk_norm=False, rope_parameters={"rope_type": "default", "rope_theta": 1e4}),
    "8-layers-chunk4-floor2": dict(num_hidden_layers=8, attention_chunk_size=4, floor_scale=2, rope_parameters=LLAMA3),
}


def count(gm, target) -> int:
    return sum(1 for n in gm.graph.nodes if n.target == target)


def lowered(case: str):
    lm = make_model(**CASES[case])
    prog = trace(lm, max_batch=2, max_seq=96)
    ctx = PassContext(model_config=lm.config, compile_config=CompileConfig(), metadata=prog.metadata)
    return lm, prog, ctx


@pytest.mark.parametrize("case", list(CASES))
def test_lower_irope_structure_and_numerics(case):
    lm, prog, ctx = lowered(case)
    cfg = lm.config
    n_rope = sum(cfg.no_rope_layers)
    assert count(prog.gm, torch.ops.aten.view_as_complex.default) == 2 * n_rope   # q and k per RoPE layer
    assert count(prog.gm, torch.ops.aten.scaled_dot_product_attention.default) == cfg.num_hidden_layers

    res = lower_irope(prog.gm, ctx)
    gm = res.gm
    assert not [n for n in gm.graph.nodes if n.target in COMPLEX_OPS]
    assert not [n for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].is_complex()]
    attn = [n for n in gm.graph.nodes if n.target == torch.ops.l4.attention.default]
    chunked = [n for n in attn if n.args[10] > 0]           # chunk attribute: 0 means full causal (NoPE)
    n_chunked = cfg.layer_types.count("chunked_attention")
    assert len(attn) == cfg.num_hidden_layers and len(chunked) == n_chunked
    assert res.stats == {"matches": cfg.num_hidden_layers, "chunked": n_chunked, "global": cfg.num_hidden_layers - n_chunked}
    assert count(gm, torch.ops.aten.scaled_dot_product_attention.default) == 0

    g = torch.Generator().manual_seed(0)
    for b, s in [(1, 1), (2, 5 * cfg.attention_chunk_size + 1), (1, 96)]:
        ids = torch.randint(0, cfg.vocab_size, (b, s), generator=g)
        with torch.no_grad():
            ref, got = lm(ids).logits, gm(ids)
        assert float((got - ref).abs().max() / ref.abs().max()) < 1e-4, (b, s)


def test_mangled_attention_raises_naming_the_layer():
    lm, prog, ctx = lowered("qk-norm+llama3")
    gm = prog.gm
    v2 = next(n for n in gm.graph.nodes if n.op == "get_attr" and n.target == "lm.model.layers.2.self_attn.v_proj.weight")
    other = next(n for n in gm.graph.nodes if n.op == "get_attr" and n.target == "lm.model.layers.1.self_attn.v_proj.weight")
    v2.replace_all_uses_with(other)   # layer 2's v projection now reads layer 1's weight
    with pytest.raises(L4Error, match="layer 2 .*projections \\['v'\\]"):
        lower_irope(gm, ctx)


def test_rope_tables_equal_transformers_rotary():
    from l4compile.ops.attention import rope_tables

    lm = make_model(rope_parameters=LLAMA3)
    cos, sin = rope_tables(lm.config, 64)
    pos = torch.arange(64)[None]
    freqs = lm.model.rotary_emb(torch.zeros(1), pos)[0]        # complex [64, D/2]
    # torch.polar and torch.cos/sin may differ in the last bit
    torch.testing.assert_close(cos, freqs.real, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, freqs.imag, rtol=0, atol=1e-6)
