"""Tracing the vision side of a multimodal Llama 4 into its own Program (``kind="vision"``).

Graph: ``pixel_values [T, 3, S, S] -> image_features [T, P, H_text]`` — patch embedding (unfold + linear), CLS
token, position embedding, the encoder (bidirectional attention with 2D RoPE, lowered by ``lower_vision_rope``),
pixel shuffle + adapter MLP, and the multimodal projector into the text model's hidden size. ``T`` (tiles) is
dynamic in ``[1, max_tiles]``; ``P = (S / patch)^2 * ratio^2``. Weights are ``get_attr`` nodes named as in the
checkpoint (``vision_model.*``, ``multi_modal_projector.*``).
"""
from __future__ import annotations

import torch
from torch.export import Dim

from l4compile.program import Program, size_oblivious


class VisionHarness(torch.nn.Module):
    """pixel_values [T, 3, S, S] -> projected image features [T, P, H_text]."""

    def __init__(self, vision_model: torch.nn.Module, projector: torch.nn.Module):
        super().__init__()
        self.vision_model = vision_model
        self.multi_modal_projector = projector

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        feats = self.vision_model(pixel_values).last_hidden_state       # [T, P, projector_output_dim]
        return self.multi_modal_projector(feats)


def vision_shapes(max_tiles: int) -> tuple:
    # as for text, the declared maximum sits above the engine's limit (export specialises a dim equal to its max)
    return ({0: Dim("tiles", min=1, max=max_tiles + 2)},)


def trace_vision(vision_model: torch.nn.Module, projector: torch.nn.Module, *, max_tiles: int,
                 device: str = "cpu") -> Program:
    """torch.export the vision tower + projector with a dynamic tile count."""
    harness = VisionHarness(vision_model, projector).eval()
    cfg = vision_model.config
    dtype = next(vision_model.parameters()).dtype
    size = int(cfg.image_size)
    g = torch.Generator().manual_seed(0)
    example = (torch.randn(2, int(cfg.num_channels), size, size, generator=g).to(device=device, dtype=dtype),)
    with size_oblivious(), torch.no_grad():
        ep = torch.export.export(harness, example, dynamic_shapes=vision_shapes(max_tiles), strict=False)
    gm = ep.module(check_guards=False)
    prog = Program(gm=gm, model_config=cfg, example_inputs=example, max_batch=max_tiles, max_seq=0,
                   kind="vision", shapes=vision_shapes(max_tiles))
    out_dim = int(projector.linear_1.out_features)
    prog.metadata["signature"] = {
        "inputs": [{"name": "pixel_values", "dtype": str(dtype).replace("torch.", ""),
                    "shape": ["tiles", int(cfg.num_channels), size, size]}],
        "outputs": [{"name": "image_features", "dtype": str(dtype).replace("torch.", ""),
                     "shape": ["tiles", "tokens_per_tile", out_dim]}],
        "dynamic": {"tiles": [1, max_tiles]},
    }
    return prog
