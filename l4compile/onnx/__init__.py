"""ONNX translations of l4compile's custom ops, for ``torch.onnx.export(..., custom_translation_table=...)``.

``l4::moe`` has its own translation (``moe.moe_onnx``), and so do the attention ops (``l4::attention``,
``l4::attention_cached``: ``attention``); the quantized ops (``l4::linear_fp8``, ``l4::linear_int4``,
``l4::moe_q``) are translated per target by ``quant`` and need the exported program's weight values
(``translation_table``). Every l4 op an ONNX graph holds is translated, so the export never decomposes one into
aten first. Importing this package needs ``onnxscript``.
"""
from __future__ import annotations

import torch

import l4compile.ops  # noqa: F401  (registers l4::*)

from .attention import attention_cached_onnx, attention_onnx
from .moe import ONNX_OPSET, moe_onnx

TRANSLATIONS = {torch.ops.l4.moe.default: moe_onnx, torch.ops.l4.attention.default: attention_onnx,
                torch.ops.l4.attention_cached.default: attention_cached_onnx}
QUANT_OPS = frozenset({torch.ops.l4.linear_fp8.default, torch.ops.l4.linear_int4.default, torch.ops.l4.moe_q.default})
TRANSLATED_OPS = frozenset(TRANSLATIONS) | QUANT_OPS     # kept opaque through the export's decompositions


def translation_table(ep: torch.export.ExportedProgram, target: str = "onnxruntime") -> dict:
    """Every l4 op's translation for ``target`` (``onnxruntime`` or ``tensorrt``; see ``quant``), with the
    quantized ops reading their weights from ``ep``."""
    from .quant import Weights, translations

    return {**TRANSLATIONS, **translations(Weights(ep), target)}


__all__ = ["ONNX_OPSET", "QUANT_OPS", "TRANSLATED_OPS", "TRANSLATIONS", "moe_onnx", "translation_table"]
