# M rows (tokens), K input features, N output features
"""``l4::linear_fp8`` through ``torch._scaled_mm``: real FP8 tensor-core GEMMs (sm89+: Ada, Hopper).

Contract: the same numbers as ``l4compile.ops.quant._linear_fp8_impl`` up to the GEMM's accumulation order::

    x [.., K] -> s_x [M, 1] = max(|x_row| / 448, 1e-12) (float32),  x_q = fp8_e4m3(clamp(x / s_x, +-448))
    y [.., N] = (x_q @ w_q^T) * s_x * w_scale[None, :]      (fp32 accumulation, row-wise scales, out bf16)

``w_q`` [N, K] float8_e4m3fn is row-major, so ``w_q.t()`` is the column-major second operand ``_scaled_mm``
wants, with no copy. ``scaled_mm_supported`` says when the fast path applies (K and N multiples of 16, float32
per-channel scales, a GPU of compute capability 8.9+, or a CPU build of torch that implements row-wise
``_scaled_mm``, as 2.13 does and 2.11 does not: probed once); otherwise ``linear_fp8`` keeps the dequantize + matmul reference. Row-wise scaling produces
bf16 on CUDA, so float32/float16 activations get a bf16 GEMM result cast back to their dtype.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from l4compile.quant import FP8_DTYPE, FP8_MAX, SCALE_EPS


def quantize_per_token(x2: Tensor) -> tuple[Tensor, Tensor]:
    """x2 [M, K] -> (x_q [M, K] float8_e4m3fn, s_x [M, 1] float32), dynamic per-token scales."""
    xf = x2.float()
    s = (xf.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp_min(SCALE_EPS)     # [M, 1]
    return (xf / s).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), s


def scaled_mm_supported(x: Tensor, w_q: Tensor, w_scale: Tensor) -> bool:
    n, k = w_q.shape
    if w_q.dtype != FP8_DTYPE or w_scale.dtype != torch.float32 or k % 16 or n % 16:
        return False
    if x.device.type == "cuda":
        return torch.cuda.get_device_capability(x.device) >= (8, 9)
    return x.device.type == "cpu" and cpu_rowwise_scaled_mm()


@functools.cache
def cpu_rowwise_scaled_mm() -> bool:
    """Whether this torch's CPU ``_scaled_mm`` takes row-wise scales (2.11 asserts per-tensor scales only)."""
    a = torch.ones(16, 16).to(FP8_DTYPE)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.float32)
    except RuntimeError:
        return False
    return True


def linear_fp8_scaled_mm(x: Tensor, w_q: Tensor, w_scale: Tensor) -> Tensor:
    """x [.., K], w_q [N, K] float8_e4m3fn, w_scale [N] float32 -> [.., N] in x.dtype (see module docstring)."""
    n, k = w_q.shape
    x_q, s_x = quantize_per_token(x.reshape(-1, k))                                  # [M, K], [M, 1]
    out_dtype = torch.bfloat16 if x.device.type == "cuda" else x.dtype
    # cuBLASLt's FP8 GEMM takes a row-major first and a column-major second operand; w_q.t() is column-major only
    # for a contiguous w_q (engine constants are; per-expert slices of a transposed stack, as in --verify, are not)
    y = torch._scaled_mm(x_q, w_q.contiguous().t(), scale_a=s_x, scale_b=w_scale.reshape(1, n),
                         out_dtype=out_dtype)                                        # [M, N]
    return y.to(x.dtype).reshape(*x.shape[:-1], n)
