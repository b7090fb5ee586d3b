# T tokens (any leading dims), N output features, K input features, G group size, E experts, I expert width
"""ONNX lowering of the quantized ops ``l4::linear_fp8``, ``l4::linear_int4`` and ``l4::moe_q`` (contracts in
``l4compile.ops.quant``), for two targets that read the same exported graph differently:

* ``onnxruntime`` — what ONNX Runtime's CPU (and CUDA) execution provider runs fastest:
  ``linear_int4`` -> ``com.microsoft::MatMulNBits(x, B [N, K/G, G/2] uint8, scales [N * K/G], K, N, bits=4,
  block_size=G)`` (no zero points: MatMulNBits' implicit zero point 8 is exactly our +8 nibble offset, and it
  reads the low nibble first like our packing, so B is our packed bytes regrouped, not re-encoded). Groups
  that MatMulNBits cannot take (G not a power of two >= 16, possible with the ``group_size`` pass option) use
  the standard-op form below instead.
* ``tensorrt`` — standard ONNX only (TensorRT's parser has no contrib ops): ``linear_int4`` ->
  ``DequantizeLinear(W^T [K, N] INT4, scale [K/G, N], axis=0, block_size=G)`` -> ``MatMul`` (opset 21
  blocked quantization; the nibbles are re-encoded as signed two's-complement int4, ``u ^ 8``).

``linear_fp8`` is the same standard QDQ form for both targets (W8A8, dynamic per token)::

    xf = Cast(x, float)                                       [T, K]
    s  = Max(ReduceMax(Abs(xf), axes=[-1]) / 448, 1e-12)      [T, 1]   per-token scale
    x8 = DequantizeLinear(QuantizeLinear(xf / s, 1.0, e4m3 0), 1.0) * s   e4m3 round-to-nearest-even, saturating
    y  = CastLike(MatMul(x8, DequantizeLinear(W^T [K, N] e4m3, w_scale [N], axis=1)), x)   [T, N]

which is the reference's ``fake_quant_fp8_per_token`` op for op (same division, same rounding, same clamp),
so the engines match the reference to float32 rounding. The Q/DQ pair has constant unit scales (TensorRT wants
build-time Q/DQ scales); the dynamic per-token scale is the explicit Div / Mul around it.

``l4::moe_q`` reuses ``l4compile.onnx.moe.routed_moe`` (router, TopK, per-expert NonZero / Gather /
ScatterND unroll) with every expert and shared-expert matmul replaced by the linear above; each expert's
weights become their own initializers (sliced at export time), so MatMulNBits can prepack them.

Why translations need the weights' VALUES: torch.onnx hands a translation symbolic values and attaches
initializer data only after every node is translated, but MatMulNBits and INT4 DequantizeLinear want the
packed weights in layouts that differ from the graph's buffers. ``Weights`` maps the exported program's
placeholder names (what a translation sees as ``value.name``) to the tensors; the re-laid-out weights are
emitted as constants, lifted to initializers after export, and the original buffers drop out as unused.
"""
from __future__ import annotations

from typing import Any, Callable

import ml_dtypes
import numpy as np
import torch
from onnxscript import ir
from onnxscript import opset21 as op
from onnxscript.values import Op, Opset

from l4compile.errors import L4Error
from l4compile.quant import FP8_DTYPE, FP8_MAX, SCALE_EPS

from .moe import _i64, routed_moe, split_gate_up, swiglu

TARGETS = ("onnxruntime", "tensorrt")
MS_DOMAIN = "com.microsoft"


def _matmulnbits_schema():
    """The subset of ONNX Runtime's ``com.microsoft::MatMulNBits`` (contrib op, version 1) we emit: A, B, scales
    (no zero points, g_idx or bias). onnx has no schema for contrib ops; onnxscript needs one to record the node."""
    from onnx.defs import OpSchema

    fp = OpSchema.FormalParameter
    attr = OpSchema.Attribute
    ints = OpSchema.AttrType.INT
    return OpSchema(
        "MatMulNBits", MS_DOMAIN, 1, doc="A [.., K] @ dequant(B)^T, B [N, K/block, block/2] packed n-bit",
        inputs=[fp("A", "T1"), fp("B", "T2"), fp("scales", "T1")], outputs=[fp("Y", "T1")],
        type_constraints=[("T1", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "activations, scales"),
                          ("T2", ["tensor(uint8)"], "packed weights")],
        attributes=[attr("K", ints, "input features"), attr("N", ints, "output features"),
                    attr("bits", ints, "bits per weight"), attr("block_size", ints, "quantization group")])


MATMUL_NBITS = Op(Opset(MS_DOMAIN, 1), "MatMulNBits", _matmulnbits_schema())
_ONNX_DTYPE = {ir.DataType.FLOAT: torch.float32, ir.DataType.FLOAT16: torch.float16,
               ir.DataType.BFLOAT16: torch.bfloat16}


class Weights:
    """Placeholder name in an ExportedProgram (parameters, buffers, lifted constants) -> its tensor."""

    def __init__(self, ep: torch.export.ExportedProgram):
        sig = ep.graph_signature
        named = {**dict(ep.named_parameters()), **dict(ep.named_buffers()), **ep.constants}
        self._by_placeholder: dict[str, torch.Tensor] = {}
        for table in (sig.inputs_to_parameters, sig.inputs_to_buffers, sig.inputs_to_lifted_tensor_constants):
            for ph, name in table.items():
                if name in named:
                    self._by_placeholder[ph] = named[name].detach().cpu()

    def __call__(self, value, op_name: str) -> torch.Tensor:
        t = self._by_placeholder.get(getattr(value, "name", None))
        if t is None:
            raise L4Error(f"ONNX export of {op_name}: its weight input {getattr(value, 'name', value)!r} is not a "
                          "graph constant (quantized weights must be buffers read by get_attr)")
        return t


# ---- weight layouts (pure tensor functions; tested against the reference dequantization) ------------------

def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """[.., N, K/2] uint8 (q + 8, low nibble = even k) -> codes [.., N, K] int8 in [-8, 7]."""
    lo = (packed & 15).to(torch.int8) - 8
    hi = (packed >> 4).to(torch.int8) - 8
    return torch.stack((lo, hi), dim=-1).flatten(-2)                                  # [.., N, K]


def matmulnbits_weights(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Our int4 weight [N, K/2] uint8 + scales [N, K/G] -> MatMulNBits' B [N, K/G, G/2] uint8 (the same bytes:
    unsigned nibbles, implicit zero point 8, low nibble first) and scales [N * K/G] in the activation dtype."""
    n, kh = packed.shape
    n_groups = scale.shape[-1]
    b = packed.contiguous().reshape(n, n_groups, (2 * kh) // n_groups // 2)           # [N, K/G, G/2]
    return b.numpy(), scale.to(dtype).reshape(-1).float().numpy().astype(_np_dtype(dtype))


def int4_blocked_weights(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Our int4 weight [N, K/2] + scales [N, K/G] -> W^T [K, N] signed int4 (ml_dtypes.int4, one value per
    element; ONNX packs it two per byte) and scales^T [K/G, N], for DequantizeLinear(axis=0, block_size=G)."""
    codes = unpack_int4(packed).t().contiguous()                                      # [K, N] in [-8, 7]
    return codes.numpy().astype(ml_dtypes.int4), scale.t().contiguous().to(dtype).float().numpy().astype(
        _np_dtype(dtype))


def fp8_weights(w_q: torch.Tensor, w_scale: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """[N, K] float8_e4m3fn + [N] -> W^T [K, N] (ml_dtypes.float8_e4m3fn) and float32 scales [N]."""
    wt = w_q.t().contiguous().view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
    return wt, w_scale.float().numpy()


def _np_dtype(dtype: torch.dtype):
    return {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: ml_dtypes.bfloat16}[dtype]


def nbits_ok(group: int) -> bool:
    """MatMulNBits takes block sizes that are powers of two >= 16."""
    return group >= 16 and group & (group - 1) == 0


# ---- emitters ------------------------------------------------------------------------------------------------

def _const(array: np.ndarray):
    return op.Constant(value=ir.Tensor(array))


def act_dtype(*values) -> torch.dtype:
    """The activation dtype: the first of ``values`` (symbolic values) whose element type is known."""
    dt = next((v.dtype for v in values if getattr(v, "dtype", None) is not None), None)
    try:
        return _ONNX_DTYPE[dt]
    except KeyError:
        raise L4Error(f"quantized linear on {dt} activations: only float32, float16 and bfloat16") from None


def fake_quant_fp8_rows(x):
    """ONNX form of ``fake_quant_fp8_per_token``: x [.., K] -> float32 [.., K] rounded through e4m3 per row."""
    xf = op.Cast(x, to=ir.DataType.FLOAT)
    amax = op.ReduceMax(op.Abs(xf), _i64(-1), keepdims=1)                             # [.., 1]
    s = op.Max(op.Div(amax, op.Constant(value_float=FP8_MAX)), op.Constant(value_float=SCALE_EPS))
    one = op.Constant(value_float=1.0)
    zero8 = _const(np.zeros((), dtype=ml_dtypes.float8_e4m3fn))
    q = op.QuantizeLinear(op.Div(xf, s), one, zero8, saturate=1)                       # [.., K] e4m3
    return op.Mul(op.DequantizeLinear(q, one), s)


def linear_fp8_graph(x, w_q: torch.Tensor, w_scale: torch.Tensor):
    """x [.., K] -> [.., N] (W8A8, see the module docstring); w_q [N, K] e4m3, w_scale [N]."""
    wt, s = fp8_weights(w_q, w_scale)
    w = op.DequantizeLinear(_const(wt), _const(s), axis=1)                            # [K, N] float32
    return op.CastLike(op.MatMul(fake_quant_fp8_rows(x), w), x)


def linear_int4_graph(x, packed: torch.Tensor, scale: torch.Tensor, target: str, dtype: torch.dtype):
    """x [.., K] (dtype) -> [.., N] (weight-only int4); packed [N, K/2] uint8, scale [N, K/G]."""
    n, kh = packed.shape
    k, n_groups = 2 * kh, scale.shape[-1]
    group = k // n_groups
    if target == "onnxruntime" and nbits_ok(group):
        b, s = matmulnbits_weights(packed, scale, dtype)
        return MATMUL_NBITS(x, _const(b), _const(s), K=k, N=n, bits=4, block_size=group)
    wt, st = int4_blocked_weights(packed, scale, dtype)
    return op.MatMul(x, op.DequantizeLinear(_const(wt), _const(st), axis=0, block_size=group))   # [K, N]


def _linear(target: str) -> Callable:
    def linear(x, w_q: torch.Tensor, w_scale: torch.Tensor, dtype: torch.dtype):
        if w_q.dtype == FP8_DTYPE:
            return linear_fp8_graph(x, w_q, w_scale)
        if w_q.dtype == torch.uint8:
            return linear_int4_graph(x, w_q, w_scale, target, dtype)
        raise L4Error(f"quantized weight of dtype {w_q.dtype}: expected float8_e4m3fn or packed uint8 int4")
    return linear


def translations(weights: Weights, target: str) -> dict[Any, Callable]:
    """custom_translation_table entries for the quantized ops, reading weight values from ``weights``."""
    if target not in TARGETS:
        raise L4Error(f"unknown ONNX target {target!r}; one of {', '.join(TARGETS)}")
    linear = _linear(target)

    def linear_fp8(x, w_q, w_scale):
        return linear(x, weights(w_q, "l4::linear_fp8"), weights(w_scale, "l4::linear_fp8"), act_dtype(x))

    def linear_int4(x, w_packed, w_scale):
        return linear(x, weights(w_packed, "l4::linear_int4"), weights(w_scale, "l4::linear_int4"), act_dtype(x))

    def moe_q(x, router_w, gate_up_q, gate_up_s, down_q, down_s, shared_gate_q, shared_gate_s, shared_up_q,
              shared_up_s, shared_down_q, shared_down_s, top_k: int):
        """x [T, H] -> [T, H]; experts: gate_up [E, 2I, H(/2)], down [E, H, I(/2)] (nn.Linear orientation)."""
        w = {name: weights(v, "l4::moe_q") for name, v in (
            ("gu", gate_up_q), ("gus", gate_up_s), ("dn", down_q), ("dns", down_s), ("sg", shared_gate_q),
            ("sgs", shared_gate_s), ("su", shared_up_q), ("sus", shared_up_s), ("sd", shared_down_q),
            ("sds", shared_down_s))}
        n_exp, i_dim = w["gu"].shape[0], w["gu"].shape[1] // 2
        dt = act_dtype(x, router_w)                     # intermediate values may carry no type while tracing

        def shared(v):
            return linear(swiglu(linear(v, w["sg"], w["sgs"], dt), linear(v, w["su"], w["sus"], dt)),
                          w["sd"], w["sds"], dt)

        def expert(z, e: int):
            gate, up = split_gate_up(linear(z, w["gu"][e], w["gus"][e], dt), i_dim)     # [n, I] each
            return linear(swiglu(gate, up), w["dn"][e], w["dns"][e], dt)               # [n, H]

        return routed_moe(x, router_w, top_k, n_exp, shared, expert)

    return {torch.ops.l4.linear_fp8.default: linear_fp8, torch.ops.l4.linear_int4.default: linear_int4,
            torch.ops.l4.moe_q.default: moe_q}


def lift_weight_constants(model) -> None:
    """Turn the constants the translations emitted into initializers (in place, onnx_ir model), so weights are
    initializers like every other parameter (external data, byte counts, TensorRT's constant checks)."""
    from onnx_ir.passes.common import LiftConstantsToInitializersPass, RemoveUnusedNodesPass

    LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=16)(model)
    RemoveUnusedNodesPass()(model)        # also drops initializers nothing reads (the original packed buffers)
