"""Frontend: MODEL (a local Hugging Face Llama 4 checkpoint directory or a preset name) -> an eval-mode
``Llama4ForCausalLM``. Weights come from safetensors only; nothing is unpickled and nothing is downloaded.

Every user error (missing path, other model type, unreadable config, truncated or mismatched weights) raises
``L4Error`` naming the file, field or tensor.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from l4compile.errors import L4Error
from l4compile.presets import PRESETS, get_preset
from l4compile.weights import CheckpointWeights, Overlay, RandomWeights, StateDictWeights, materialize_module

TEXT_MODEL_TYPES = ("llama4_text", "llama4")
STREAM_VISION = "--stream-weights compiles text models only; add --text-only to compile this model's text part"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ST_DTYPES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
              "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass
class VisionParts:
    """The image side of a multimodal checkpoint (``model_type: llama4`` with a vision_config)."""

    module: torch.nn.Module         # VisionHarness: .vision_model (Llama4VisionModel), .multi_modal_projector
    config: Any                     # Llama4VisionConfig
    tokens: Any                     # l4compile.vision.ImageTokens
    spec: Any                       # l4compile.vision.ImageSpec


@dataclass
class LoadedModel:
    model: torch.nn.Module          # Llama4ForCausalLM, eval mode
    source: dict[str, Any]          # {"kind": "preset"|"checkpoint", ...}
    vision: VisionParts | None = None
    weights: Any = None             # stream=True: the WeightSource behind the META model's tensors


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


def is_checkpoint_arg(model: str) -> bool:
    return model not in PRESETS


def read_json_object(path: Path) -> dict[str, Any]:
    """A checkpoint's JSON file that must hold an object (config, tokenizer and preprocessor files) -> dict; one-line
    L4Error when it cannot be read, is not JSON, or holds something else."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise L4Error(f"cannot read {path}: {e}") from None
    if not isinstance(doc, dict):
        raise L4Error(f"{path} is not a JSON object")
    return doc


def read_config(ckpt: Path) -> dict[str, Any]:
    cfg_path = ckpt / "config.json"
    if not cfg_path.is_file():
        raise L4Error(f"{ckpt} has no config.json; give a Hugging Face Llama 4 checkpoint directory or a preset")
    cfg = read_json_object(cfg_path)
    mt = cfg.get("model_type")
    if mt not in TEXT_MODEL_TYPES:
        raise L4Error(f"{ckpt} holds a model of type '{mt}'; l4compile compiles Llama 4 checkpoints "
                      f"(model_type one of: {', '.join(TEXT_MODEL_TYPES)})")
    return cfg


def checkpoint_dir(model: str) -> Path | None:
    """MODEL's checkpoint directory (a trained preset's packaged one), or None: a random-weight preset, or a path
    that is not a checkpoint (``load`` refuses it with the reason)."""
    if model in PRESETS:
        return get_preset(model).checkpoint_dir()
    path = Path(model)
    return path if (path / "config.json").is_file() else None


def text_config_from_dict(cfg: dict[str, Any]):
    from transformers import Llama4TextConfig

    if cfg.get("model_type") == "llama4":
        tc = cfg.get("text_config")
        if not isinstance(tc, dict):
            raise L4Error("config field 'text_config' is missing or not an object in a llama4 checkpoint")
        cfg = dict(tc)
    cfg = {k: v for k, v in cfg.items() if k not in ("model_type", "transformers_version", "architectures")}
    try:
        text_cfg = Llama4TextConfig(**cfg)
    except (TypeError, ValueError, KeyError) as e:
        raise L4Error(f"invalid Llama 4 text config: {e}") from None
    validate_text_config(text_cfg)
    return text_cfg


def validate_text_config(c) -> None:
    """Check the fields l4compile relies on; each message names the field and what is allowed."""
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise L4Error(f"config field {msg}")
    for f in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "head_dim", "intermediate_size", "num_local_experts", "num_experts_per_tok", "attention_chunk_size"):
        v = getattr(c, f, None)
        need(isinstance(v, int) and not isinstance(v, bool) and v > 0, f"'{f}' must be a positive integer, got {v!r}")
    need(c.num_attention_heads % c.num_key_value_heads == 0,
         f"'num_key_value_heads' ({c.num_key_value_heads}) must divide num_attention_heads ({c.num_attention_heads})")
    need(c.num_experts_per_tok <= c.num_local_experts,
         f"'num_experts_per_tok' ({c.num_experts_per_tok}) must be at most num_local_experts ({c.num_local_experts})")
    need(c.hidden_act == "silu", f"'hidden_act' must be 'silu', got {c.hidden_act!r}")
    need(len(c.no_rope_layers) == c.num_hidden_layers,
         f"'no_rope_layers' must have num_hidden_layers ({c.num_hidden_layers}) entries, got {len(c.no_rope_layers)}")


def vision_configs(cfg: dict[str, Any]):
    """A llama4 config dict -> (Llama4Config, Llama4VisionConfig), validated; None if it has no vision tower."""
    from transformers import Llama4Config

    if cfg.get("model_type") != "llama4" or not isinstance(cfg.get("vision_config"), dict):
        return None
    vc = dict(cfg["vision_config"])
    vc.setdefault("rope_parameters", {"rope_theta": 10000.0})
    try:
        full = Llama4Config(text_config=dict(cfg["text_config"]), vision_config=vc,
                            **{k: cfg[k] for k in ("boi_token_index", "eoi_token_index", "image_token_index")
                               if k in cfg})
    except (TypeError, ValueError, KeyError) as e:
        raise L4Error(f"invalid Llama 4 vision config: {e}") from None
    v = full.vision_config

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise L4Error(f"vision_config field {msg}")
    for f in ("hidden_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size",
              "intermediate_size", "projector_input_dim", "projector_output_dim", "vision_output_dim"):
        val = getattr(v, f, None)
        need(isinstance(val, int) and not isinstance(val, bool) and val > 0,
             f"'{f}' must be a positive integer, got {val!r}")
    need(v.hidden_size % v.num_attention_heads == 0 and (v.hidden_size // v.num_attention_heads) % 4 == 0,
         f"'num_attention_heads' ({v.num_attention_heads}) must split hidden_size ({v.hidden_size}) into heads of a "
         "multiple of 4 (2D RoPE)")
    need(v.image_size % v.patch_size == 0,
         f"'image_size' ({v.image_size}) must be a multiple of patch_size ({v.patch_size})")
    grid = v.image_size // v.patch_size
    ratio = float(v.pixel_shuffle_ratio)
    need(0 < ratio < 1 and (grid * ratio).is_integer() and (1 / ratio ** 2).is_integer(),
         f"'pixel_shuffle_ratio' ({ratio}) must be 1/k and map the {grid}x{grid} patch grid to whole patches")
    need(v.intermediate_size == int(v.hidden_size / ratio ** 2),
         f"'intermediate_size' ({v.intermediate_size}) must equal hidden_size / pixel_shuffle_ratio^2 "
         f"({int(v.hidden_size / ratio ** 2)}): the adapter MLP reads the pixel-shuffled patches")
    need(v.projector_input_dim == v.projector_output_dim == v.vision_output_dim,
         "'projector_input_dim', 'projector_output_dim' and 'vision_output_dim' must be equal "
         f"(got {v.projector_input_dim}, {v.projector_output_dim}, {v.vision_output_dim})")
    return full, v


def image_tokens(ckpt: Path | None, full_cfg, vocab_size: int):
    """The image-layout token ids: from tokenizer_config.json / tokenizer.json when the checkpoint has them,
    else Llama 4's fixed offsets from the config's begin-of-image id (start, end, tile x/y, image, patch =
    boi + 0, 1, 4, 5, 10, 12) when the config's ids follow them."""
    from l4compile.vision.layout import ImageTokens

    texts = {v: k for k, v in ImageTokens.token_texts().items()}
    found: dict[str, int] = {}
    for name in ("tokenizer_config.json", "tokenizer.json") if ckpt is not None else ():
        f = ckpt / name
        if not f.is_file():
            continue
        doc = read_json_object(f)
        entries = []
        if isinstance(doc.get("added_tokens_decoder"), dict):
            entries = [(int(i), d.get("content")) for i, d in doc["added_tokens_decoder"].items()
                       if isinstance(d, dict)]
        elif isinstance(doc.get("added_tokens"), list):
            entries = [(int(d["id"]), d.get("content")) for d in doc["added_tokens"]
                       if isinstance(d, dict) and "id" in d]
        for tid, content in entries:
            if content in texts:
                found.setdefault(texts[content], tid)
    boi, eoi, patch = int(full_cfg.boi_token_id), int(full_cfg.eoi_token_id), int(full_cfg.image_token_id)
    if len(found) < len(texts):
        if eoi == boi + 1 and patch == boi + 12:
            for k, off in (("image_start", 0), ("image_end", 1), ("tile_x_separator", 4), ("tile_y_separator", 5),
                           ("image", 10), ("patch", 12)):
                found.setdefault(k, boi + off)
        else:
            missing = ", ".join(ImageTokens.token_texts()[k] for k in texts.values() if k not in found)
            raise L4Error(f"cannot find the ids of {missing}: add the checkpoint's tokenizer_config.json, or use "
                          "Llama 4's layout (eoi = boi + 1, image_token_index = boi + 12)")
    tokens = ImageTokens.from_dict(found)
    if tokens.patch != patch:
        raise L4Error(f"the tokenizer's <|patch|> id {tokens.patch} differs from config image_token_index {patch}")
    tokens.check(vocab_size)
    return tokens


def image_spec(ckpt: Path | None, vcfg):
    """Preprocessing parameters: tile size and patch grid from the vision config, ``max_patches`` from the
    checkpoint's preprocessor_config.json when present (else the processor's default, 16)."""
    from l4compile.vision.image import ImageSpec

    max_tiles = 16
    f = ckpt / "preprocessor_config.json" if ckpt is not None else None
    if f is not None and f.is_file():
        pp = read_json_object(f)
        max_tiles = pp.get("max_patches", max_tiles)
        if not isinstance(max_tiles, int) or isinstance(max_tiles, bool) or max_tiles < 1:
            raise L4Error(f"{f}: 'max_patches' must be a positive integer, got {max_tiles!r}")
        size = pp.get("size") or {}
        if isinstance(size, dict) and size.get("height", vcfg.image_size) != vcfg.image_size:
            raise L4Error(f"{f}: size {size} differs from the vision tower's image_size {vcfg.image_size}")
        if pp.get("resize_to_max_canvas"):
            raise L4Error(f"{f}: resize_to_max_canvas=true is not supported (Llama 4's processor default is false)")
    return ImageSpec(tile_size=int(vcfg.image_size), patch_size=int(vcfg.patch_size),
                     pixel_shuffle_ratio=float(vcfg.pixel_shuffle_ratio), max_tiles=max_tiles)


def cast_real(module: torch.nn.Module, device: str, dtype: str) -> torch.nn.Module:
    """``module.to(device, dtype)`` for real floating tensors only: ``Module.to(dtype)`` would cast the vision
    tower's complex RoPE buffer to a real dtype and silently drop its imaginary part."""
    module.to(device=device)
    target = torch_dtype(dtype)
    for t in [*module.parameters(), *module.buffers()]:
        if t.is_floating_point():
            t.data = t.data.to(target)
    return module.eval()


def build_vision(full_cfg, *, seed: int) -> torch.nn.Module:
    """A seeded, float32 VisionHarness (vision tower + projector) for ``full_cfg`` (a Llama4Config)."""
    from transformers.models.llama4.modeling_llama4 import Llama4MultiModalProjector, Llama4VisionModel

    from l4compile.vision.program import VisionHarness

    torch.manual_seed(seed + 7)
    return VisionHarness(Llama4VisionModel(full_cfg.vision_config), Llama4MultiModalProjector(full_cfg)).eval()


def build_model(text_cfg, *, seed: int, dtype: str, device: str = "cpu", meta: bool = False,
                expert_init_std: float | None = None) -> torch.nn.Module:
    """A randomly initialised, seeded Llama4ForCausalLM (float32 init, then cast, so dtypes agree)."""
    from transformers import Llama4ForCausalLM

    if meta:
        with torch.device("meta"):
            return Llama4ForCausalLM(text_cfg).to(torch_dtype(dtype)).eval()
    torch.manual_seed(seed)
    model = Llama4ForCausalLM(text_cfg)
    if expert_init_std is not None:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".experts." in name:
                    p.copy_(torch.randn(p.shape, generator=g) * expert_init_std)
    return model.to(device=device, dtype=torch_dtype(dtype)).eval()


def computed_buffers(text_cfg) -> StateDictWeights:
    """The buffers transformers computes instead of loading (RoPE inv_freq), for models built on meta."""
    from transformers.models.llama4.modeling_llama4 import Llama4TextRotaryEmbedding

    with torch.device("cpu"):
        rope = Llama4TextRotaryEmbedding(text_cfg)
    return StateDictWeights({f"model.rotary_emb.{k}": v for k, v in rope.named_buffers()})


def random_weights(lm: torch.nn.Module, seed: int, expert_init_std: float | None) -> RandomWeights:
    """Seeded per-tensor random weights for ``lm``'s parameters (see ``l4compile.weights.RandomWeights``)."""
    shapes = {n: tuple(p.shape) for n, p in lm.named_parameters(remove_duplicate=False)}
    return RandomWeights(shapes, seed, float(lm.config.initializer_range), expert_init_std)


def available_bytes(device: str) -> int | None:
    """Free memory where tensors of ``device`` live (host: MemAvailable), None if unknown."""
    if device == "cuda":
        return torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_memory(model: str, need: int, device: str) -> None:
    """Refuse, before allocating, an in-memory build that cannot fit."""
    have = available_bytes(device)
    if have is not None and need > have:
        raise L4Error(f"building '{model}' in memory needs ~{need / 2**30:.1f} GiB on {device} and "
                      f"{have / 2**30:.1f} GiB is free; add --stream-weights (weights are then read one at a time, and "
                      "with --quant int4/fp8 only quantized weights are kept), or use --layers N for a preset")


def _numel(lm: torch.nn.Module) -> int:
    return sum(p.numel() for p in lm.parameters())


def load(model: str, *, dtype: str = "float32", device: str = "cpu", seed: int = 0, layers: int | None = None,
         meta: bool = False, vision: bool = False, stream: bool = False) -> LoadedModel:
    """Resolve MODEL to an eval-mode Llama4ForCausalLM; with ``vision``, also the vision tower and projector
    of a multimodal checkpoint or preset (``LoadedModel.vision``; None for text-only models).

    ``stream``: the model stays on the META device and ``LoadedModel.weights`` is the WeightSource to read its
    tensors from one at a time (``l4compile.weights``); text models only. Full-size presets (scout, maverick)
    always draw their random weights per tensor from ``RandomWeights`` (in memory: directly on ``device``)."""
    preset_name = None
    if model in PRESETS and get_preset(model).checkpoint is not None:   # trained preset: a packaged checkpoint
        preset_name, model = model, str(get_preset(model).checkpoint_dir())
        if layers is not None:
            raise L4Error(f"--layers does not apply to preset '{preset_name}' (trained weights, fixed layers)")
    if model in PRESETS:
        preset = get_preset(model)
        text_cfg = text_config_from_dict(dict(preset.text_config_kwargs(layers), model_type="llama4_text"))
        source = {"kind": "preset", "name": model, "seed": seed, "layers": layers}
        if stream and vision and preset.vision is not None:
            raise L4Error(STREAM_VISION)
        if (stream or preset.full_size) and not meta:
            lm = build_model(text_cfg, seed=seed, dtype=dtype, meta=True)
            weights = Overlay((computed_buffers(text_cfg), random_weights(lm, seed, preset.expert_init_std)))
            if stream:
                return LoadedModel(lm, dict(source, weights="random per tensor"), None, weights)
            check_memory(model, _numel(lm) * torch_dtype(dtype).itemsize, device)
            materialize_module(lm, weights, device)
            return LoadedModel(lm.eval(), dict(source, weights="random per tensor"))
        lm = build_model(text_cfg, seed=seed, dtype=dtype, device=device, meta=meta,
                         expert_init_std=preset.expert_init_std)
        parts = None
        if vision and preset.vision is not None and not meta:
            full, vcfg = vision_configs(preset.multimodal_config(layers))
            module = cast_real(build_vision(full, seed=seed), device, dtype)
            parts = VisionParts(module, vcfg, image_tokens(None, full, text_cfg.vocab_size), image_spec(None, vcfg))
        return LoadedModel(lm, {"kind": "preset", "name": model, "seed": seed, "layers": layers}, parts)
    path = Path(model)
    if not path.exists():
        if os.sep in model or model.startswith("."):
            raise L4Error(f"model path '{model}' does not exist; give a checkpoint directory or a preset")
        get_preset(model)  # raises: unknown preset, listing the known ones
    if not path.is_dir():
        raise L4Error(f"'{model}' is not a directory; give a checkpoint directory (config.json + *.safetensors)")
    if layers is not None:
        raise L4Error("--layers applies to presets only; a checkpoint's layer count comes from its config.json")
    cfg = read_config(path)
    text_cfg = text_config_from_dict(cfg)
    multimodal = cfg.get("model_type") == "llama4"
    source = {"kind": "checkpoint", "path": str(path.resolve()), "model_type": cfg["model_type"]}
    if preset_name is not None:
        source["preset"] = preset_name
    if stream and not meta:
        if vision and vision_configs(cfg) is not None:
            raise L4Error(STREAM_VISION)
        lm = build_model(text_cfg, seed=seed, dtype=dtype, meta=True)
        where = index_safetensors(path, lm, multimodal=multimodal)
        files = CheckpointWeights({key: loc for (part, key), loc in where.items() if part == "text"})
        return LoadedModel(lm, source, None, Overlay((computed_buffers(text_cfg), files)))
    if not meta:   # float32 model + float32 state dict, counted on meta before anything is allocated
        check_memory(str(path), _numel(build_model(text_cfg, seed=seed, dtype="float32", meta=True)) * 8, "cpu")
    lm = build_model(text_cfg, seed=seed, dtype="float32", meta=meta)
    vis_cfgs = vision_configs(cfg) if vision and not meta else None
    parts = None
    if vis_cfgs is not None:
        full, vcfg = vis_cfgs
        parts = VisionParts(build_vision(full, seed=seed), vcfg, image_tokens(path, full, text_cfg.vocab_size),
                            image_spec(path, vcfg))
    if not meta:
        state, vstate = load_safetensors(path, lm, multimodal=multimodal,
                                         vision=parts.module if parts is not None else None)
        lm.load_state_dict(state, strict=True)
        lm = lm.to(device=device, dtype=torch_dtype(dtype)).eval()
        if parts is not None:
            parts.module.load_state_dict(vstate, strict=True)
            cast_real(parts.module, device, dtype)
    return LoadedModel(lm, source, parts)


def _read_header(f: Path) -> tuple[dict[str, Any], int]:
    """Parse a safetensors header without trusting it: (header, data bytes available)."""
    size = f.stat().st_size
    with f.open("rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise L4Error(f"{f} is truncated: no safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > 100 * 2**20:
            raise L4Error(f"{f} is truncated or not a safetensors file (header of {n} bytes, file of {size})")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise L4Error(f"{f} has a corrupt safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise L4Error(f"{f} has a corrupt safetensors header")
    header.pop("__metadata__", None)
    return header, size - 8 - n


def _checkpoint_name(name: str, multimodal: bool) -> tuple[str, str]:
    """Checkpoint tensor name -> ("text", Llama4ForCausalLM parameter name) or ("vision", VisionHarness name)."""
    if not multimodal:
        return "text", name
    for prefix in ("language_model.", "model.language_model."):
        if name.startswith(prefix):
            rest = name[len(prefix):]
            return "text", rest if rest.startswith(("model.", "lm_head.")) else "model." + rest
    if name.startswith("lm_head."):
        return "text", name
    rest = name[len("model."):] if name.startswith("model.") else name
    return "vision", rest   # vision_model.* / multi_modal_projector.*


def index_safetensors(ckpt: Path, lm: torch.nn.Module, *, multimodal: bool, vision: torch.nn.Module | None = None
                      ) -> dict[tuple[str, str], tuple[Path, str]]:
    """Validate every tensor's presence, shape and byte range against ``lm`` (and ``vision``, the VisionHarness
    of a multimodal checkpoint; its tensors are skipped without one); reads headers only (``lm`` may be on meta).
    -> {("text"|"vision", parameter name): (file, tensor name)}; a tied lm_head maps to the embedding."""
    files = sorted(ckpt.glob("*.safetensors"))
    if not files:
        pickles = [p.name for p in ckpt.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
        hint = f" (found {', '.join(pickles)}: l4compile never unpickles weights; convert to safetensors)" \
            if pickles else ""
        raise L4Error(f"{ckpt} has no *.safetensors weights{hint}")
    expected = {("text", k): tuple(v.shape) for k, v in lm.state_dict().items()}
    if vision is not None:
        expected.update({("vision", k): tuple(v.shape) for k, v in vision.state_dict().items()})
    where: dict[tuple[str, str], tuple[Path, str]] = {}
    for f in files:
        header, data_bytes = _read_header(f)
        for name, info in header.items():
            try:
                begin, end = info["data_offsets"]
                shape, dt = list(info["shape"]), info["dtype"]
            except (KeyError, TypeError, ValueError):
                raise L4Error(f"tensor '{name}' in {f.name} has a corrupt header entry") from None
            if end > data_bytes:
                raise L4Error(f"tensor '{name}' in {f.name} is truncated (needs bytes up to {end}, "
                              f"the file holds {data_bytes}); re-save or re-download the checkpoint")
            if dt.startswith("F8"):
                raise L4Error(f"tensor '{name}' in {f.name} is pre-quantized ({dt}); l4compile loads unquantized "
                              f"checkpoints for now: use the bf16 checkpoint and --quant")
            numel = 1
            for d in shape:
                numel *= d
            if dt in _ST_DTYPES and end - begin != numel * _ST_DTYPES[dt]:
                raise L4Error(f"tensor '{name}' in {f.name} is corrupt: {end - begin} bytes for shape {shape} {dt}")
            target = _checkpoint_name(name, multimodal)
            if target[0] == "vision" and vision is None:
                continue   # a text-only compile of a multimodal checkpoint
            if target not in expected:
                raise L4Error(f"tensor '{name}' in {f.name} does not belong to a Llama 4 model with this config.json")
            if tuple(shape) != expected[target]:
                raise L4Error(f"tensor '{name}' in {f.name} has shape {shape}, but config.json implies "
                              f"{list(expected[target])}")
            where[target] = (f, name)
    tied = getattr(lm.config, "tie_word_embeddings", False)
    missing = [k[1] for k in expected if k not in where and not (tied and k == ("text", "lm_head.weight"))]
    if missing:
        raise L4Error(f"checkpoint {ckpt} lacks tensor '{missing[0]}'"
                      + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    if tied and ("text", "lm_head.weight") not in where:
        where[("text", "lm_head.weight")] = where[("text", "model.embed_tokens.weight")]
    return where


def load_safetensors(ckpt: Path, lm: torch.nn.Module, *, multimodal: bool, vision: torch.nn.Module | None = None
                     ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``index_safetensors``, then load every tensor as float32 -> (text, vision) state dicts."""
    from safetensors import SafetensorError, safe_open

    where = index_safetensors(ckpt, lm, multimodal=multimodal, vision=vision)
    states: dict[str, dict[str, torch.Tensor]] = {"text": {}, "vision": {}}
    by_file: dict[Path, list[tuple[tuple[str, str], str]]] = {}
    for target, (f, name) in where.items():
        by_file.setdefault(f, []).append((target, name))
    for f, items in by_file.items():
        try:
            with safe_open(str(f), framework="pt") as fh:
                for (part, key), name in items:
                    states[part][key] = fh.get_tensor(name).to(torch.float32)
        except SafetensorError as e:
            raise L4Error(f"cannot read {f}: {e}") from None
    return states["text"], states["vision"]
