"""Presets: Llama 4 shapes with random, seeded weights (nothing is ever downloaded).

``tiny`` is CI-sized but has every feature (NoPE layer, chunk < max sequence, qk-norm, llama3 scaling, MoE);
``scout`` / ``maverick`` carry the published dimensions and are meant for the meta device (tracing, planning)
or, with ``--layers N``, for full-width benchmarks on big machines. ``tiny-trained`` is the exception: a packaged
checkpoint (``l4compile/data/tiny-trained``, made by ``benchmarks/train_tiny.py``) with weights trained on English,
loaded through the normal checkpoint path, for checks that need a model that has learned something (quantization).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from l4compile.errors import L4Error

_LLAMA3_SCOUT_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 16.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 1.0, "original_max_position_embeddings": 8192}


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    config: dict[str, Any] = field(default_factory=dict)   # Llama4TextConfig kwargs
    expert_init_std: float | None = None                    # re-draw expert weights so routing matters
    full_size: bool = False                                 # build on the meta device unless asked otherwise
    checkpoint: str | None = None                           # packaged checkpoint (l4compile/data/<name>): trained
    vision: dict[str, Any] | None = None                    # multimodal: {"vision_config": {...}, token ids}

    def checkpoint_dir(self) -> Path | None:
        """The packaged checkpoint directory (config.json + model.safetensors), for presets with trained weights."""
        if self.checkpoint is None:
            return None
        import importlib.resources

        return Path(str(importlib.resources.files("l4compile") / "data" / self.checkpoint))

    def text_config_kwargs(self, layers: int | None = None) -> dict[str, Any]:
        if self.checkpoint is not None:
            if layers is not None:
                raise L4Error(f"--layers does not apply to preset '{self.name}' (trained weights, fixed layers)")
            cfg = json.loads((self.checkpoint_dir() / "config.json").read_text())
            return {k: v for k, v in cfg.items() if k not in ("model_type", "transformers_version", "architectures")}
        kw = dict(self.config)
        if layers is not None:
            kw["num_hidden_layers"] = layers
        n = kw["num_hidden_layers"]
        step = kw.get("interleave_moe_layer_step", 1)
        kw["moe_layers"] = [i for i in range(n) if (i + 1) % step == 0] if step > 1 else list(range(n))
        return kw


    def multimodal_config(self, layers: int | None = None) -> dict[str, Any]:
        """A ``llama4`` config dict (text + vision + image token ids) for multimodal presets."""
        if self.vision is None:
            raise L4Error(f"preset '{self.name}' has no vision tower")
        return dict(self.vision, model_type="llama4", text_config=self.text_config_kwargs(layers))


def _tiny(**over) -> dict[str, Any]:
    base = dict(vocab_size=512, hidden_size=64, intermediate_size=128, intermediate_size_mlp=256,
                num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=1,
                attention_chunk_size=16, max_position_embeddings=512, floor_scale=16, attn_scale=0.1,
                use_qk_norm=True, rope_parameters=dict(_LLAMA3_SCOUT_ROPE, original_max_position_embeddings=64),
                initializer_range=0.05, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    base.update(over)
    return base


def _full(**over) -> dict[str, Any]:
    base = dict(vocab_size=202048, hidden_size=5120, intermediate_size=8192, intermediate_size_mlp=16384,
                num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8, head_dim=128,
                num_local_experts=16, num_experts_per_tok=1, interleave_moe_layer_step=1,
                attention_chunk_size=8192, max_position_embeddings=10485760, floor_scale=8192, attn_scale=0.1,
                use_qk_norm=True, rope_parameters=dict(_LLAMA3_SCOUT_ROPE), bos_token_id=200000,
                eos_token_id=[200001, 200007, 200008], pad_token_id=200018)
    base.update(over)
    return base


def _bench(**over) -> dict[str, Any]:
    base = dict(vocab_size=4096, hidden_size=512, intermediate_size=1024, intermediate_size_mlp=2048,
                num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                num_local_experts=16, num_experts_per_tok=1, interleave_moe_layer_step=1,
                attention_chunk_size=256, max_position_embeddings=4096, floor_scale=256, attn_scale=0.1,
                use_qk_norm=True, rope_parameters=dict(_LLAMA3_SCOUT_ROPE, original_max_position_embeddings=1024),
                initializer_range=0.02, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    base.update(over)
    return base


# Image-token ids follow Llama 4's layout (boi + 0, 1, 4, 5, 10, 12) inside the tiny 512-token vocabulary.
_TINY_VISION = {
    "vision_config": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                          vision_output_dim=64, projector_input_dim=64, projector_output_dim=64, image_size=336,
                          patch_size=14, pixel_shuffle_ratio=0.5, rope_parameters={"rope_theta": 10000.0}),
    "boi_token_index": 480, "eoi_token_index": 481, "image_token_index": 492,
}


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("tiny", "CI-sized Scout-style model: 4 layers (layer 3 NoPE), chunk 16, qk-norm, llama3 RoPE, "
                   "4 experts top-1", _tiny(), expert_init_std=0.25),
    Preset("tiny-maverick", "CI-sized Maverick-style model: dense/MoE interleave 2, no qk-norm, plain RoPE, "
                            "8 experts", _tiny(num_local_experts=8, interleave_moe_layer_step=2, use_qk_norm=False,
                                               rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
           expert_init_std=0.25),
    Preset("scout", "Llama 4 Scout 17B-16E dimensions (48 layers, 16 experts), random weights",
           _full(), full_size=True),
    Preset("maverick", "Llama 4 Maverick 17B-128E dimensions (48 layers, 128 experts, interleave 2, no qk-norm)",
           _full(num_local_experts=128, interleave_moe_layer_step=2, use_qk_norm=False,
                 max_position_embeddings=1048576, rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
           full_size=True),
    Preset("bench-scout", "benchmark size, Scout proportions: hidden 512, 16 experts of width 1024, 4 layers",
           _bench(), expert_init_std=0.05),
    Preset("bench-maverick", "benchmark size, Maverick proportions: hidden 256, 128 experts, interleave 2",
           _bench(hidden_size=256, intermediate_size=512, intermediate_size_mlp=1024, num_attention_heads=4,
                  num_local_experts=128, interleave_moe_layer_step=2, use_qk_norm=False,
                  rope_parameters={"rope_type": "default", "rope_theta": 500000.0}), expert_init_std=0.05),
    Preset("tiny-vision", "CI-sized multimodal model: the tiny text model plus a 2-layer vision tower on 336-pixel "
                          "tiles (patch 14, 144 image tokens per tile)",
           _tiny(), expert_init_std=0.25, vision=_TINY_VISION),
    Preset("tiny-trained", "tiny byte-level model TRAINED on English (stdlib pydoc topics): 4 layers (layer 3 NoPE), "
                           "hidden 128, 8 experts top-1, chunk 32; benchmarks/train_tiny.py",
           checkpoint="tiny-trained"),
)}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise L4Error(f"unknown preset '{name}'; presets: {', '.join(PRESETS)} (or give a checkpoint directory)") \
            from None
