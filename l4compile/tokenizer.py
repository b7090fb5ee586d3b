"""Text in and out of an engine: the checkpoint's tokenizer and its end-of-sequence ids, carried in the engine.

At compile, a checkpoint's ``tokenizer.json`` (the Hugging Face ``tokenizers`` format every Llama 4 release ships)
is checked and copied to ``tokenizer/tokenizer.json`` in the engine, checksummed like every artifact; the manifest's
``generation`` records the ids a sequence ends at, as transformers' ``generate`` reads them: ``eos_token_id`` of
``generation_config.json``, else of ``config.json`` (its ``text_config`` for a multimodal checkpoint). Random-weight
presets have neither. Running an engine needs the ``tokenizers`` package only, not transformers.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from l4compile.errors import L4Error

TOKENIZER_FILE = "tokenizer.json"
ENGINE_TOKENIZER = "tokenizer/tokenizer.json"      # inside the engine directory


def _load(path: Path):
    try:
        from tokenizers import Tokenizer
    except ImportError:   # transformers depends on it; a runtime-only install may lack it
        raise L4Error("text prompts need the tokenizers package: pip install tokenizers") from None
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:   # the Rust side raises its own exception types for every kind of bad file
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise L4Error(f"cannot read the tokenizer {path}: {first}") from None


def _ids(value: Any, vocab_size: int, where: str) -> list[int]:
    """An ``eos_token_id`` field (int, list of ints or null) -> its ids, checked against the vocabulary."""
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    for t in items:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
            raise L4Error(f"{where}: eos_token_id {t!r} is not a token id of this model (vocabulary "
                          f"[0, {vocab_size})); fix or remove it")
    return list(dict.fromkeys(items))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise L4Error(f"cannot read {path}: {e}") from None
    if not isinstance(doc, dict):
        raise L4Error(f"{path} is not a JSON object")
    return doc


def generation_settings(ckpt: Path | None, vocab_size: int) -> dict[str, Any]:
    """-> {"eos_token_ids": [...], "pad_token_id": int | None, "source": file name | None} for the manifest."""
    none = {"eos_token_ids": [], "pad_token_id": None, "source": None}
    if ckpt is None:
        return none
    for name in ("generation_config.json", "config.json"):
        f = ckpt / name
        if not f.is_file():
            continue
        doc = _read_json(f)
        if name == "config.json" and isinstance(doc.get("text_config"), dict):
            doc = doc["text_config"]
        if "eos_token_id" not in doc:
            continue
        pad = doc.get("pad_token_id")
        pad = pad if isinstance(pad, int) and not isinstance(pad, bool) and 0 <= pad < vocab_size else None
        return {"eos_token_ids": _ids(doc["eos_token_id"], vocab_size, str(f)), "pad_token_id": pad, "source": name}
    return none


def find_tokenizer(ckpt: Path | None, vocab_size: int) -> Path | None:
    """The checkpoint's tokenizer.json, checked to load and to fit the model's vocabulary; None when it has none."""
    src = ckpt / TOKENIZER_FILE if ckpt is not None else None
    if src is None or not src.is_file():
        return None
    n = _load(src).get_vocab_size(with_added_tokens=True)
    if n > vocab_size:
        raise L4Error(f"{src} has {n} tokens, more than the model's vocabulary of {vocab_size}: it is not this "
                      "checkpoint's tokenizer")
    return src


def copy_tokenizer(src: Path | None, engine_dir: Path) -> list[str]:
    """``find_tokenizer``'s file into ``engine_dir`` -> the artifact paths written ([] for None)."""
    if src is None:
        return []
    dst = engine_dir / ENGINE_TOKENIZER
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return [ENGINE_TOKENIZER]


class EngineTokenizer:
    """The engine's tokenizer: ``encode(text)`` -> ids (with the special tokens the tokenizer adds, e.g. Llama 4's
    ``<|begin_of_text|>``), ``decode(ids)`` -> text (special tokens left out unless asked)."""

    def __init__(self, path: Path):
        self.path = path
        self._tok = _load(path)

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise L4Error(f"the prompt must be a string, got {type(text).__name__}")
        ids = self._tok.encode(text).ids
        if not ids:
            raise L4Error("the prompt encodes to no tokens; give some text")
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
