"""lower_vision_rope: the vision tower's complex 2D RoPE becomes real arithmetic, exactly."""
from __future__ import annotations

import pytest
import torch

from l4compile.config import CompileConfig
from l4compile.errors import L4Error
from l4compile.pipeline import run_passes, select_passes

aten = torch.ops.aten


@pytest.fixture(scope="module")
def vision_parts():
    from l4compile import frontend

    return frontend.load("tiny-vision", vision=True).vision


def _trace(parts):
    from l4compile.vision.program import trace_vision

    return trace_vision(parts.module.vision_model, parts.module.multi_modal_projector, max_tiles=5)


def _complex_ops(gm) -> int:
    return sum(n.target in (aten.view_as_complex.default, aten.view_as_real.default) for n in gm.graph.nodes)


def test_vision_pipeline_selects_vision_passes_only():
    names = [s.name for s in select_passes(kind="vision")]
    assert names == ["lower_vision_rope", "eliminate_dead_code"]
    assert "lower_vision_rope" not in [s.name for s in select_passes(kind="text")]


def test_lowering_is_exact_and_leaves_no_complex(vision_parts):
    prog = _trace(vision_parts)
    assert _complex_ops(prog.gm) == 4 * 2          # q and k, view_as_complex + view_as_real, 2 layers
    px = torch.randn(3, 3, 336, 336, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = vision_parts.module(px)
        records = run_passes(prog, CompileConfig())
        out = prog.gm(px)
    stats = records[0].stats
    assert records[0].name == "lower_vision_rope" and stats == {"matches": 4, "layers": 2, "tables": 1}
    assert _complex_ops(prog.gm) == 0
    assert not any(b.is_complex() for b in prog.gm.buffers())
    vals = [n.meta.get("val") for n in prog.gm.graph.nodes]
    assert not any(isinstance(v, torch.Tensor) and v.is_complex() for v in vals)
    assert out.shape == (3, 144, 64)
    assert float((out - ref).abs().max() / ref.abs().max()) < 1e-6
    cos = prog.gm.l4_vision_rope_cos
    assert cos.dtype == torch.float32 and cos.shape == (1, 577, 1, 8)
    assert torch.all(cos[0, -1] == 1) and torch.all(prog.gm.l4_vision_rope_sin[0, -1] == 0)   # CLS: no rotation


def test_unexpected_complex_pattern_is_named(vision_parts):
    prog = _trace(vision_parts)
    vr = next(n for n in prog.gm.graph.nodes if n.target == aten.view_as_real.default)
    vr.meta["nn_module_stack"] = {}
    with pytest.raises(L4Error, match="unexpected complex pattern"):
        run_passes(prog, CompileConfig())


def test_image_tokens_from_tokenizer_config_or_layout(tmp_path):
    import json

    from transformers import Llama4Config

    from l4compile import frontend
    from l4compile.presets import get_preset

    cfg = Llama4Config(**{k: v for k, v in get_preset("tiny-vision").multimodal_config().items() if k != "model_type"})
    toks = frontend.image_tokens(None, cfg, 512)
    assert toks.to_dict() == {"image_start": 480, "image_end": 481, "tile_x_separator": 484, "tile_y_separator": 485,
                              "image": 490, "patch": 492}
    texts = {"<|image_start|>": 480, "<|image_end|>": 481, "<|tile_x_separator|>": 500, "<|tile_y_separator|>": 501,
             "<|image|>": 502, "<|patch|>": 492}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"added_tokens_decoder": {str(i): {"content": t, "special": True} for t, i in texts.items()}}))
    assert frontend.image_tokens(tmp_path, cfg, 512).tile_x_separator == 500
    odd = Llama4Config(**{**{k: v for k, v in get_preset("tiny-vision").multimodal_config().items()
                             if k != "model_type"}, "image_token_index": 470})
    with pytest.raises(L4Error, match="cannot find the ids"):
        frontend.image_tokens(None, odd, 512)
    with pytest.raises(L4Error, match="outside the vocabulary"):
        frontend.image_tokens(None, cfg, 400)
