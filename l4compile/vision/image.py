"""Image preprocessing for Llama 4, without torchvision: decode (Pillow) -> resize -> pad -> normalise -> tiles.

It reproduces transformers' ``Llama4ImageProcessor`` step by step, so an engine and transformers see the same
pixel values for the same image:

1. Decode with Pillow, convert to RGB, ``uint8 [3, H, W]``.
2. Canvas: every ``(rows*tile, cols*tile)`` with ``rows*cols <= max_tiles``; pick the one needing the smallest
   upscale >= 1 (else the mildest downscale), ties -> smallest area (``best_canvas``). Never upscale past the
   tile size (``resize_to_max_canvas=False``).
3. Resize to the largest size that fits the canvas without distortion: bilinear with antialias on the ``uint8``
   image, the way torchvision's tensor path does it (torch's native uint8 kernel on an "AVX2" CPU, else a float32
   resize rounded back to uint8), then pad right/bottom with 0 to the canvas.
4. Normalise in bfloat16 exactly as the reference does: ``x.bfloat16() * (1/255)``, then ``(x - 0.5) / 0.5``.
5. Split into ``rows x cols`` tiles (row-major); if more than one, append a global tile: the whole image resized
   to ``tile x tile`` (distorting) and normalised the same way.

Output: ``pixel_values`` float32 ``[tiles, 3, tile, tile]`` (bfloat16-exact values) and ``aspect_ratio``
``(rows, cols)``. Bad input (missing or empty file, not an image, truncated, too many pixels) raises ``L4Error``.
"""
from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from l4compile.errors import L4Error

MAX_PIXELS = 64 * 1024 * 1024        # refuse decoding anything larger (decompression bombs, mistakes)
MAX_FILE_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class ImageSpec:
    """The preprocessing parameters an engine records in its manifest (``vision.image``)."""

    tile_size: int = 336
    patch_size: int = 14
    pixel_shuffle_ratio: float = 0.5
    max_tiles: int = 16                 # local tiles (the processor's ``max_patches``); +1 global tile
    mean: float = 0.5
    std: float = 0.5

    @property
    def tokens_per_tile(self) -> int:
        """Image tokens one tile becomes after the vision tower's pixel shuffle."""
        downsample = int(round(1.0 / self.pixel_shuffle_ratio ** 2))
        return (self.tile_size // self.patch_size) ** 2 // downsample

    def to_dict(self) -> dict[str, Any]:
        return {"tile_size": self.tile_size, "patch_size": self.patch_size,
                "pixel_shuffle_ratio": self.pixel_shuffle_ratio, "max_tiles": self.max_tiles,
                "mean": self.mean, "std": self.std, "tokens_per_tile": self.tokens_per_tile}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ImageSpec":
        return cls(**{k: d[k] for k in ("tile_size", "patch_size", "pixel_shuffle_ratio", "max_tiles", "mean", "std")})


@dataclass(frozen=True)
class ProcessedImage:
    pixel_values: torch.Tensor          # float32 [tiles, 3, tile, tile]
    aspect_ratio: tuple[int, int]       # (rows, cols) of local tiles; (1, 1) means one tile and no global view
    size: tuple[int, int]               # the decoded image's (height, width)


def load_image(src: Any):
    """A path, bytes or a PIL image -> an RGB PIL image; every bad input is an ``L4Error`` naming it."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(src, Image.Image):
        img, name = src, "image"
    else:
        if isinstance(src, (bytes, bytearray)):
            data, name = bytes(src), "image bytes"
        elif isinstance(src, (str, os.PathLike)):
            path, name = Path(src), f"image '{src}'"
            if not path.exists():
                raise L4Error(f"{name} does not exist")
            if not path.is_file():
                raise L4Error(f"{name} is not a file")
            if path.stat().st_size > MAX_FILE_BYTES:
                raise L4Error(f"{name} is {path.stat().st_size} bytes; images over {MAX_FILE_BYTES} bytes are refused")
            data = path.read_bytes()
        else:
            raise L4Error(f"an image must be a path, bytes or a PIL image, got {type(src).__name__}")
        if not data:
            raise L4Error(f"{name} is empty")
        old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = MAX_PIXELS
        try:
            img = Image.open(io.BytesIO(data))
            _check_pixels(img, name)
            img.load()
        except UnidentifiedImageError:
            raise L4Error(f"{name} is not an image Pillow can read (PNG, JPEG, ...)") from None
        except Image.DecompressionBombError:
            raise L4Error(f"{name} has too many pixels (over {MAX_PIXELS})") from None
        except (OSError, SyntaxError, ValueError) as e:
            raise L4Error(f"{name} is corrupt or truncated: {e}") from None
        finally:
            Image.MAX_IMAGE_PIXELS = old
    _check_pixels(img, name)
    return img.convert("RGB") if img.mode != "RGB" else img


def _check_pixels(img, name: str) -> None:
    w, h = img.size
    if w < 1 or h < 1:
        raise L4Error(f"{name} has no pixels ({w}x{h})")
    if w * h > MAX_PIXELS:
        raise L4Error(f"{name} is {w}x{h} = {w * h} pixels; images over {MAX_PIXELS} pixels are refused")


def supported_canvases(max_tiles: int, tile: int) -> list[tuple[int, int]]:
    """Every (height, width) of ``rows x cols`` tiles with ``rows*cols <= max_tiles``, in the reference's order
    (tile counts from ``max_tiles`` down, grouped by aspect ratio in first-seen order; the order breaks ties)."""
    by_ratio: dict[float, list[tuple[int, int]]] = {}
    for n in range(max_tiles, 0, -1):
        for rows in sorted(d for d in range(1, n + 1) if n % d == 0):
            by_ratio.setdefault(rows / (n // rows), []).append((rows, n // rows))
    return [(r * tile, c * tile) for group in by_ratio.values() for r, c in group]


def best_canvas(height: int, width: int, canvases: list[tuple[int, int]]) -> tuple[int, int]:
    """The canvas needing the smallest upscale >= 1, else the largest downscale < 1; ties -> smallest area."""
    scales = [min(ch / height, cw / width) for ch, cw in canvases]
    ups = [s for s in scales if s >= 1]
    chosen = min(ups) if ups else max(scales)
    options = [c for c, s in zip(canvases, scales) if s == chosen]
    return min(options, key=lambda c: c[0] * c[1])   # min() keeps the first of equal areas, like argmin


def fit_without_distortion(height: int, width: int, target_h: int, target_w: int) -> tuple[int, int]:
    """The largest (h, w) with the image's aspect ratio inside (target_h, target_w) (floor rounding)."""
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return max(min(math.floor(height * scale_w), target_h), 1), max(target_w, 1)
    return max(target_h, 1), max(min(math.floor(width * scale_h), target_w), 1)


def resize_uint8(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 [3, H, W] -> uint8 [3, h, w], bilinear with antialias (torchvision's tensor path)."""
    x = img[None]
    # torchvision takes torch's native uint8 kernel only when the capability string contains "AVX2" (so not on
    # an "AVX512" CPU); otherwise it resizes in float32 and rounds. Both differ by at most 1 per pixel.
    if "AVX2" in torch.backends.cpu.get_cpu_capability():
        out = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    else:
        out = torch.nn.functional.interpolate(x.float(), size=size, mode="bilinear", align_corners=False,
                                              antialias=True).round_().to(torch.uint8)
    return out[0]


def normalize(img: torch.Tensor, spec: ImageSpec) -> torch.Tensor:
    """uint8 [..., 3, h, w] -> bfloat16, the reference's exact op sequence (rescale, then (x - mean) / std)."""
    x = img.to(torch.bfloat16) * (1.0 / 255.0)
    mean = torch.tensor([spec.mean] * 3, dtype=torch.bfloat16).view(-1, 1, 1)
    std = torch.tensor([spec.std] * 3, dtype=torch.bfloat16).view(-1, 1, 1)
    return x.sub_(mean).div_(std)


def split_tiles(img: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """[3, H, W] -> [rows*cols, 3, H/rows, W/cols], row-major."""
    c, h, w = img.shape
    t = img.view(c, rows, h // rows, cols, w // cols).permute(1, 3, 0, 2, 4)
    return t.reshape(rows * cols, c, h // rows, w // cols)


def preprocess(src: Any, spec: ImageSpec = ImageSpec()) -> ProcessedImage:
    """One image (path, bytes or PIL image) -> ``ProcessedImage`` (see the module docstring)."""
    import numpy as np

    pil = load_image(src)
    arr = torch.from_numpy(np.asarray(pil, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()   # [3, H, W]
    h, w = arr.shape[-2:]
    tile = spec.tile_size
    canvas_h, canvas_w = best_canvas(h, w, supported_canvases(spec.max_tiles, tile))
    limit_h, limit_w = min(max(h, tile), canvas_h), min(max(w, tile), canvas_w)   # never upscale past one tile
    new_h, new_w = fit_without_distortion(h, w, limit_h, limit_w)
    resized = resize_uint8(arr, (new_h, new_w))
    padded = torch.nn.functional.pad(resized, (0, canvas_w - new_w, 0, canvas_h - new_h), value=0)
    rows, cols = canvas_h // tile, canvas_w // tile
    tiles = split_tiles(normalize(padded, spec), rows, cols)
    if rows * cols > 1:
        global_tile = normalize(resize_uint8(arr, (tile, tile)), spec)
        tiles = torch.cat([tiles, global_tile[None]], dim=0)
    return ProcessedImage(tiles.float().contiguous(), (rows, cols), (h, w))
