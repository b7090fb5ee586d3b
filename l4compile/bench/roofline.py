"""Roofline figures for GPU runs: bytes a decode step must read, achieved HBM bandwidth, prefill TFLOP/s.

Counts come from the model config alone (no weights needed), so the same code runs on the meta-sized
``scout``/``maverick`` configs and on CI-sized presets:

- attention per layer: q, k, v, o projections (biases when ``attention_bias``);
- MoE layers: router + shared expert + the routed experts a step touches;
- dense layers (not in ``moe_layers``): the gate/up/down MLP of width ``intermediate_size_mlp``;
- the KV cache a decode step must read (``kv_bytes``): k and v of the cached positions its query sees, at the
  mean position of the run's decode steps (all earlier positions in a global layer, those of its own chunk in a
  chunked one; on Scout Int4 0.3% of the weights at position 128 and batch 1, 24% at position 4096 and batch 8);
- the lm_head, at the engine dtype also for quantized engines (the quantize pass keeps it unquantized unless
  asked, ``--pass-option quantize.quantize_lm_head=true``: 2 GB of bf16 at Scout's vocabulary, a quarter of what
  an Int4 Scout step reads), at the quant's bytes where the engine's manifest says it was quantized. Embedding rows (a
  gather) and norm weights are left out: they are noise next to the rest.

With T tokens in one forward pass, a top-k router over E experts touches on average
``E * (1 - (1 - k/E) ** T)`` distinct experts if routing were uniform (k when T == 1, all E for long prompts);
that is the estimate used for the bytes and FLOPs of routed experts.
"""
# H hidden, I expert width, Imlp dense MLP width, E experts, K top-k, V vocab, S prompt length, B batch
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

BYTES_PER_WEIGHT = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0}
# HBM bytes a quantized weight costs, scales included: int4 is half a byte plus one bfloat16 scale per group of 128
# (l4compile.quant's int4 scheme), +3%; fp8's float32 scale per output channel is under 0.1% at K >= 5120.
QUANT_BYTES = {"none": None, "fp8": 1.0, "int4": 0.5 + 2 / 128}

# name fragment -> (HBM bytes/s, dense bf16 FLOP/s). First match wins, so put specific names first.
GPU_PEAKS: list[tuple[str, str, float, float]] = [
    ("H100 PCIe", "H100 PCIe", 2.0e12, 756e12),
    ("H100 NVL", "H100 NVL", 3.9e12, 835e12),
    ("H100", "H100 SXM", 3.35e12, 989e12),
    ("H200", "H200", 4.8e12, 989e12),
]


@dataclass(frozen=True)
class GpuPeak:
    label: str
    hbm_bytes_per_s: float
    bf16_flops: float


def gpu_peak(name: str | None) -> GpuPeak | None:
    if not name:
        return None
    for frag, label, bw, flops in GPU_PEAKS:
        if frag.lower() in name.lower():
            return GpuPeak(label, bw, flops)
    return None


def _cfg(config: Any, key: str, default: Any = None) -> Any:
    if isinstance(config, dict):
        return config.get(key, default)
    return getattr(config, key, default)


def moe_layer_ids(config: Any) -> list[int]:
    n = int(_cfg(config, "num_hidden_layers"))
    layers = _cfg(config, "moe_layers")
    if layers is None:
        step = int(_cfg(config, "interleave_moe_layer_step", 1) or 1)
        layers = [i for i in range(n) if (i + 1) % step == 0] if step > 1 else list(range(n))
    return [int(i) for i in layers]


def expected_experts(n_experts: int, top_k: int, tokens: int) -> float:
    """Expected distinct experts touched by ``tokens`` tokens under uniform top-k routing."""
    if tokens <= 0:
        return 0.0
    return n_experts * (1.0 - (1.0 - top_k / n_experts) ** tokens)


def param_counts(config: Any, tokens: int = 1) -> dict[str, float]:
    """Parameters a forward pass over ``tokens`` tokens reads, by part (routed experts: expected count)."""
    h = int(_cfg(config, "hidden_size"))
    nh, nkv, hd = (int(_cfg(config, k)) for k in ("num_attention_heads", "num_key_value_heads", "head_dim"))
    i_exp, i_mlp = int(_cfg(config, "intermediate_size")), int(_cfg(config, "intermediate_size_mlp"))
    e, k = int(_cfg(config, "num_local_experts")), int(_cfg(config, "num_experts_per_tok"))
    n, v = int(_cfg(config, "num_hidden_layers")), int(_cfg(config, "vocab_size"))
    n_moe = len(moe_layer_ids(config))
    attn = h * nh * hd + 2 * h * nkv * hd + nh * hd * h
    if _cfg(config, "attention_bias", False):
        attn += nh * hd + 2 * nkv * hd + h
    expert = 3 * h * i_exp                                 # gate, up [H, I] and down [I, H]
    return {
        "attention": float(n * attn),
        "router": float(n_moe * h * e),
        "shared_expert": float(n_moe * expert),
        "routed_experts": float(n_moe * expert * expected_experts(e, k, tokens)),
        "dense_mlp": float((n - n_moe) * 3 * h * i_mlp),
        "lm_head": float(h * v),
    }


def active_params(config: Any) -> float:
    """Parameters one decode token reads: attention + router + shared expert + top-k experts + dense + lm_head."""
    return sum(param_counts(config, tokens=1).values())


def bytes_per_weight(dtype: str, quant: str = "none") -> float:
    q = QUANT_BYTES.get(quant)
    return q if q is not None else BYTES_PER_WEIGHT[dtype]


def weight_bytes(config: Any, tokens: int, dtype: str, quant: str, lm_head_quantized: bool = False) -> float:
    """HBM bytes of the weights a forward pass over ``tokens`` tokens reads: projections and experts at the quant's
    bytes per weight, the lm_head at the dtype's unless the engine quantized it (``quantize.quantize_lm_head``)."""
    counts = param_counts(config, tokens=tokens)
    head = counts.pop("lm_head")
    head_bpw = bytes_per_weight(dtype, quant) if lm_head_quantized else BYTES_PER_WEIGHT[dtype]
    return sum(counts.values()) * bytes_per_weight(dtype, quant) + head * head_bpw


def kv_bytes(config: Any, batch: int, position: int, dtype: str) -> float:
    """HBM bytes of cached k and v one decode step at absolute ``position`` reads (its own new key aside): every
    earlier position in a global (NoPE) layer, the earlier positions of its chunk (``position mod chunk``) in a
    chunked (RoPE) layer. The minimum any implementation reads; l4compile's CUDA attention reads exactly that."""
    n = int(_cfg(config, "num_hidden_layers"))
    chunk = int(_cfg(config, "attention_chunk_size") or 0)
    nope = _cfg(config, "no_rope_layers") or [1] * n     # 1 = RoPE (chunked), 0 = NoPE (global)
    per_position = 2 * int(_cfg(config, "num_key_value_heads")) * int(_cfg(config, "head_dim")) \
        * BYTES_PER_WEIGHT[dtype]
    seen = sum(position % chunk if nope[i] and chunk else position for i in range(n))
    return float(batch * per_position * seen)


def attention_pairs(config: Any, seq: int) -> int:
    """Visible (query, key) pairs summed over layers: chunked-causal for RoPE layers, causal for NoPE ones."""
    n = int(_cfg(config, "num_hidden_layers"))
    chunk = int(_cfg(config, "attention_chunk_size") or seq)
    nope = _cfg(config, "no_rope_layers") or [1] * n     # 1 = RoPE (chunked), 0 = NoPE (full causal)
    causal = seq * (seq + 1) // 2
    full, rem = divmod(seq, chunk)
    chunked = full * chunk * (chunk + 1) // 2 + rem * (rem + 1) // 2
    return sum(chunked if nope[i] else causal for i in range(n))


def prefill_flops(config: Any, batch: int, seq: int) -> float:
    """FLOPs of one prefill: 2 per weight per token (routed experts: top-k per token) + attention (QK and PV)."""
    pc = param_counts(config, tokens=1)
    per_token = sum(pc.values())
    nh, hd = int(_cfg(config, "num_attention_heads")), int(_cfg(config, "head_dim"))
    return 2.0 * per_token * batch * seq + 4.0 * batch * nh * hd * attention_pairs(config, seq)


def roofline_figures(config: Any, *, dtype: str, quant: str, gpu_name: str | None, batch: int, prompt_len: int,
                     prefill_ms: float | None, decode_ms_per_step: float | None,
                     lm_head_quantized: bool = False, decode_position: int | None = None) -> dict[str, Any]:
    """Everything the roofline table and chart need for one (batch, prompt) point; None where unknown.
    ``decode_position``: the mean absolute position of the decode steps timed (default ``prompt_len``); the KV a
    step reads is counted there. The HBM fraction is over weights + KV."""
    bpw = bytes_per_weight(dtype, quant)
    peak = gpu_peak(gpu_name)
    position = prompt_len if decode_position is None else decode_position
    decode_weights = weight_bytes(config, batch, dtype, quant, lm_head_quantized)
    decode_kv = kv_bytes(config, batch, position, dtype)
    decode_bytes = decode_weights + decode_kv
    prefill_bytes = weight_bytes(config, batch * prompt_len, dtype, quant, lm_head_quantized)
    flops_p = prefill_flops(config, batch, prompt_len)
    flops_d = 2.0 * active_params(config) * batch
    out: dict[str, Any] = {
        "gpu_peak": peak.label if peak else None,
        "hbm_bytes_per_s_peak": peak.hbm_bytes_per_s if peak else None,
        "bf16_flops_peak": peak.bf16_flops if peak else None,
        "active_params": active_params(config), "bytes_per_weight": bpw,
        "decode_weight_bytes_per_step": decode_weights, "decode_kv_bytes_per_step": decode_kv,
        "decode_bytes_per_step": decode_bytes, "decode_position": position, "prefill_weight_bytes": prefill_bytes,
        "prefill_flops": flops_p, "decode_flops_per_step": flops_d,
        "decode_bytes_per_s": None, "decode_hbm_fraction": None, "prefill_tflops": None,
        "prefill_peak_fraction": None, "decode_intensity": flops_d / decode_bytes,
        "prefill_intensity": flops_p / prefill_bytes,
    }
    if decode_ms_per_step and decode_ms_per_step > 0:
        out["decode_bytes_per_s"] = decode_bytes / (decode_ms_per_step / 1e3)
        if peak:
            out["decode_hbm_fraction"] = out["decode_bytes_per_s"] / peak.hbm_bytes_per_s
    if prefill_ms and prefill_ms > 0:
        out["prefill_tflops"] = flops_p / (prefill_ms / 1e3) / 1e12
        if peak:
            out["prefill_peak_fraction"] = out["prefill_tflops"] * 1e12 / peak.bf16_flops
    return out
