"""What Inductor copies of l4compile's Triton kernels into an engine's generated code.

Inductor writes a user-defined Triton kernel into the engine as text: the kernel's source, then every JIT function
it calls (their sources) and every int / str / constexpr global they read (as ``name = tl.constexpr(repr(value))``),
all inside one ''' string literal of the generated module. torch 2.11 (the lent GPU hosts' build) does not escape
that literal, so a backslash anywhere in the copied text is read as an escape: a newline in the PTX of
``int4_mm._UNPACK_BF16X2`` became a SyntaxError that stopped every Int4 CUDA engine's compile there (found by
``benchmarks/aoti_sm90.py`` under torch 2.11.0 + triton 3.6.0; 2.13 escapes it)."""
from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest


def _jit_functions():
    """Every Triton JIT function defined in the l4compile.kernels modules, as (qualified name, function)."""
    from l4compile.kernels import why_unavailable

    if why_unavailable():
        pytest.skip(why_unavailable())
    import l4compile.kernels as pkg
    from triton.runtime.jit import JITFunction

    try:
        from triton.runtime.interpreter import InterpretedFunction
        kinds: tuple[type, ...] = (JITFunction, InterpretedFunction)
    except ImportError:
        kinds = (JITFunction,)
    found = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        for name, obj in vars(mod).items():
            if isinstance(obj, kinds) and obj.fn.__module__ == mod.__name__:
                found[f"{mod.__name__}.{name}"] = obj
    return found, kinds


def _src(fn) -> str:
    """A JIT function's source as Inductor copies it (``.src``; the interpreter's functions have none)."""
    return getattr(fn, "src", None) or inspect.getsource(fn.fn)


def _copied_text(fn, kinds) -> dict[str, str]:
    """What Inductor's traversal of ``fn`` copies: {symbol: text}, the function's own source included."""
    from triton.language import constexpr

    out, todo = {fn.fn.__name__: _src(fn)}, [fn]
    while todo:
        cur = todo.pop()
        for name in cur.fn.__code__.co_names:
            sym = cur.fn.__globals__.get(name)
            if name in out or sym is None:
                continue
            if isinstance(sym, kinds):
                out[name] = _src(sym)
                todo.append(sym)
            elif isinstance(sym, constexpr):
                out[name] = f"{name} = tl.constexpr({sym.value!r})"
            elif isinstance(sym, (int, str, bool)):
                out[name] = f"{name} = {sym!r}"
    return out


def test_kernel_text_copied_into_engines_has_no_backslash():
    functions, kinds = _jit_functions()
    assert {"l4compile.kernels.int4_mm.int4_mm_kernel", "l4compile.kernels.moe_int4_gate_up.moe_int4_gate_up_kernel",
            "l4compile.kernels.attention.attention_partial_kernel"} <= set(functions)
    copied = {}
    for qual, fn in functions.items():
        for sym, text in _copied_text(fn, kinds).items():
            copied[f"{qual}: {sym}"] = text
    assert any(k.endswith(": _UNPACK_BF16X2") for k in copied)          # the traversal reaches the PTX constant
    bad = sorted(k for k, text in copied.items() if "\\" in text)
    assert not bad, f"backslashes in text Inductor copies unescaped under torch 2.11: {bad}"
