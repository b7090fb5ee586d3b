"""Shared helpers for pass tests: tiny random Llama 4 models (no download) and their traced Programs."""
from __future__ import annotations

import pytest

from l4compile.program import trace
from tests.conftest import make_model

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, intermediate_size_mlp=256,
            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            attention_chunk_size=8, floor_scale=4, attn_scale=0.1, max_position_embeddings=256)

# name -> overrides of TINY; every case crosses chunk boundaries and has a NoPE layer (layer 3)
CASES = {
    "scout": dict(num_local_experts=16, num_experts_per_tok=1, use_qk_norm=True, interleave_moe_layer_step=1),
    "maverick": dict(num_local_experts=8, num_experts_per_tok=1, use_qk_norm=False, interleave_moe_layer_step=2),
    "odd5": dict(num_local_experts=5, num_experts_per_tok=1, use_qk_norm=True, interleave_moe_layer_step=1),
    "top2": dict(num_local_experts=8, num_experts_per_tok=2, use_qk_norm=True, interleave_moe_layer_step=1),
}


def tiny_llama4(seed: int = 0, expert_std: float = 0.5, **overrides):
    """A random float32 Llama4ForCausalLM; expert and router weights get a larger std so routing matters."""
    return make_model(seed=seed, expert_std=expert_std, router_std=expert_std, **{**TINY, **overrides})


_CACHE: dict = {}


@pytest.fixture
def traced():
    """case name -> (model, Program); traced once per session (passes must run on a deepcopy of gm)."""
    def get(case: str):
        if case not in _CACHE:
            lm = tiny_llama4(**CASES[case])
            _CACHE[case] = (lm, trace(lm, max_batch=4, max_seq=64))
        return _CACHE[case]
    return get
