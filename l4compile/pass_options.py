"""Options for the passes of one compile (``--pass-option PASS.KEY=VALUE``, ``compile(pass_options=...)``), checked
against each pass's frozen options dataclass before anything is traced:

    {"quantize": {"quantize_lm_head": True, "group_size": 64}, "kv_cache": {"ring_buffers": False}}

Every pass named must run in this compile (a registered, not skipped pass, or a ``--pass`` user pass) and take
options; every key must be a field of its options class; a value must have the field's annotated type (bool, int,
float, str, tuple, or one of them | None; other annotations are not checked). Bad input is one ``L4Error``."""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any

from l4compile.errors import L4Error

TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
              tuple: "a tuple ([..] on the command line)", type(None): "null"}


def type_words(allowed: tuple[type, ...]) -> str:
    """``(int, NoneType)`` -> "an integer or null", for an error message."""
    return " or ".join(TYPE_WORDS[t] for t in allowed)


def parse_cli(items: list[str]) -> dict[str, dict[str, Any]]:
    """``["quantize.group_size=64", ...]`` -> ``{"quantize": {"group_size": 64}}``. VALUE is read as JSON where it
    parses (true, false, null, 64, 0.5, [1, 2]), else taken as a string (``quantize.scheme=int4``)."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, eq, raw = item.partition("=")
        name, dot, field = key.partition(".")
        if not (eq and dot and name and field):
            raise L4Error(f"--pass-option '{item}': expected PASS.KEY=VALUE, e.g. --pass-option quantize.group_size=64")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        if isinstance(value, list):
            value = tuple(value)
        if field in out.setdefault(name, {}):
            raise L4Error(f"--pass-option {name}.{field} is given twice")
        out[name][field] = value
    return out


def check(pass_options: dict[str, dict[str, Any]], specs: list, known: dict) -> None:
    """``specs``: the passes this compile runs (any program kind); ``known``: every registered pass."""
    if not isinstance(pass_options, dict) or not all(isinstance(o, dict) for o in pass_options.values()):
        raise L4Error(f"pass_options must map pass names to dicts of options, got {pass_options!r}")
    running = {s.name: s for s in specs}
    for name, opts in pass_options.items():
        spec = running.get(name)
        if spec is None:
            why = "is skipped or does not run in this compile" if name in known else "is not a registered pass"
            raise L4Error(f"pass option for '{name}': '{name}' {why}; passes that run: {', '.join(sorted(running))}")
        build(spec, opts)


def build(spec, opts: dict[str, Any]) -> Any:
    """``spec``'s options dataclass made from ``opts`` (None for a pass without options, given none); L4Error where
    ``opts`` does not fit it (a key it lacks, a value of another type)."""
    if spec.options is None:
        if opts:
            raise L4Error(f"pass '{spec.name}' takes no options (got {', '.join(sorted(opts))})")
        return None
    fields = [f.name for f in dataclasses.fields(spec.options)]
    try:
        hints = typing.get_type_hints(spec.options)
    except Exception:                      # a user pass's annotations that do not resolve: keys checked, not types
        hints = {}
    for key, value in opts.items():
        if key not in fields:
            raise L4Error(f"options for pass '{spec.name}': no option '{key}'; its options: {', '.join(fields)}")
        allowed = allowed_types(hints.get(key))
        if allowed is not None and not is_instance(value, allowed):
            raise L4Error(f"pass option {spec.name}.{key} must be {type_words(allowed)}, got {value!r}")
    try:
        return spec.options(**opts)
    except TypeError as e:                 # e.g. a field without a default that was not given
        raise L4Error(f"options for pass '{spec.name}': {e}") from None


def allowed_types(hint: Any) -> tuple[type, ...] | None:
    """The plain types an annotation admits, or None where it is not one this module checks."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        parts = [allowed_types(a) for a in typing.get_args(hint)]
        return None if any(p is None for p in parts) else tuple(t for p in parts for t in p)
    hint = typing.get_origin(hint) or hint
    return (hint,) if hint in TYPE_WORDS else None


def is_instance(value: Any, allowed: tuple[type, ...]) -> bool:
    if isinstance(value, bool):
        return bool in allowed
    if isinstance(value, int) and float in allowed:
        return True
    return isinstance(value, allowed)


def engine_contradiction(given: dict[str, dict[str, Any]], manifest: dict, known: dict) -> tuple[str, str] | None:
    """The first of ``given`` (checked options) that an engine was not compiled with: ``("PASS.KEY=VALUE", how the
    engine differs)``; None where they all agree. An option the engine's compile_config does not record had its
    pass's default (``known``: the registered passes); an option for a pass the engine did not run contradicts."""
    ran = {p["name"] for p in manifest.get("passes", ())}
    recorded = {name: dict(opts) for name, opts in manifest["compile_config"].get("pass_options", ())}
    for name, opts in given.items():
        spec = known.get(name)
        defaults = {f.name: f for f in dataclasses.fields(spec.options)} if spec and spec.options else {}
        for key, value in opts.items():
            option = f"{name}.{key}={json.dumps(value, default=repr)}"
            if name not in ran:
                return option, f"which did not run pass '{name}'"
            if key in recorded.get(name, {}):
                was = recorded[name][key]
            elif key in defaults:
                was = field_default(defaults[key])
            else:
                return option, f"which records no value for {name}.{key}"
            if _plain(value) != _plain(was):   # values of checked types: 1 == 1.0 is the same setting
                return option, f"compiled with {name}.{key}={json.dumps(was, default=repr)}"
    return None


def field_default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _plain(value: Any) -> Any:   # a manifest's JSON form: tuples are lists
    return json.loads(json.dumps(value, default=repr))
