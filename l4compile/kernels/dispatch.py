# T tokens, H hidden, M rows, K input features, N output features
"""CUDA dispatch of the l4 ops to the GPU kernels; CPU behaviour is untouched.

Two routes, the same choices in both:

* Eager (and AOTInductor's proxy executor, for ops that stay opaque): ``register_cuda_kernels`` gives
  ``l4::moe``, ``l4::linear_int4`` and ``l4::linear_fp8`` a CUDA implementation (``register_kernel("cuda")``);
  tensors on any other device keep the reference implementations.
* Inductor / AOTInductor engines built with ``--device cuda``: ``cuda_decompositions`` maps the same ops to
  their kernel forms before compiling, so the ``triton_op`` bodies (host aten code + Triton kernels) and
  ``torch._scaled_mm`` are compiled INTO the ``.pt2``.

    l4::moe         -> l4::moe_fused (Triton: grouped gate_up+SwiGLU, grouped down, shared expert as group E)
    l4::linear_int4 -> l4::int4_mm   (Triton: packed-int4 GEMM/GEMV, x flattened to [M, K])
    l4::linear_fp8  -> torch._scaled_mm with row-wise scales (sm89+, K and N multiples of 16), else reference

Without Triton (a CUDA host where it is missing), MoE and Int4 keep their reference implementations, which run
on CUDA too (slower). Nothing here imports Triton at import time.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from l4compile.ops import moe as moe_ops
from l4compile.ops import quant as quant_ops

from . import triton_available
from .fp8_scaled_mm import linear_fp8_scaled_mm, scaled_mm_supported

FUSED_MOE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.cache
def load_triton_ops() -> bool:
    """Register ``l4::moe_fused`` / ``l4::int4_mm`` (imports Triton). False when Triton is missing."""
    if not triton_available():
        return False
    from . import ops  # noqa: F401
    return True


def fused_moe_supported(x: Tensor, *weights: Tensor) -> bool:
    return (x.dim() == 2 and x.dtype in FUSED_MOE_DTYPES and all(w.dtype == x.dtype for w in weights)
            and load_triton_ops())


def moe_cuda(x: Tensor, router_w: Tensor, gate_up: Tensor, down: Tensor, shared_gate: Tensor, shared_up: Tensor,
             shared_down: Tensor, top_k: int) -> Tensor:
    """``l4::moe`` on CUDA: the fused Triton MoE, or the grouped eager implementation without Triton."""
    args = (x, router_w, gate_up, down, shared_gate, shared_up, shared_down)
    if fused_moe_supported(*args):
        return torch.ops.l4.moe_fused(*args, top_k)
    return moe_ops._moe_impl(*args, top_k)


def linear_int4_cuda(x: Tensor, w_packed: Tensor, w_scale: Tensor) -> Tensor:
    """``l4::linear_int4`` on CUDA: x [.., K] -> [.., N] through the Triton Int4 kernel."""
    if not load_triton_ops():
        return quant_ops._linear_int4_impl(x, w_packed, w_scale)
    n, k = w_packed.shape[0], 2 * w_packed.shape[1]
    y = torch.ops.l4.int4_mm(x.reshape(-1, k), w_packed, w_scale)                   # [M, N]
    return y.reshape(*x.shape[:-1], n)


def linear_fp8_cuda(x: Tensor, w_q: Tensor, w_scale: Tensor) -> Tensor:
    """``l4::linear_fp8`` on CUDA: ``torch._scaled_mm`` where it applies, else the dequantize reference."""
    if scaled_mm_supported(x, w_q, w_scale):
        return linear_fp8_scaled_mm(x, w_q, w_scale)
    return quant_ops._linear_fp8_impl(x, w_q, w_scale)


@functools.cache
def register_cuda_kernels() -> None:
    """Idempotent; called by ``import l4compile.ops``."""
    moe_ops.moe.register_kernel("cuda")(moe_cuda)
    quant_ops.linear_int4.register_kernel("cuda")(linear_int4_cuda)
    quant_ops.linear_fp8.register_kernel("cuda")(linear_fp8_cuda)


def cuda_decompositions() -> dict:
    """Extra decompositions for Inductor engines built for CUDA (merged over ``l4compile.ops.DECOMPOSITIONS``).
    ``l4::moe`` is included only with Triton: its eager fallback has host syncs and stays an opaque op."""
    table = {torch.ops.l4.linear_fp8.default: linear_fp8_cuda}
    if load_triton_ops():
        table[torch.ops.l4.moe.default] = moe_cuda
        table[torch.ops.l4.linear_int4.default] = linear_int4_cuda
    return table


register_cuda_kernels()   # also when this module is imported before l4compile.ops (idempotent)
