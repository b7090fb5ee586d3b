"""Image preprocessing and prompt layout against transformers' Llama 4 processor code (no compile here).

transformers' image processor module imports torchvision, which has no CPU build here, so its pure functions
(canvas choice, resize target) are lifted from its source with ``ast`` and compared with ours on many sizes."""
from __future__ import annotations

import ast
import io
import math
import struct
import zlib
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from l4compile.errors import L4Error
from l4compile.vision import ImageSpec, ImageTokens, expand_prompt, image_block, load_image, place_features, preprocess
from l4compile.vision import image as vimage

TOK = ImageTokens(image_start=480, image_end=481, tile_x_separator=484, tile_y_separator=485, image=490, patch=492)


@pytest.fixture(scope="module")
def hf():
    """transformers' get_best_fit / find_supported_resolutions / get_max_res_without_distortion, undecorated."""
    import transformers.models.llama4 as pkg

    src = (Path(pkg.__file__).parent / "image_processing_llama4.py").read_text()
    wanted = {"get_factors", "get_max_res_without_distortion", "find_supported_resolutions", "get_best_fit"}
    tree = ast.parse(src)
    funcs = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in wanted]
    for f in funcs:
        f.decorator_list = []
    ns = {"math": math, "defaultdict": defaultdict, "torch": torch}
    exec(compile(ast.Module(body=funcs, type_ignores=[]), "hf_llama4_image", "exec"), ns)
    assert wanted <= set(ns)
    return SimpleNamespace(**{k: ns[k] for k in wanted})


def hf_target_size(hf, h: int, w: int, tile: int = 336, max_tiles: int = 16):
    """transformers' _preprocess: canvas, then the undistorted resize target (resize_to_max_canvas=False)."""
    res = torch.tensor(hf.find_supported_resolutions(max_tiles, SimpleNamespace(height=tile, width=tile)))
    canvas = [int(x) for x in hf.get_best_fit((h, w), res)]
    limit = (min(max(h, tile), canvas[0]), min(max(w, tile), canvas[1]))
    nh, nw = hf.get_max_res_without_distortion((h, w), limit)
    return tuple(canvas), (max(nh, 1), max(nw, 1))


def test_canvas_and_resize_target_match_transformers(hf):
    assert vimage.supported_canvases(16, 336) == [tuple(r) for r in hf.find_supported_resolutions(
        16, SimpleNamespace(height=336, width=336))]
    rng = np.random.default_rng(0)
    sizes = [(200, 300), (336, 336), (1, 5000), (5000, 1), (100, 100), (337, 1000), (2000, 2000), (640, 480)]
    sizes += [tuple(int(x) for x in rng.integers(1, 3000, 2)) for _ in range(150)]
    canvases = vimage.supported_canvases(16, 336)
    for h, w in sizes:
        canvas, (nh, nw) = hf_target_size(hf, h, w)
        ours = vimage.best_canvas(h, w, canvases)
        limit = (min(max(h, 336), ours[0]), min(max(w, 336), ours[1]))
        assert ours == canvas, (h, w)
        assert vimage.fit_without_distortion(h, w, *limit) == (nh, nw), (h, w)


def test_tiles_match_transformers_split_and_global_view():
    from transformers.image_transforms import split_to_tiles

    x = torch.randn(3, 672, 1008)
    ref = split_to_tiles(x[None], 2, 3)[0]
    assert torch.equal(vimage.split_tiles(x, 2, 3), ref)

    wide = Image.fromarray(np.random.default_rng(1).integers(0, 256, (300, 500, 3), dtype=np.uint8))
    p = preprocess(wide)
    assert p.aspect_ratio == (1, 2) and p.pixel_values.shape == (3, 3, 336, 336) and p.size == (300, 500)
    assert p.pixel_values.dtype == torch.float32
    # the right half of the canvas is padding: normalised 0 -> -1
    assert torch.all(p.pixel_values[1, :, :, -10:] == -1.0)
    small = preprocess(Image.new("RGB", (40, 30), (255, 0, 128)))
    assert small.aspect_ratio == (1, 1) and small.pixel_values.shape == (1, 3, 336, 336)


def test_normalisation_is_the_bfloat16_sequence():
    img = torch.tensor([0, 1, 127, 128, 254, 255], dtype=torch.uint8).view(1, 1, 6).expand(3, 1, 6)
    out = vimage.normalize(img, ImageSpec())
    assert out.dtype == torch.bfloat16
    x = (img.to(torch.bfloat16) * (1.0 / 255.0))
    expect = (x - torch.tensor(0.5, dtype=torch.bfloat16)) / torch.tensor(0.5, dtype=torch.bfloat16)
    assert torch.equal(out, expect)
    assert out[0, 0, 0] == -1 and out[0, 0, -1] == 1
    ref = img.float() / 255 * 2 - 1
    assert float((out.float() - ref).abs().max()) < 1e-2      # bf16 rounding, as in transformers


def test_resize_is_antialiased_bilinear_on_uint8():
    x = torch.from_numpy(np.random.default_rng(2).integers(0, 256, (3, 90, 120), dtype=np.uint8))
    y = vimage.resize_uint8(x, (30, 40))
    ref = torch.nn.functional.interpolate(x[None].float(), size=(30, 40), mode="bilinear", antialias=True,
                                          align_corners=False)[0]
    assert y.dtype == torch.uint8 and y.shape == (3, 30, 40)
    assert float((y.float() - ref).abs().max()) <= 1.0


def test_image_block_matches_transformers_processor_layout():
    from transformers.models.llama4.processing_llama4 import Llama4Processor

    text_to_id = {v: getattr(TOK, k) for k, v in ImageTokens.token_texts().items()}
    pattern = "|".join(map(lambda t: t.replace("|", r"\|"), text_to_id))
    import re
    for ar in [(1, 1), (1, 2), (2, 1), (2, 3), (4, 4)]:
        text = Llama4Processor._prompt_split_image(None, ar, 3)
        ids = [text_to_id[t] for t in re.findall(pattern, text)]
        assert image_block(ar, 3, TOK) == ids, ar


def test_expand_prompt_and_feature_placement():
    ids = [1, 5, TOK.image, 7]
    out = expand_prompt(ids, [(1, 2)], 2, TOK)
    assert out[:2] == [1, 5] and out[-1] == 7 and out.count(TOK.patch) == 3 * 2
    head = [TOK.image_start, TOK.image, TOK.patch, TOK.patch, TOK.image_end]
    assert expand_prompt([1, 5], [(1, 1)], 2, TOK)[:5] == head
    with pytest.raises(L4Error, match="2 <\\|image\\|> placeholders"):
        expand_prompt([TOK.image, TOK.image], [(1, 1)], 2, TOK)
    with pytest.raises(L4Error, match="image-layout token"):
        expand_prompt([1, TOK.patch], [(1, 1)], 2, TOK)
    full = torch.tensor([out])
    feats = torch.arange(6 * 4, dtype=torch.float32).view(6, 4)
    emb, mask = place_features(full, feats, TOK.patch)
    assert int(mask.sum()) == 6 and torch.equal(emb[mask], feats) and float(emb[~mask].abs().sum()) == 0
    with pytest.raises(L4Error, match="feature rows"):
        place_features(full, feats[:5], TOK.patch)


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (2, 2)).save(buf, format="PNG")
    raw = bytearray(buf.getvalue())
    ihdr = raw[12:29]                       # b"IHDR" + 13 bytes of header
    ihdr[4:12] = struct.pack(">II", w, h)
    raw[12:29] = ihdr
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    return bytes(raw)


def test_bad_images_get_clear_errors(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "huge.png").write_bytes(_png(100_000, 100_000))
    good = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 20, 30)).save(good, format="PNG")
    (tmp_path / "cut.png").write_bytes(good.getvalue()[:60])
    cases = {"notes.txt": "not an image", "empty.png": "is empty", "huge.png": "pixels",
             "cut.png": "corrupt or truncated", "missing.png": "does not exist"}
    for name, msg in cases.items():
        with pytest.raises(L4Error, match=msg):
            load_image(tmp_path / name)
    with pytest.raises(L4Error, match="must be a path"):
        load_image(123)
    assert load_image(good.getvalue()).size == (64, 64)
    assert load_image(Image.new("L", (5, 7))).mode == "RGB"
