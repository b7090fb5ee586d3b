"""The ``tiny-trained`` preset: a packaged checkpoint that loads through the normal checkpoint path and has
learned English (greedy text is mostly letters and spaces)."""
from __future__ import annotations

import torch

from l4compile import frontend
from l4compile.presets import get_preset
from l4compile.program import CausalLMHarness


def test_preset_is_a_packaged_checkpoint():
    p = get_preset("tiny-trained")
    d = p.checkpoint_dir()
    assert (d / "config.json").is_file() and (d / "model.safetensors").is_file() and (d / "TRAINING.md").is_file()
    assert (d / "model.safetensors").stat().st_size < 16 * 2**20
    kw = p.text_config_kwargs()
    assert kw["num_hidden_layers"] == 4 and kw["num_local_experts"] >= 8 and kw["use_qk_norm"]


def test_loads_through_checkpoint_path_and_generates_text():
    loaded = frontend.load("tiny-trained")
    assert loaded.source["kind"] == "checkpoint" and loaded.source["preset"] == "tiny-trained"
    lm = loaded.model
    cfg = lm.config
    assert cfg.attention_chunk_size < 128 and cfg.no_rope_layers[3] == 0
    harness = CausalLMHarness(lm)
    ids = torch.tensor([list(b"The ")])
    with torch.no_grad():
        for _ in range(60):
            nxt = harness(ids)[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    new = ids[0, 4:].tolist()
    assert all(t < 256 for t in new)
    text = bytes(new).decode("latin-1")
    ok = sum(c.isalpha() or c in " .,'\n" for c in text)
    assert ok / len(text) >= 0.85, text
    words = [w for w in text.split() if w.isalpha()]
    assert len(words) >= 5, text
