"""Inductor settings for one compile (``--inductor-config KEY=VALUE``, ``compile(inductor_configs=...)``), handed to
AOTInductor over l4compile's own (``backends.inductor.AOTI_CONFIGS``) and recorded in the manifest's compile_config:

    {"max_autotune": True, "combo_kernels": True}                       # CUDA engines: slower compile, faster steps
    {"cpp.simdlen": 0, "aot_inductor.compile_wrapper_opt_level": "O0"}  # CPU engines: ~35% quicker AOTI compile

A key must name a ``torch._inductor.config`` setting of this torch; a value must be what the setting's annotation
in that module admits where it is plain (``cpp.simdlen: int | None``; a ``Literal[...]`` setting takes one of its
values), else of its default's type (bool, int, float or str; other settings, e.g. callables and containers, are not
type-checked); an integer given for a float setting is kept as a float, as ``torch.compile(options=...)`` wants it.
The keys that decide the package's layout (``aot_inductor.package*``, ``aot_inductor.output_path``) belong to
l4compile and are refused. Bad input is one ``L4Error``.

``parity`` and ``bench`` take the same settings: for the Inductor engines they compile, and (bench) for the
``torch-compile`` baseline, so both sides of a comparison are built alike."""
from __future__ import annotations

import ast
import json
import typing
from typing import Any

from l4compile.errors import L4Error
from l4compile.pass_options import allowed_types, is_instance, type_words

_OWNED_PREFIXES = ("aot_inductor.package", "aot_inductor.output_path")
_CHECKED_KINDS = (bool, int, float, str)   # the plain types whose values are type-checked


def parse_value(raw: str) -> Any:
    """A command-line VALUE: JSON where it parses (true, 0, 0.5), else a Python literal (True, 'O0'), else the string
    itself (O0)."""
    try:
        return json.loads(raw)
    except ValueError:
        pass
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return raw


def parse_cli(items: list[str]) -> dict[str, Any]:
    """``["cpp.simdlen=0", "max_autotune=true"]`` -> ``{"cpp.simdlen": 0, "max_autotune": True}`` (not yet checked
    against Inductor: ``check``)."""
    out: dict[str, Any] = {}
    for item in items:
        key, eq, raw = item.partition("=")
        if not (eq and key):
            raise L4Error(f"--inductor-config '{item}': expected KEY=VALUE, e.g. --inductor-config max_autotune=true")
        if key in out:
            raise L4Error(f"--inductor-config {key} is given twice")
        out[key] = parse_value(raw)
    return out


def check(configs: dict[str, Any] | None, backend: str) -> tuple[tuple[str, Any], ...]:
    """``configs`` checked against this torch's Inductor settings; returns them sorted, as CompileConfig keeps them."""
    if not configs:
        return ()
    if not isinstance(configs, dict) or not all(isinstance(k, str) for k in configs):
        raise L4Error(f"inductor_configs must map Inductor setting names to values, got {configs!r}")
    if backend != "inductor":
        raise L4Error(f"--inductor-config applies to --backend inductor only; this compile uses {backend}")
    import torch
    import torch._inductor.config as inductor_config

    defaults = inductor_config.get_config_copy()
    checked = {}
    for key, value in configs.items():
        if key.startswith(_OWNED_PREFIXES):
            raise L4Error(f"--inductor-config {key}: l4compile sets it (the engine's package layout depends on it)")
        if key not in defaults:
            near = sorted(k for k in defaults if k.split(".")[-1] == key.split(".")[-1])
            hint = f"; did you mean {near[0]}?" if near else "; see torch/_inductor/config.py for the settings"
            raise L4Error(f"--inductor-config {key}: not an Inductor setting of torch {torch.__version__}{hint}")
        entry = getattr(inductor_config, "_config", {}).get(key)      # torch's record of the setting's annotation
        hint = getattr(entry, "value_type", None)
        want = _refusal(value, hint, defaults[key])
        if want is not None:
            raise L4Error(f"--inductor-config {key} must be {want} (its default is {defaults[key]!r}), got {value!r}")
        kinds = allowed_types(hint) or (type(defaults[key]),)
        checked[key] = float(value) if type(value) is int and float in kinds and int not in kinds else value
    return tuple(sorted(checked.items()))


def engine_contradiction(given: tuple[tuple[str, Any], ...], recorded) -> tuple[str, Any, Any] | None:
    """The first of ``given`` (``check``'s output) that an engine was not compiled with: ``(key, given value, the
    engine's value)``; None where they all agree. ``recorded``: the manifest's compile_config ``inductor_configs``
    (pairs); a setting it lacks had this torch's default."""
    if not given:
        return None
    import torch._inductor.config as inductor_config

    engine = {k: v for k, v in recorded or ()}
    defaults = inductor_config.get_config_copy()
    for key, value in given:
        was = engine.get(key, defaults.get(key))
        if _canonical(value) != _canonical(was):
            return key, value, was
    return None


def _canonical(value: Any) -> str:   # JSON form: True != 1, 1.0 != 1, a tuple == the list a manifest holds
    return json.dumps(value, sort_keys=True, default=repr)


def _refusal(value: Any, hint: Any, default: Any) -> str | None:
    """What a setting annotated ``hint`` (None: not recorded) with ``default`` must be, in words, where ``value`` is
    not that; None where it fits or the setting's type is not one checked here."""
    if typing.get_origin(hint) is typing.Literal:
        choices = typing.get_args(hint)
        if any(type(value) is type(c) and value == c for c in choices):
            return None
        return "one of " + ", ".join(repr(c) for c in choices)
    allowed = allowed_types(hint) if hint is not None else None
    if allowed is None or allowed == (type(None),) or not all(t in (*_CHECKED_KINDS, type(None)) for t in allowed):
        allowed = (type(default),) if type(default) in _CHECKED_KINDS else None     # the default's type, as before
    if allowed is None or is_instance(value, allowed):
        return None
    return type_words(allowed)
