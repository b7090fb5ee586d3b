"""Multimodal engines (vision engine + image-aware text engine) against transformers' Llama4ForConditionalGeneration.

transformers 5.24's ``Llama4ForConditionalGeneration.forward`` raises (``'MoeCausalLMOutputWithPast' object has
no attribute 'image_outputs'``), so the reference runs forward's own steps with the model's own modules:
``get_image_features`` -> ``multi_modal_projector`` -> ``get_placeholder_mask`` -> ``masked_scatter`` ->
``language_model``."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from l4compile.errors import L4Error
from tests.backends.parity_checks import rel_err
from tests.conftest import QUICK_INDUCTOR

TOL = 1e-4
PROMPT = [1, 5, 490, 7, 9]      # 490 = <|image|> in the tiny-vision vocabulary
STEPS = 8


@pytest.fixture(scope="module")
def hf_model():
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    from l4compile.presets import get_preset

    cfg = get_preset("tiny-vision").multimodal_config()
    torch.manual_seed(0)
    m = Llama4ForConditionalGeneration(Llama4Config(**{k: v for k, v in cfg.items() if k != "model_type"})).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if ".experts." in name:
                p.normal_(0.0, 0.25)
    return m


@pytest.fixture(scope="module")
def checkpoint(hf_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("mm") / "ckpt"
    hf_model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def mm_engines(checkpoint, tmp_path_factory):
    import l4compile

    root = tmp_path_factory.mktemp("mm-engines")
    return {b: l4compile.compile(str(checkpoint), backend=b, out=root / b, max_seq_len=480, max_batch_size=2,
                                 inductor_configs=QUICK_INDUCTOR if b == "inductor" else None)
            for b in ("inductor", "onnxruntime")}


IMAGES = {   # (height, width) -> tiles: one tile; 1 x 2 tiles + the global view
    "one-tile": (200, 300),
    "two-tiles": (300, 500),
}


def _image(h: int, w: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(h * w).integers(0, 256, (h, w, 3), dtype=np.uint8))


def hf_reference(m, ids: torch.Tensor, pixel_values: torch.Tensor, steps: int):
    with torch.no_grad():
        emb = m.get_input_embeddings()(ids)
        feats = m.vision_model(pixel_values).last_hidden_state    # get_image_features' signature varies in 5.x
        proj = m.multi_modal_projector(feats.view(-1, feats.size(-1)))
        mask = m.get_placeholder_mask(ids, inputs_embeds=emb, image_features=proj)
        emb = emb.masked_scatter(mask, proj)
        logits = m.language_model(inputs_embeds=emb).logits
        new = m.language_model.generate(inputs_embeds=emb, max_new_tokens=steps, do_sample=False)
    return logits, new


@pytest.mark.parametrize("backend", ["inductor", "onnxruntime"])
@pytest.mark.parametrize("image", list(IMAGES))
def test_image_prompt_matches_transformers(mm_engines, hf_model, backend, image):
    from l4compile.vision import ImageSpec, preprocess

    eng = mm_engines[backend]
    img = _image(*IMAGES[image])
    ids, _, mask = eng.prepare_prompt(torch.tensor([PROMPT]), [img])
    pv = preprocess(img, ImageSpec.from_dict(eng.manifest["vision"]["image"])).pixel_values
    assert pv.shape[0] == (1 if image == "one-tile" else 3) and int(mask.sum()) == 144 * pv.shape[0]
    ref_logits, ref_new = hf_reference(hf_model, ids, pv, STEPS)
    logits = eng.prefill(torch.tensor([PROMPT]), images=[img])
    assert logits.shape == ref_logits.shape
    assert rel_err(logits, ref_logits) < TOL
    out = eng.generate(torch.tensor([PROMPT]), max_new_tokens=STEPS, images=[img])
    assert torch.equal(out[0, : ids.shape[1]], ids[0]) and out[0, ids.shape[1]:].tolist() == ref_new[0].tolist()


def test_text_prompts_and_manifest(mm_engines, hf_model):
    eng = mm_engines["inductor"]
    ids = torch.tensor([[1, 7, 300, 42, 9, 11]])
    with torch.no_grad():
        ref = hf_model.language_model(input_ids=ids).logits
    assert rel_err(eng.prefill(ids), ref) < TOL
    v = eng.manifest["vision"]
    assert v["artifacts"] == ["vision/model.pt2", "vision/weights.safetensors", "vision/program.pt2"]
    assert set(v["artifacts"]) <= set(eng.manifest["artifacts"])
    assert v["image"]["tokens_per_tile"] == 144 and v["max_tiles"] == 17
    assert [p["name"] for p in v["passes"]] == ["lower_vision_rope", "eliminate_dead_code"]
    assert [i["name"] for i in eng.manifest["signature"]["inputs"]][:3] == ["input_ids", "image_embeds", "image_mask"]
    with pytest.raises(L4Error, match="batch 1"):
        eng.prepare_prompt(torch.tensor([PROMPT, PROMPT]), [_image(50, 50)])


def test_image_prompt_under_the_jit_runtime(mm_engines, monkeypatch):
    """The vision engine and the image-aware text engine through the jit runtime (program.pt2 + torch.compile) give
    the package's logits and tokens; a text prompt of another length then compiles nothing (the image prompt's
    prefill graph is dynamic in T, its image_embeds / image_mask inputs included)."""
    import l4compile
    from torch._dynamo.utils import counters

    aoti = mm_engines["inductor"]
    monkeypatch.setenv("L4COMPILE_INDUCTOR_RUNNER", "jit")
    jit = l4compile.load_engine(aoti.path)
    assert jit.runtime == "jit"
    img, ids = _image(*IMAGES["two-tiles"]), torch.tensor([PROMPT])
    assert rel_err(jit.prefill(ids, images=[img]), aoti.prefill(ids, images=[img])) < 1e-5
    want = aoti.generate(ids, max_new_tokens=4, images=[img])
    assert jit.generate(ids, max_new_tokens=4, images=[img]).tolist() == want.tolist()
    graphs = counters["stats"]["unique_graphs"]
    text = torch.tensor([[1, 7, 300, 42, 9, 11, 12]])
    assert rel_err(jit.prefill(text), aoti.prefill(text)) < 1e-5
    assert counters["stats"]["unique_graphs"] == graphs


def test_cli_run_with_image(mm_engines, tmp_path):
    from tests.conftest import run_cli

    png = tmp_path / "photo.png"
    _image(*IMAGES["one-tile"]).save(png)
    r = run_cli("run", str(mm_engines["onnxruntime"].path), "--image", str(png), "--prompt-ids", "1,5,490,7",
                "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert r.returncode == 0 and out["images"] == 1 and out["prompt_len"] == 3 + 147 and len(out["generated_ids"]) == 4
    (tmp_path / "bad.png").write_text("no pixels here")
    r = run_cli("run", str(mm_engines["onnxruntime"].path), "--image", str(tmp_path / "bad.png"), "--prompt-ids", "1,2")
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and err[0].startswith("error:") and "not an image" in err[0], r.stderr


def test_text_engine_rejects_images_and_tensorrt_rejects_vision(tiny_engine, tmp_path):
    import l4compile
    from l4compile.engine import load_engine

    with pytest.raises(L4Error, match="no vision engine"):
        load_engine(tiny_engine).generate([1, 2, 3], max_new_tokens=2, images=[_image(20, 20)])
    with pytest.raises(L4Error, match="tensorrt backend does not build the vision engine"):
        l4compile.compile("tiny-vision", backend="tensorrt", out=tmp_path / "trt")
    assert not (tmp_path / "trt").exists()
