"""Backends: each module has ``build(program, workdir, config) -> BuildResult`` and
``load(engine_dir, manifest) -> runner`` (a callable ``input_ids [B, S] -> logits [B, S, V]``, or with a KV cache
``(input_ids, start_pos, *caches) -> (logits, *caches)``)."""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from l4compile.errors import L4Error

AVAILABLE = {"inductor": "l4compile.backends.inductor", "onnxruntime": "l4compile.backends.onnxruntime",
             "tensorrt": "l4compile.backends.tensorrt"}


@dataclass
class BuildResult:
    artifacts: list[str]                                   # paths relative to the engine directory
    info: dict[str, Any] = field(default_factory=dict)     # goes into the manifest under "backend_info"
    digests: dict[str, str] = field(default_factory=dict)  # artifact -> sha256 of the bytes the build wrote
                                                           # (hashed as written: no second read of a 58 GB file)


def get_backend(name: str) -> ModuleType:
    if name not in AVAILABLE:
        from l4compile.config import BACKENDS
        if name in BACKENDS:
            raise L4Error(f"backend '{name}' is not available in this l4compile build yet; "
                          f"available: {', '.join(AVAILABLE)}")
        raise L4Error(f"unknown backend '{name}'; choose one of: {', '.join(AVAILABLE)}")
    return importlib.import_module(AVAILABLE[name])
