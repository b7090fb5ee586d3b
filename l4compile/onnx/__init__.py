"""ONNX translations of l4compile's custom ops, for ``torch.onnx.export(..., custom_translation_table=...)``.

``l4::moe`` has its own translation (``moe.moe_onnx``); the attention ops (``l4::attention``,
``l4::attention_cached``) are decomposed to plain aten first (``l4compile.ops.DECOMPOSITIONS``) and go through
torch.onnx's standard aten translations. Importing this package needs ``onnxscript``.
"""
from __future__ import annotations

import torch

import l4compile.ops  # noqa: F401  (registers l4::*)

from .moe import ONNX_OPSET, moe_onnx

TRANSLATIONS = {torch.ops.l4.moe.default: moe_onnx}

__all__ = ["ONNX_OPSET", "TRANSLATIONS", "moe_onnx"]
