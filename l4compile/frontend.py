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

TEXT_MODEL_TYPES = ("llama4_text", "llama4")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ST_DTYPES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
              "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass
class LoadedModel:
    model: torch.nn.Module          # Llama4ForCausalLM, eval mode
    source: dict[str, Any]          # {"kind": "preset"|"checkpoint", ...}


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


def is_checkpoint_arg(model: str) -> bool:
    return model not in PRESETS


def read_config(ckpt: Path) -> dict[str, Any]:
    cfg_path = ckpt / "config.json"
    if not cfg_path.is_file():
        raise L4Error(f"{ckpt} has no config.json; give a Hugging Face Llama 4 checkpoint directory or a preset")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise L4Error(f"cannot read {cfg_path}: {e}") from None
    if not isinstance(cfg, dict):
        raise L4Error(f"{cfg_path} is not a JSON object")
    mt = cfg.get("model_type")
    if mt not in TEXT_MODEL_TYPES:
        raise L4Error(f"{ckpt} holds a model of type '{mt}'; l4compile compiles Llama 4 checkpoints "
                      f"(model_type one of: {', '.join(TEXT_MODEL_TYPES)})")
    return cfg


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


def load(model: str, *, dtype: str = "float32", device: str = "cpu", seed: int = 0, layers: int | None = None,
         meta: bool = False) -> LoadedModel:
    """Resolve MODEL to an eval-mode Llama4ForCausalLM."""
    preset_name = None
    if model in PRESETS and get_preset(model).checkpoint is not None:   # trained preset: a packaged checkpoint
        preset_name, model = model, str(get_preset(model).checkpoint_dir())
        if layers is not None:
            raise L4Error(f"--layers does not apply to preset '{preset_name}' (trained weights, fixed layers)")
    if model in PRESETS:
        preset = get_preset(model)
        text_cfg = text_config_from_dict(dict(preset.text_config_kwargs(layers), model_type="llama4_text"))
        lm = build_model(text_cfg, seed=seed, dtype=dtype, device=device, meta=meta,
                         expert_init_std=preset.expert_init_std)
        return LoadedModel(lm, {"kind": "preset", "name": model, "seed": seed, "layers": layers})
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
    lm = build_model(text_cfg, seed=seed, dtype="float32", meta=meta)
    if not meta:
        state = load_safetensors(path, lm, multimodal=cfg.get("model_type") == "llama4")
        lm.load_state_dict(state, strict=True)
        lm = lm.to(device=device, dtype=torch_dtype(dtype)).eval()
    source = {"kind": "checkpoint", "path": str(path.resolve()), "model_type": cfg["model_type"]}
    if preset_name is not None:
        source["preset"] = preset_name
    return LoadedModel(lm, source)


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


def _checkpoint_name(name: str, multimodal: bool) -> str | None:
    """Checkpoint tensor name -> Llama4ForCausalLM parameter name (None: not part of the text model)."""
    if not multimodal:
        return name
    for prefix in ("language_model.", "model.language_model."):
        if name.startswith(prefix):
            rest = name[len(prefix):]
            return rest if rest.startswith(("model.", "lm_head.")) else "model." + rest
    if name.startswith("lm_head."):
        return name
    return None  # vision tower / projector: not used by the text engine


def load_safetensors(ckpt: Path, lm: torch.nn.Module, *, multimodal: bool) -> dict[str, torch.Tensor]:
    """Validate every tensor's presence, shape and byte range against ``lm``, then load them."""
    from safetensors import SafetensorError, safe_open

    files = sorted(ckpt.glob("*.safetensors"))
    if not files:
        pickles = [p.name for p in ckpt.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
        hint = f" (found {', '.join(pickles)}: l4compile never unpickles weights; convert to safetensors)" \
            if pickles else ""
        raise L4Error(f"{ckpt} has no *.safetensors weights{hint}")
    expected = {k: tuple(v.shape) for k, v in lm.state_dict().items()}
    where: dict[str, tuple[Path, str]] = {}
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
            if target is None:
                continue
            if target not in expected:
                raise L4Error(f"tensor '{name}' in {f.name} does not belong to a Llama 4 model with this config.json")
            if tuple(shape) != expected[target]:
                raise L4Error(f"tensor '{name}' in {f.name} has shape {shape}, but config.json implies "
                              f"{list(expected[target])}")
            where[target] = (f, name)
    tied = getattr(lm.config, "tie_word_embeddings", False)
    missing = [k for k in expected if k not in where and not (tied and k == "lm_head.weight")]
    if missing:
        raise L4Error(f"checkpoint {ckpt} lacks tensor '{missing[0]}'"
                      + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    state: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for target, (f, name) in where.items():
        by_file.setdefault(f, []).append((target, name))
    for f, items in by_file.items():
        try:
            with safe_open(str(f), framework="pt") as fh:
                for target, name in items:
                    state[target] = fh.get_tensor(name).to(torch.float32)
        except SafetensorError as e:
            raise L4Error(f"cannot read {f}: {e}") from None
    if tied and "lm_head.weight" not in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return state
