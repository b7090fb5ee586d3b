"""The typed compile configuration: one frozen tree that rejects unknown keys and hashes stably."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from l4compile.errors import L4Error

BACKENDS = ("inductor", "onnxruntime", "tensorrt")
# How Engine.generate runs its decode steps (``Engine.decode_mode``): "loop" calls the engine once per step with fresh
# tensors; "static" runs the same step on static buffers (``l4compile.decode_graph``); "graph" replays those static
# steps as a captured CUDA graph (CUDA engines; the default for Inductor ones).
DECODE_MODES = ("loop", "static", "graph")
QUANTS = ("none", "fp8", "int4")
DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("cpu", "cuda")


def require_device(device: str) -> None:
    """L4Error unless this machine can run ``device``: cuda needs a GPU and a CUDA build of torch."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise L4Error("--device cuda needs a CUDA GPU and a CUDA build of torch; this machine has none")


def _choice(field_name: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise L4Error(f"unknown {field_name} '{value}'; choose one of: {', '.join(allowed)}")
    return value


def _positive_int(field_name: str, value: Any, *, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise L4Error(f"{field_name} must be a positive integer, got {value!r}")
    return value


@dataclass(frozen=True)
class CompileConfig:
    """Everything that decides what an engine computes and how it is built."""

    backend: str = "inductor"
    quant: str = "none"
    dtype: str = "float32"
    device: str = "cpu"
    max_seq_len: int | None = None          # None: min(512, the model's max_position_embeddings)
    max_batch_size: int = 4
    seed: int = 0
    layers: int | None = None               # preset override: number of decoder layers
    passes: tuple[str, ...] = ()            # user passes, MODULE:FUNC
    skip_passes: tuple[str, ...] = ()
    verify: bool = False                    # run the graph after every pass and name the first that drifts
    text_only: bool = False                 # multimodal checkpoints: compile the text model only (no vision engine)
    stream_weights: bool = False            # trace on meta, read each weight when needed (l4compile.weights)
    pass_options: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = field(default_factory=tuple)
    inductor_configs: tuple[tuple[str, Any], ...] = ()   # Inductor settings (l4compile.inductor_configs)
    tune_kernels: bool = False              # time the Int4 kernels' blocks on this GPU (l4compile.kernels.autotune)

    def __post_init__(self) -> None:
        _choice("backend", self.backend, BACKENDS)
        _choice("quant", self.quant, QUANTS)
        _choice("dtype", self.dtype, DTYPES)
        _choice("device", self.device, DEVICES)
        _positive_int("max_seq_len", self.max_seq_len, allow_none=True)
        _positive_int("max_batch_size", self.max_batch_size)
        _positive_int("layers", self.layers, allow_none=True)
        for name in ("text_only", "stream_weights", "verify", "tune_kernels"):
            if not isinstance(getattr(self, name), bool):
                raise L4Error(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.tune_kernels and (self.device, self.backend) != ("cuda", "inductor"):
            raise L4Error("--tune-kernels times the Triton kernels on the GPU the engine is built for: it needs "
                          f"--device cuda and --backend inductor, got --device {self.device} --backend {self.backend}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise L4Error(f"seed must be an integer, got {self.seed!r}")
        object.__setattr__(self, "passes", tuple(self.passes))
        object.__setattr__(self, "skip_passes", tuple(self.skip_passes))
        object.__setattr__(self, "inductor_configs", tuple(tuple(kv) for kv in self.inductor_configs))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CompileConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise L4Error(f"unknown compile option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def options_for(self, pass_name: str) -> dict[str, Any]:
        return dict(dict(self.pass_options).get(pass_name, ()))

    def stable_hash(self) -> str:
        """sha256 of the canonical JSON form; goes into manifests and benchmark records."""
        d = self.to_dict()
        if not d["tune_kernels"]:          # added later: configs without it hash as they did before
            del d["tune_kernels"]
        blob = json.dumps(d, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]
