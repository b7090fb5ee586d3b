"""Memoize torch's analysis of which arguments a Triton kernel reads and writes, for l4compile's own kernels.

Every trace of a ``wrap_triton`` call (torch.export, ``run_decompositions``, AOTInductor's own export, Inductor's
lowering) asks ``torch._higher_order_ops.triton_kernel_wrap.identify_accessed_tensors`` (``identify_mutated_tensors``
in older torch) which tensor arguments the kernel writes. Each answer generates the kernel's TTIR from its Python
source and walks it: ~0.1 s for the fused MoE kernels, once per call site per trace (4 traces under torch 2.13).
Full Scout (48 layers, 7 launches a layer) asked 1344 times for 9 distinct answers. With the memo, AOTInductor's
CUDA code generation of bench-scout at 48 layers (``benchmarks/aoti_sm90.py --preset bench-scout --layers 48``,
export included, 2-core CPU) took 198 s instead of 328 s, the wrapper byte for byte the same.

The answer is a function of what ``generate_ttir`` compiles, so that is the key: the GPU target, the kernel (an
Autotuner, which torch makes anew at each call with launch options, by its function and configs), and every
argument as the TTIR sees it. generate_ttir replaces a fake tensor (or Inductor TensorBox) by an empty tensor of its
dtype and a symbolic value by the constant 2, and passes every other value through (constexprs, and ints Triton
specialises on); a real tensor is keyed by its dtype and 16-byte alignment as well. Values that cannot be hashed skip the memo, as do
kernels defined outside ``l4compile``, calls with TMA descriptors, and calls while Triton has no active driver (a
CPU process: the analysis fails and torch assumes every tensor written). The memo holds at most ``LIMIT`` answers.

    install()      idempotent; a torch without either function is left alone (returns False)
"""
from __future__ import annotations

import sys
from typing import Any

LIMIT = 4096
_tables: list[dict[tuple, Any]] = []                                    # one memo a wrapped function
_NAMES = ("identify_accessed_tensors", "identify_mutated_tensors")     # torch 2.13 / 2.11 and before
_stats = {"hits": 0, "misses": 0}


class _Unkeyed(Exception):
    pass


def _own_kernel(kernel) -> bool:
    """Whether ``kernel`` (a JITFunction, or an Autotuner around one) is defined in l4compile."""
    fn = kernel
    for _ in range(3):
        if hasattr(fn, "fn"):
            fn = fn.fn
    return getattr(fn, "__module__", "").startswith("l4compile.")


def _arg_key(value) -> tuple:
    """What generate_ttir makes of one argument, as a hashable key."""
    import sympy
    import torch
    from torch._subclasses.fake_tensor import FakeTensor

    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool, sympy.Expr)):
        return ("sym",)
    if isinstance(value, FakeTensor):
        return ("tensor", value.dtype)
    if isinstance(value, torch.Tensor):
        return ("tensor", value.dtype, value.data_ptr() % 16 == 0)
    ir = sys.modules.get("torch._inductor.ir")
    if ir is not None and isinstance(value, ir.TensorBox):
        return ("tensor", value.dtype)
    try:
        hash(value)
    except TypeError:
        raise _Unkeyed from None
    return (type(value).__qualname__, value)


def _target():
    """The GPU target generate_ttir compiles for; None without one (its analysis then fails, and torch assumes
    every tensor argument written: an answer for this process's state, not for the kernel, so never memoized)."""
    import triton

    try:
        target = triton.runtime.driver.active.get_current_target()
        hash(target)
    except Exception:
        return None
    return target


def _kernel_key(kernel):
    """A kernel as the analysis sees it: a JITFunction itself; an Autotuner by its function and configs. Torch wraps
    a kernel launched with ``num_warps`` / ``num_stages`` (the Int4 prefill blocks, sweep candidates) in a new
    one-config Autotuner at every traced call, so its identity would miss the memo every time (bench-scout at 12
    layers: 114 analyses, 20 s, not 18)."""
    configs = getattr(kernel, "configs", None)
    if configs is None:
        return kernel
    keyed = []
    for c in configs:
        if getattr(c, "pre_hook", None) is not None:
            raise _Unkeyed
        keyed.append((tuple(sorted(c.kwargs.items())), *(getattr(c, a, None) for a in
                                                        ("num_warps", "num_stages", "num_ctas", "maxnreg"))))
    return ("autotuned", _kernel_key(kernel.fn), tuple(keyed))


def key(kernel, kwargs: dict[str, Any], *rest) -> tuple | None:
    """The memo key of one analysis, or None where it must not be memoized."""
    if any(rest) or not _own_kernel(kernel):                 # rest: TMA descriptor metadata ({} without TMA)
        return None
    target = _target()
    if target is None:
        return None
    try:
        return (target, _kernel_key(kernel), tuple(sorted((name, _arg_key(v)) for name, v in kwargs.items())))
    except (_Unkeyed, TypeError):                            # TypeError: a config value that cannot be hashed
        return None


def _memoized(analyze):
    memo: dict[tuple, Any] = {}
    _tables.append(memo)

    def memoized(kernel, kwargs, *rest, **options):
        k = None if options else key(kernel, kwargs, *rest)          # keywords: a signature this was not made for
        if k is None:
            return analyze(kernel, kwargs, *rest, **options)
        if k not in memo:
            _stats["misses"] += 1
            if len(memo) >= LIMIT:
                memo.clear()
            memo[k] = analyze(kernel, kwargs, *rest)
        else:
            _stats["hits"] += 1
        result = memo[k]
        return list(result) if isinstance(result, list) else result    # a caller's list is its own to change

    memoized.__wrapped__ = analyze
    memoized._l4_memo = True
    return memoized


def install() -> bool:
    """Wrap torch's analysis function(s) with the memo (once). False when this torch has none of them."""
    from torch._higher_order_ops import triton_kernel_wrap as wrap

    found = False
    for name in _NAMES:
        fn = getattr(wrap, name, None)
        if fn is None:
            continue
        found = True
        if not getattr(fn, "_l4_memo", False):
            setattr(wrap, name, _memoized(fn))
    return found


def stats() -> dict[str, int]:
    """{"hits", "misses", "size"} since the process started."""
    return {**_stats, "size": sum(map(len, _tables))}
