"""Kernel tests: on a machine without CUDA the Triton kernels run on CPU tensors under Triton's interpreter.

TRITON_INTERPRET must be set before triton is first imported (``triton.jit`` reads it when decorating, and
triton.language's own helpers are decorated at import): tests/conftest.py sets it for the whole session, only
where there is no CUDA GPU; on a GPU host the same kernels compile for the device and the ``gpu``-marked tests
compare them with the reference ops there. The line below only covers running this directory on its own.
"""
from __future__ import annotations

import functools
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def require_interpreter() -> None:
    """Skip unless the kernels can run here on CPU tensors (Triton installed, interpreter on)."""
    from l4compile.kernels import interpreting, why_unavailable

    reason = why_unavailable()
    if reason:
        pytest.skip(reason)
    if not interpreting():
        pytest.skip("TRITON_INTERPRET is off (CUDA host): the gpu-marked tests cover the kernels here")
    if not _wrap_triton_takes_interpreted():
        pytest.skip(f"torch {torch.__version__}'s wrap_triton refuses interpreted kernels (2.13 takes them)")
    _load_ops()


@functools.cache
def _wrap_triton_takes_interpreted() -> bool:
    import triton
    from torch.library import wrap_triton

    @triton.jit
    def _probe(x_ptr):
        pass

    try:
        wrap_triton(_probe)
    except RuntimeError:
        return False
    return True


def require_cuda_kernels() -> None:
    from l4compile.kernels import why_unavailable

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (this machine has none)")
    reason = why_unavailable()
    if reason:
        pytest.skip(reason)
    _load_ops()


def _load_ops() -> None:
    from l4compile.kernels.dispatch import load_triton_ops

    assert load_triton_ops()        # registers l4::moe_fused and l4::int4_mm


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref| (0 for empty tensors)."""
    if ref.numel() == 0:
        return 0.0
    return float((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30))


# bf16 is loose under the interpreter: Triton 3.7's interpreter truncates float32 -> bf16 (GPUs round to nearest).
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 4e-2}


@pytest.fixture
def launches(monkeypatch) -> list[tuple[str, tuple, dict]]:
    """Every launch ``l4compile.kernels.ops`` makes from here on, as (kernel name, grid, constexprs and other
    keywords); each still runs."""
    from l4compile.kernels import ops

    seen, real = [], ops.wrap_triton

    def recording(kernel):
        launcher = real(kernel)

        class At:
            def __getitem__(self, grid):
                def launch(*args, **kw):
                    seen.append((kernel.__name__, tuple(grid), kw))
                    return launcher[grid](*args, **kw)
                return launch
        return At()

    monkeypatch.setattr(ops, "wrap_triton", recording)
    return seen


@pytest.fixture
def rne_bf16(monkeypatch):
    """Make the interpreter's float32 -> bf16 cast round to nearest even, as GPUs do (Triton 3.7's interpreter
    truncates; float16 casts already round), so a kernel's rounding steps can be compared with the reference's."""
    require_interpreter()
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    cast = interpreter.InterpreterBuilder.cast_impl

    def rne_cast(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = torch.from_numpy(np.array(src.data, dtype=np.float32)).to(torch.bfloat16).view(torch.int16)
            return interpreter.TensorHandle(bits.numpy().view(np.uint16), tl.bfloat16)
        return cast(self, src, dst_type)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "cast_impl", rne_cast)
