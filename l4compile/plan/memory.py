"""Per-rank memory model: weights by dtype, KV cache (ring buffers for chunked layers), activations, reserve.

# H hidden, V vocab, I expert width, K top-k, P prefill chunk, B batch, L context, N ranks
Model (all per rank, bytes):
* weights: each tensor's local slice (``layouts.local_matrices``) at its storage dtype. ``none`` = bf16
  (2 B); ``fp8`` = 1 B + one fp32 scale per output channel; ``int4`` = 0.5 B + one bf16 scale per group of
  128 inputs (symmetric, no zero points). Excluded from quantization by named predicates: the router, norms,
  embeddings and rotary buffers always; the lm_head unless the scheme says ``quantize_lm_head``.
* KV cache: ``passes/kv_cache.cache_layout`` (chunked layers keep a ring of ``attention_chunk_size`` slots,
  NoPE layers the whole context), scaled to the kv heads this rank holds and to ``--kv-dtype`` (fp8 = 1 B),
  times the sequences this rank holds.
* activations: the peak of one prefill step of ``P`` tokens per sequence (chunked prefill):
  ``tokens * a * (ACT_HIDDEN_COPIES*H + local attention width + 3*local FFN width)`` plus fp32 logits of
  the last position only (the serving step gathers last positions before the lm_head), times
  ``ACT_SAFETY`` for framework temporaries.
* reserve: ``max(2 GiB, 5% of the GPU)`` for the CUDA context, cuBLAS/NCCL workspaces and allocator
  fragmentation (``--reserve`` overrides).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from l4compile.errors import L4Error

GiB = 1 << 30
ACT_HIDDEN_COPIES = 6        # residual, norm out, attention out, o_proj partial, FFN partial, comm buffer
ACT_SAFETY = 2.0             # framework temporaries (casts, SwiGLU products, allocator rounding)
EXPERT_CAPACITY = 2.0        # an EP rank may receive up to 2x its fair share of routed tokens in one step
RESERVE_MIN = 2 * GiB
RESERVE_FRACTION = 0.05
GROUP_SIZE = 128
KV_BYTES = {"bf16": 1.0 * 2, "fp8": 1.0}


@dataclass(frozen=True)
class QuantScheme:
    """A weight storage scheme. Exclusions are the named predicates in ``quantized``, never name tests."""

    name: str
    weight_bytes: float | None      # None: keep the model dtype
    scale_bytes: int = 0
    group: int | None = None        # None: one scale per output channel
    quantize_lm_head: bool = False

    def quantized(self, role: str) -> bool:
        if self.weight_bytes is None or role in _NEVER_QUANTIZED:
            return False
        return role != "lm_head" or self.quantize_lm_head


_NEVER_QUANTIZED = frozenset({"embedding", "router", "norm", "buffer", "other"})
QUANT_SCHEMES = {
    "none": QuantScheme("none", None),
    "fp8": QuantScheme("fp8", 1.0, scale_bytes=4),
    "int4": QuantScheme("int4", 0.5, scale_bytes=2, group=GROUP_SIZE),
}


def get_scheme(name: str) -> QuantScheme:
    try:
        return QUANT_SCHEMES[name]
    except KeyError:
        raise L4Error(f"unknown --quant '{name}'; use one of: {', '.join(QUANT_SCHEMES)}") from None


_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_size(text: str, option: str = "--gpu-mem") -> int:
    """'80GiB', '80GB', '141 GiB', '1.5TiB' -> bytes (GB = 1e9, GiB = 2**30)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]+)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise L4Error(f"{option} '{text}' is not a size; write a number and a unit, e.g. 80GiB or 80GB "
                      f"(units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")
    v = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if v < 1:
        raise L4Error(f"{option} must be positive, got '{text}'")
    return int(v)


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size or unit == "KiB":
            return f"{n / size:.1f} {unit}"


def fmt_tokens(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 10**6 else f"{n / 1e3:.0f}K" if n >= 10**4 else str(n)


def default_reserve(gpu_mem: int) -> int:
    return max(RESERVE_MIN, int(RESERVE_FRACTION * gpu_mem))


def matrix_bytes(count: int, out: int, inp: int, elem_bytes: int, quantized: bool,
                 scheme: QuantScheme) -> dict[str, int]:
    """Bytes of ``count`` [out, in] matrices, by storage label (bf16 / fp8 / int4 / scales / fp32)."""
    n = count * out * inp
    if not quantized:
        return {{2: "bf16", 4: "fp32", 1: "int8"}.get(elem_bytes, f"{elem_bytes}B"): n * elem_bytes}
    w = {scheme.name: int(math.ceil(n * scheme.weight_bytes))}
    groups = math.ceil(inp / scheme.group) if scheme.group else 1
    w["scales"] = count * out * groups * scheme.scale_bytes
    return w


def kv_bytes(cfg, context: int, kv_heads_local: int, kv_dtype: str, sequences: int) -> int:
    """KV cache bytes on one rank: ``sequences`` sequences of ``context`` tokens (ring buffers on)."""
    if sequences <= 0 or context <= 0:
        return 0
    from l4compile.passes.kv_cache import cache_layout

    lay = cache_layout(cfg, context, torch.bfloat16, ring_buffers=True)
    per_seq = lay["bytes_per_sequence_at_max"] * (KV_BYTES[kv_dtype] / 2) * kv_heads_local / cfg.num_key_value_heads
    return int(per_seq * sequences)


def kv_bytes_per_token(cfg, kv_heads_local: int, kv_dtype: str, ring_buffers: bool = True) -> float:
    """Bytes each further token of context adds on one rank (beyond one attention chunk)."""
    from l4compile.passes.kv_cache import cache_layout

    lay = cache_layout(cfg, 1, torch.bfloat16, ring_buffers=True)
    per = lay["bytes_per_token"] if ring_buffers else lay["bytes_per_token_without_rings"]
    return per * (KV_BYTES[kv_dtype] / 2) * kv_heads_local / cfg.num_key_value_heads
