"""Prompt layout for images: each ``<|image|>`` placeholder in a prompt becomes the token block transformers'
``Llama4Processor`` writes for that image, and the vision features fill the ``<|patch|>`` positions.

Block for an image of ``rows x cols`` local tiles, ``P`` tokens per tile::

    <|image_start|>
      (only if rows*cols > 1) for each row:
          [<|patch|>*P <|tile_x_separator|>] * (cols-1), <|patch|>*P, <|tile_y_separator|>
    <|image|> <|patch|>*P <|image_end|>

The feature rows of an image (its tiles in order, the global tile last, ``P`` rows each) fill its ``<|patch|>``
positions in order, exactly like transformers' ``masked_scatter`` over the prompt.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch

from l4compile.errors import L4Error

# Llama 4's tokenizer ids (200080..): what a full-vocabulary checkpoint without tokenizer files uses.
LLAMA4_IMAGE_TOKENS = {"image_start": 200080, "image_end": 200081, "tile_x_separator": 200084,
                       "tile_y_separator": 200085, "image": 200090, "patch": 200092}
_TOKEN_TEXT = {"image_start": "<|image_start|>", "image_end": "<|image_end|>",
               "tile_x_separator": "<|tile_x_separator|>", "tile_y_separator": "<|tile_y_separator|>",
               "image": "<|image|>", "patch": "<|patch|>"}


@dataclass(frozen=True)
class ImageTokens:
    image_start: int
    image_end: int
    tile_x_separator: int
    tile_y_separator: int
    image: int          # the placeholder a user puts in a prompt, and the marker before the global tile
    patch: int          # the positions image features replace (the config's image_token_id)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ImageTokens":
        try:
            return cls(**{k: int(d[k]) for k in _TOKEN_TEXT})
        except (KeyError, TypeError, ValueError) as e:
            raise L4Error(f"image token ids are incomplete ({e}); need {', '.join(_TOKEN_TEXT)}") from None

    def check(self, vocab_size: int) -> None:
        for name, tid in self.to_dict().items():
            if not 0 <= tid < vocab_size:
                raise L4Error(f"image token '{_TOKEN_TEXT[name]}' has id {tid}, outside the vocabulary "
                              f"[0, {vocab_size})")
        if len(set(self.to_dict().values())) != len(_TOKEN_TEXT):
            raise L4Error(f"image token ids must be distinct, got {self.to_dict()}")

    @staticmethod
    def token_texts() -> dict[str, str]:
        return dict(_TOKEN_TEXT)


def image_block(aspect_ratio: tuple[int, int], tokens_per_tile: int, tok: ImageTokens) -> list[int]:
    """The token ids that stand for one image (see the module docstring)."""
    rows, cols = aspect_ratio
    out = [tok.image_start]
    if rows * cols > 1:
        for _ in range(rows):
            for x in range(cols):
                out += [tok.patch] * tokens_per_tile
                if x < cols - 1:
                    out.append(tok.tile_x_separator)
            out.append(tok.tile_y_separator)
    out += [tok.image] + [tok.patch] * tokens_per_tile + [tok.image_end]
    return out


def expand_prompt(ids: Sequence[int], aspect_ratios: Sequence[tuple[int, int]], tokens_per_tile: int,
                  tok: ImageTokens) -> list[int]:
    """Replace the i-th ``<|image|>`` placeholder with image i's block; a prompt without placeholders gets the
    blocks in front of it. The prompt must not already hold layout tokens, and placeholders must match images."""
    ids = [int(t) for t in ids]
    layout_ids = {tok.patch, tok.image_start, tok.image_end, tok.tile_x_separator, tok.tile_y_separator}
    bad = next((t for t in ids if t in layout_ids), None)
    if bad is not None:
        raise L4Error(f"the prompt already holds image-layout token {bad}; give one <|image|> (id {tok.image}) "
                      "per image and the engine writes the layout")
    n_ph = sum(1 for t in ids if t == tok.image)
    if n_ph == 0:
        head = [t for ar in aspect_ratios for t in image_block(ar, tokens_per_tile, tok)]
        return head + ids
    if n_ph != len(aspect_ratios):
        raise L4Error(f"the prompt has {n_ph} <|image|> placeholders (id {tok.image}) for {len(aspect_ratios)} "
                      "images; give one per image (or none: the images then go first)")
    out, k = [], 0
    for t in ids:
        if t == tok.image:
            out += image_block(aspect_ratios[k], tokens_per_tile, tok)
            k += 1
        else:
            out.append(t)
    return out


def place_features(ids: torch.Tensor, features: torch.Tensor, patch_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [B, S], features [N, H] -> (image_embeds [B, S, H], image_mask [B, S] bool): row i of ``features``
    goes to the i-th ``patch`` position in row-major order (transformers' masked_scatter)."""
    mask = ids == patch_id
    n = int(mask.sum())
    if n != features.shape[0]:
        raise L4Error(f"the prompt has {n} image-patch positions but the images produced {features.shape[0]} "
                      "feature rows")
    embeds = torch.zeros(*ids.shape, features.shape[-1], dtype=features.dtype, device=ids.device)
    embeds[mask] = features.to(ids.device)
    return embeds, mask
