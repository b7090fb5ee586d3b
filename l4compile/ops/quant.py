# T tokens, N output features, K input features, G group size, E experts, H hidden, I expert width
"""Quantized ops: ``l4::linear_fp8``, ``l4::linear_int4`` and ``l4::moe_q`` (the fused MoE on quantized weights).

Contracts (weights in nn.Linear orientation ``[N, K]``, produced by ``l4compile.quant``)::

    linear_fp8(x [.., K], w_q [N, K] float8_e4m3fn, w_scale [N] f32) -> [.., N]
        x is fake-quantized per token: s_x = max|x| / 448, x' = fp8(x / s_x) * s_x   (W8A8, dynamic)
        y = x' @ (w_q * w_scale[:, None])^T          (computed in float32, cast to x.dtype)
    linear_int4(x [.., K], w_packed [N, K/2] uint8, w_scale [N, K/G]) -> [.., N]
        w[n, k] = (nibble(k) - 8) * w_scale[n, k // G]  (low nibble = even k, high nibble = odd k)
        y = x @ w^T                                   (weight-only; G = K / w_scale.shape[-1])
    moe_q(x [T, H], router_w [E, H], gate_up_q [E, 2I, H(/2)], gate_up_s, down_q [E, H, I(/2)], down_s,
          shared_gate_q [I, H(/2)], shared_gate_s, shared_up_q, shared_up_s, shared_down_q [H, I(/2)],
          shared_down_s, top_k) -> [T, H]
        exactly ``l4::moe`` (router unquantized; the score scales the expert INPUT) with every expert and
        shared-expert matmul replaced by the linear above that matches the weight's dtype (float8 ->
        linear_fp8, uint8 -> linear_int4). Note the expert weights are stored transposed w.r.t. HF.

Lowering
--------
* Eager / export: opaque custom ops with fake impls; the reference implementations below are plain aten.
* Inductor (CPU and CUDA): ``linear_fp8`` / ``linear_int4`` decompose (``DECOMPOSITIONS``) into their
  dequantize + matmul aten bodies, which have no data-dependent shapes, so Inductor fuses the unpack /
  scale into one pointwise producer of the matmul operand, and the engine stores only packed weights.
  ``moe_q`` stays opaque (proxy executor), like ``l4::moe`` and for the same reasons (data-dependent
  expert groups), except on CUDA (below).
* CUDA (``l4compile.kernels.dispatch``, eager and ``--device cuda`` Inductor engines): ``linear_fp8`` runs
  ``torch._scaled_mm`` (below), ``linear_int4`` the Triton kernel ``l4::int4_mm``; ``moe_q`` the fused Triton MoE
  (grouped rows as ``l4::moe_fused``; no host sync, so engines compile it in): ``l4::moe_q_fused`` on Int4 weights
  (packed tiles unpacked in-kernel), ``l4::moe_fp8_fused`` on FP8 weights (each row's activations quantized to
  float8 in-kernel exactly as ``linear_fp8`` does); without Triton ``_moe_q_impl`` with its expert matmuls
  through the ops above (``qlinear`` on CUDA tensors; the op stays opaque in engines).
  Background, as first sketched: FP8 maps to
  ``torch._scaled_mm(fp8(x / s_x), w_q.t(), scale_a=s_x [T, 1], scale_b=w_scale[None, :], out_dtype=bf16)``
  (row-wise scaling, sm89+; K and N multiples of 16); Int4 to a weight-only int4 GEMM
  (``torch._weight_int4pack_mm`` after ``_convert_weight_to_int4pack``, which wants its own tiled layout, or a
  Triton kernel: the latter is what we use, on our packing as is).
* ONNX (owned by the ONNX backend; not done here): ``linear_int4`` is ``com.microsoft.MatMulNBits``
  (bits=4, block_size=G, symmetric: no zero points, or zero point 8 with our +8 offset; ORT packs the
  low nibble first like we do, but wants B as [N, K/G, G/2] and float scales [N * K/G]); standard-opset
  alternative: ``DequantizeLinear`` (opset 21, int4, block-wise axis=1 block_size=G) -> ``MatMul``.
  ``linear_fp8`` is QDQ: dynamic per-token ``QuantizeLinear``/``DequantizeLinear`` (opset 19+, float8e4m3fn,
  scale computed by ReduceMax(Abs)/448) on x, a constant-folded ``DequantizeLinear`` (axis=0) on the
  weight, then ``MatMul``; TensorRT fuses such QDQ pairs into FP8 GEMMs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from l4compile.quant import FP8_DTYPE, FP8_MAX, SCALE_EPS

from .moe import _route, _sort_assignments

__all__ = ["linear_fp8", "linear_int4", "moe_q", "dequantize", "fake_quant_fp8_per_token", "DECOMPOSITIONS"]


def fake_quant_fp8_per_token(x: Tensor) -> Tensor:
    """x [.., K] -> float32 x rounded through float8_e4m3fn with one scale per row (token)."""
    xf = x.float()
    s = (xf.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp_min(SCALE_EPS)          # [.., 1]
    return (xf / s).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).float() * s


def dequant_fp8(w_q: Tensor, w_scale: Tensor) -> Tensor:
    """[.., N, K] float8, [.., N] -> [.., N, K] float32."""
    return w_q.float() * w_scale.float().unsqueeze(-1)


def dequant_int4(w_packed: Tensor, w_scale: Tensor) -> Tensor:
    """[.., N, K/2] uint8, [.., N, K/G] -> [.., N, K] float32."""
    *lead, n, kh = w_packed.shape
    n_groups = w_scale.shape[-1]
    lo = torch.bitwise_and(w_packed, 15)
    hi = torch.bitwise_right_shift(w_packed, 4)
    q = torch.stack((lo, hi), dim=-1).to(torch.float32) - 8.0                         # [.., N, K/2, 2]
    q = q.reshape(*lead, n, n_groups, (2 * kh) // n_groups)                            # [.., N, K/G, G]
    return (q * w_scale.float().unsqueeze(-1)).reshape(*lead, n, 2 * kh)               # [.., N, K]


def dequantize(w_q: Tensor, w_scale: Tensor) -> Tensor:
    """Either format -> float32 weights [.., N, K]."""
    return dequant_fp8(w_q, w_scale) if w_q.dtype == FP8_DTYPE else dequant_int4(w_q, w_scale)


def _linear_fp8_impl(x: Tensor, w_q: Tensor, w_scale: Tensor) -> Tensor:
    return F.linear(fake_quant_fp8_per_token(x), dequant_fp8(w_q, w_scale)).to(x.dtype)


def _linear_int4_impl(x: Tensor, w_packed: Tensor, w_scale: Tensor) -> Tensor:
    return F.linear(x, dequant_int4(w_packed, w_scale).to(x.dtype))


def qlinear(x: Tensor, w_q: Tensor, w_scale: Tensor) -> Tensor:
    """Dispatch on the weight's storage dtype (float8 -> W8A8, uint8 -> int4 weight-only)."""
    if x.is_cuda:   # through the ops, whose CUDA kernels (l4compile.kernels.dispatch) are _scaled_mm / Triton int4
        return (torch.ops.l4.linear_fp8 if w_q.dtype == FP8_DTYPE else torch.ops.l4.linear_int4)(x, w_q, w_scale)
    return _linear_fp8_impl(x, w_q, w_scale) if w_q.dtype == FP8_DTYPE else _linear_int4_impl(x, w_q, w_scale)


@torch.library.custom_op("l4::linear_fp8", mutates_args=())
def linear_fp8(x: Tensor, w_q: Tensor, w_scale: Tensor) -> Tensor:
    return _linear_fp8_impl(x, w_q, w_scale)


@linear_fp8.register_fake
def _linear_fp8_fake(x, w_q, w_scale):
    torch._check(w_q.dim() == 2 and w_scale.dim() == 1, lambda: "l4::linear_fp8: w_q [N, K], w_scale [N]")
    return x.new_empty((*x.shape[:-1], w_q.shape[0]))


@torch.library.custom_op("l4::linear_int4", mutates_args=())
def linear_int4(x: Tensor, w_packed: Tensor, w_scale: Tensor) -> Tensor:
    return _linear_int4_impl(x, w_packed, w_scale)


@linear_int4.register_fake
def _linear_int4_fake(x, w_packed, w_scale):
    torch._check(w_packed.dim() == 2 and w_scale.dim() == 2, lambda: "l4::linear_int4: w [N, K/2], scale [N, K/G]")
    return x.new_empty((*x.shape[:-1], w_packed.shape[0]))


def _expert(z: Tensor, gu_q: Tensor, gu_s: Tensor, dn_q: Tensor, dn_s: Tensor) -> Tensor:
    """One routed expert on its (already score-scaled) inputs z [c, H] -> [c, H]."""
    gate, up = qlinear(z, gu_q, gu_s).chunk(2, dim=1)                                   # [c, I] each
    return qlinear(up * F.silu(gate), dn_q, dn_s)


@torch.library.custom_op("l4::moe_q", mutates_args=())
def moe_q(x: Tensor, router_w: Tensor, gate_up_q: Tensor, gate_up_s: Tensor, down_q: Tensor, down_s: Tensor,
          shared_gate_q: Tensor, shared_gate_s: Tensor, shared_up_q: Tensor, shared_up_s: Tensor,
          shared_down_q: Tensor, shared_down_s: Tensor, top_k: int) -> Tensor:
    """x [T, H] -> [T, H]; l4::moe on quantized weights (see the module docstring). On CUDA,
    ``l4compile.kernels.dispatch`` registers ``moe_q_cuda`` (Int4: ``l4::moe_q_fused``) as this op's kernel."""
    return _moe_q_impl(x, router_w, gate_up_q, gate_up_s, down_q, down_s, shared_gate_q, shared_gate_s, shared_up_q,
                       shared_up_s, shared_down_q, shared_down_s, top_k)


def _moe_q_impl(x: Tensor, router_w: Tensor, gate_up_q: Tensor, gate_up_s: Tensor, down_q: Tensor, down_s: Tensor,
                shared_gate_q: Tensor, shared_gate_s: Tensor, shared_up_q: Tensor, shared_up_s: Tensor,
                shared_down_q: Tensor, shared_down_s: Tensor, top_k: int) -> Tensor:
    """The reference: expert-grouped, host sync for the group sizes, matmuls through ``qlinear`` (any device)."""
    idx, score = _route(x, router_w, top_k)                                            # [T, K] each
    out = qlinear(F.silu(qlinear(x, shared_gate_q, shared_gate_s)) * qlinear(x, shared_up_q, shared_up_s),
                  shared_down_q, shared_down_s)                                        # [T, H]
    n_exp = gate_up_q.shape[0]
    order, tok, scale, _ = _sort_assignments(idx, score, top_k)
    counts = torch.bincount(idx.reshape(-1), minlength=n_exp).tolist()                 # [E] host ints
    z = x.index_select(0, tok) * scale                                                 # [A, H] sorted by expert
    y = torch.empty_like(z)
    start = 0
    for e, c in enumerate(counts):                                                     # loop over EXPERTS
        if c:
            y[start:start + c] = _expert(z[start:start + c], gate_up_q[e], gate_up_s[e], down_q[e], down_s[e])
            start += c
    return out.index_add_(0, tok, y)


@moe_q.register_fake
def _moe_q_fake(x, router_w, gate_up_q, gate_up_s, down_q, down_s, shared_gate_q, shared_gate_s, shared_up_q,
                shared_up_s, shared_down_q, shared_down_s, top_k):
    torch._check(x.dim() == 2 and gate_up_q.dim() == 3 and down_q.dim() == 3, lambda: "l4::moe_q: bad ranks")
    torch._check(1 <= top_k <= router_w.shape[0], lambda: "l4::moe_q: top_k out of range")
    return torch.empty_like(x)


DECOMPOSITIONS = {torch.ops.l4.linear_fp8.default: _linear_fp8_impl,
                  torch.ops.l4.linear_int4.default: _linear_int4_impl}
