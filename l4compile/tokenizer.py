"""Text in and out of an engine: the checkpoint's tokenizer, chat template and end-of-sequence ids, carried in it.

At compile (``text_assets``, checked before the backend's long build), a checkpoint's ``tokenizer.json`` (the
Hugging Face ``tokenizers`` format every Llama 4 release ships) must load and fit the model's vocabulary; its chat
template (``chat_template.jinja``, else ``chat_template.json``, else ``tokenizer_config.json``'s ``chat_template``,
as transformers looks for it) must render a one-message conversation. Both are written under ``tokenizer/`` in the
engine, checksummed like every artifact. The manifest's ``generation`` records the ids a sequence ends at, as
transformers' ``generate`` reads them: ``eos_token_id`` of ``generation_config.json``, else of ``config.json`` (its
``text_config`` for a multimodal checkpoint). Random-weight presets have none of these. Encoding and decoding need
the ``tokenizers`` package; rendering a chat template uses transformers' own sandboxed renderer, so a conversation
becomes exactly the ids ``apply_chat_template`` gives.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from l4compile.errors import L4Error
from l4compile.frontend import read_json_object

TOKENIZER_FILE = "tokenizer.json"
ENGINE_TOKENIZER = "tokenizer/tokenizer.json"      # inside the engine directory
ENGINE_CHAT_TEMPLATE = "tokenizer/chat_template.jinja"
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")   # the names a chat template may use


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


def generation_settings(ckpt: Path | None, vocab_size: int) -> dict[str, Any]:
    """-> {"eos_token_ids": [...], "pad_token_id": int | None, "source": file name | None} for the manifest."""
    none = {"eos_token_ids": [], "pad_token_id": None, "source": None}
    if ckpt is None:
        return none
    for name in ("generation_config.json", "config.json"):
        f = ckpt / name
        if not f.is_file():
            continue
        doc = read_json_object(f)
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


@dataclass(frozen=True)
class ChatTemplate:
    """A checkpoint's chat template and the special-token strings it renders with (``bos_token``...)."""

    text: str
    source: str                          # the checkpoint file it came from
    special_tokens: dict[str, str]

    def render(self, messages: list[dict[str, Any]]) -> str:
        """[{"role": ..., "content": ...}, ...] -> the prompt text, with the assistant's header appended."""
        try:
            from transformers.utils.chat_template_utils import render_jinja_template
        except ImportError:
            raise L4Error("chat prompts need transformers (its sandboxed template renderer): pip install "
                          "transformers") from None
        try:
            (text,), _ = render_jinja_template(conversations=[messages], chat_template=self.text,
                                               add_generation_prompt=True, **self.special_tokens)
        except Exception as e:   # jinja2's TemplateError / SecurityError, the template's raise_exception, bad data
            first = (str(e).splitlines() or [type(e).__name__])[0]
            raise L4Error(f"the chat template ({self.source}) failed on this conversation: {first}") from None
        return text


def _token_text(value: Any) -> str | None:
    """A tokenizer_config.json special token: a string or an AddedToken dict {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def find_chat_template(ckpt: Path | None) -> ChatTemplate | None:
    """The checkpoint's chat template, where transformers looks for it, checked to render a one-message
    conversation; None when it has none."""
    if ckpt is None:
        return None
    config = read_json_object(ckpt / "tokenizer_config.json") if (ckpt / "tokenizer_config.json").is_file() else {}
    text, source = None, None
    if (ckpt / "chat_template.jinja").is_file():
        try:
            text, source = (ckpt / "chat_template.jinja").read_text(), "chat_template.jinja"
        except (OSError, UnicodeDecodeError) as e:
            raise L4Error(f"cannot read {ckpt / 'chat_template.jinja'}: {e}") from None
    elif (ckpt / "chat_template.json").is_file():
        text, source = read_json_object(ckpt / "chat_template.json").get("chat_template"), "chat_template.json"
    elif "chat_template" in config:
        text, source = config["chat_template"], "tokenizer_config.json"
        if isinstance(text, list):   # named templates: the default one
            text = next((t.get("template") for t in text if isinstance(t, dict) and t.get("name") == "default"), None)
    if text is None:
        return None
    if not isinstance(text, str) or not text.strip():
        raise L4Error(f"{ckpt / source}: the chat template is not a non-empty string")
    special = {k: v for k in SPECIAL_TOKENS if (v := _token_text(config.get(k))) is not None}
    chat = ChatTemplate(text, source, special)
    chat.render([{"role": "user", "content": "Hello"}])
    return chat


@dataclass(frozen=True)
class TextAssets:
    """What an engine carries for text: tokenizer file, chat template, end-of-sequence ids."""

    tokenizer: Path | None
    chat: ChatTemplate | None
    generation: dict[str, Any]

    def write(self, engine_dir: Path) -> tuple[list[str], dict[str, Any]]:
        """-> (artifact paths written into ``engine_dir``, the manifest's tokenizer / chat_template / generation)."""
        files, chat = [], None
        if self.tokenizer is not None:
            (engine_dir / ENGINE_TOKENIZER).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.tokenizer, engine_dir / ENGINE_TOKENIZER)
            files.append(ENGINE_TOKENIZER)
            if self.chat is not None:
                (engine_dir / ENGINE_CHAT_TEMPLATE).write_text(self.chat.text)
                files.append(ENGINE_CHAT_TEMPLATE)
                chat = {"path": ENGINE_CHAT_TEMPLATE, "source": self.chat.source,
                        "special_tokens": self.chat.special_tokens}
        return files, {"tokenizer": ENGINE_TOKENIZER if self.tokenizer else None, "chat_template": chat,
                       "generation": self.generation}


def text_assets(ckpt: Path | None, vocab_size: int) -> TextAssets:
    """The checkpoint's tokenizer, chat template (only with a tokenizer: it renders text) and end-of-sequence ids,
    each checked; L4Error naming the file otherwise."""
    tok = find_tokenizer(ckpt, vocab_size)
    return TextAssets(tok, find_chat_template(ckpt) if tok is not None else None,
                      generation_settings(ckpt, vocab_size))


class EngineTokenizer:
    """The engine's tokenizer: ``encode(text)`` -> ids (with the special tokens the tokenizer adds, e.g. Llama 4's
    ``<|begin_of_text|>``), ``decode(ids)`` -> text (special tokens left out unless asked), ``chat(messages)`` -> the
    ids of the conversation through the checkpoint's chat template (as transformers' ``apply_chat_template``)."""

    def __init__(self, path: Path, chat: ChatTemplate | None = None):
        self.path = path
        self.chat_template = chat
        self._tok = _load(path)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise L4Error(f"the prompt must be a string, got {type(text).__name__}")
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        if not ids:
            raise L4Error("the prompt encodes to no tokens; give some text")
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def chat(self, messages: list[dict[str, Any]]) -> list[int]:
        """A conversation [{"role", "content"}, ...] -> prompt ids ending in the assistant's header. The template
        writes the special tokens itself, so the tokenizer adds none."""
        if self.chat_template is None:
            raise L4Error("this engine has no chat template (its checkpoint had none): give the prompt as plain text")
        return self.encode(self.chat_template.render(messages), add_special_tokens=False)

    @classmethod
    def of_engine(cls, engine_dir: Path, manifest: dict[str, Any]) -> "EngineTokenizer":
        """The tokenizer (and chat template) an engine's manifest names; L4Error for an engine without one."""
        rel = manifest.get("tokenizer")
        if not rel:
            raise L4Error(f"engine {engine_dir} has no tokenizer (its checkpoint had no tokenizer.json; presets have "
                          "none): give token ids")
        c = manifest.get("chat_template")
        chat = None if not c else ChatTemplate((engine_dir / c["path"]).read_text(), c["source"],
                                               dict(c["special_tokens"]))
        return cls(engine_dir / rel, chat)
