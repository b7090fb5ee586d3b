"""Engine weights as one safetensors file, written tensor by tensor (never the whole file in memory).

``safetensors.torch.save_file`` builds the whole file in host memory and refuses tensors that share storage;
an engine's weights can be tens of GB on the GPU (full Scout Int4: ~58 GB), so ``write`` streams each tensor to
disk (one device-to-host copy at a time) under a header computed from shapes and dtypes alone. Shared tensors are
simply written twice. ``read`` is safetensors' own reader, loading straight onto the target device.

Format (https://github.com/huggingface/safetensors): u64 little-endian header length N, N bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}}`` padded with spaces to a multiple of 8, then the data.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor

from l4compile.errors import L4Error

DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}


def write(path: Path, tensors: Mapping[str, Tensor], *, hasher=None) -> int:
    """Write ``tensors`` to ``path`` in safetensors format; returns the data bytes. ``hasher`` (a ``hashlib``
    object) is updated with every byte written, so an engine's checksum costs no second read of the file."""
    header: dict[str, dict] = {}
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in DTYPES:
            raise L4Error(f"cannot store weight '{name}' of dtype {t.dtype} in safetensors")
        n = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    def put(data) -> None:
        f.write(data)
        if hasher is not None:
            hasher.update(data)

    with open(path, "wb") as f:
        put(struct.pack("<Q", len(blob)))
        put(blob)
        for t in tensors.values():
            if t.numel():
                put(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().data)
    return offset


def read(path: Path, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """Every tensor of a safetensors file, loaded onto ``device``."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise L4Error(f"cannot read engine weights {path}: {e}") from None
