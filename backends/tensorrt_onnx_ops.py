"""The ONNX operators TensorRT's ONNX parser (onnx-tensorrt) imports, and a checker for a TensorRT-bound graph.

Source: onnx-tensorrt ``docs/operators.md`` ("Supported ONNX Operators", the TensorRT 8.5 matrix, opset <= 17),
rows marked ``Y``. TensorRT 10 adds operators to this list (it never removed one), so a graph that passes this
check is importable by every TensorRT >= 8.5; when we need an op only newer parsers know, add it here with the
version in a comment. Restrictions from the same table that concern tensors our exporter may leave dynamic are
checked too (``CONSTANT_INPUTS``): TensorRT needs those inputs to be initializers or Constant nodes.

Quantization (``--quant``): TensorRT takes explicit Q/DQ only, never ONNX Runtime's contrib ops
(``com.microsoft::MatMulNBits``), so the TensorRT-bound export uses standard ``QuantizeLinear`` /
``DequantizeLinear`` (``l4compile.onnx.quant``, target ``tensorrt``). What TensorRT's parser accepts there,
checked by ``_qdq_problems``:

* ``INT8``: Q/DQ per tensor or per channel (TensorRT >= 8).
* ``FLOAT8E4M3FN``: Q/DQ per tensor (activations) or per channel (weights), zero point 0 — TensorRT >= 10
  (FP8 kernels need an sm89+ GPU: Ada, Hopper, Blackwell).
* ``INT4``: ``DequantizeLinear`` of a constant 2-D weight with ``block_size`` (opset 21 blocked quantization,
  weight-only; scales of rank 2, no zero point) — TensorRT >= 10.
* scales and zero points must be build-time constants (initializers or ``Constant`` nodes).

Everything else (UINT4, FLOAT8E5M2 and the other float8 flavours, INT4 activations) is reported.

The check runs on machines without TensorRT, so an unsupported op is reported at compile time, by name.
"""
from __future__ import annotations

from typing import Any

SUPPORTED = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast Ceil Celu Clip
Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace DequantizeLinear Div Dropout
Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND Gemm GlobalAveragePool
GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample GRU HardSigmoid HardSwish Identity If ImageScaler
InstanceNormalization IsNaN LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul
Max MaxPool Mean MeanVarianceNormalization Min Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad
ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range
Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum
ReduceSumSquare Relu Reshape Resize ReverseSequence RNN RoiAlign Round ScaledTanh Scan Scatter ScatterElements
ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt
Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())

# op -> input positions that must be initializers / Constant outputs (from the table's Restrictions column)
CONSTANT_INPUTS: dict[str, tuple[int, ...]] = {
    "TopK": (1,),          # `K` input must be an initializer
    "Slice": (3,),         # `axes` must be an initializer
    "Squeeze": (1,),       # `axes` must be an initializer
    "Unsqueeze": (1,),     # `axes` must be a constant tensor
    "CumSum": (1,),        # `axis` must be an initializer
    "ReduceMax": (1,),     # `axes` must be an initializer (opset 18 moved axes to an input)
    "QuantizeLinear": (1, 2),     # scale / zero point: build-time constants
    "DequantizeLinear": (1, 2),
}

QDQ_TYPES = {"INT8": "int8", "FLOAT8E4M3FN": "fp8", "INT4": "int4"}   # TensorProto type name -> kind


def _subgraphs(node) -> list:
    import onnx

    out = []
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            out.append(attr.g)
        elif attr.type == onnx.AttributeProto.GRAPHS:
            out.extend(attr.graphs)
    return out


def _elem_types(graph, outer: dict[str, int]) -> dict[str, int]:
    """Tensor name -> ONNX element type, for what Q/DQ checks need: initializers, Constant outputs, declared
    value infos and QuantizeLinear outputs (typed by their zero point, uint8 without one)."""
    import onnx

    types = dict(outer)
    for v in (*graph.input, *graph.value_info, *graph.output):
        if v.type.HasField("tensor_type"):
            types[v.name] = v.type.tensor_type.elem_type
    for t in graph.initializer:
        types[t.name] = t.data_type
    for n in graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].type == onnx.AttributeProto.TENSOR:
            types[n.output[0]] = n.attribute[0].t.data_type
        elif n.op_type == "QuantizeLinear":
            zp = n.input[2] if len(n.input) > 2 and n.input[2] else None
            types[n.output[0]] = types.get(zp, onnx.TensorProto.UINT8) if zp else onnx.TensorProto.UINT8
    return types


def _qdq_problems(n, types: dict[str, int], constants: set[str], ranks: dict[str, int]) -> str | None:
    """The restriction a Q/DQ node violates (see the module docstring), or None."""
    import onnx

    qname = n.output[0] if n.op_type == "QuantizeLinear" else n.input[0]
    elem = types.get(qname)
    if elem is None:
        return None                       # unknown here (computed upstream); the parser decides
    kind = QDQ_TYPES.get(onnx.TensorProto.DataType.Name(elem))
    if kind is None:
        return f"{n.op_type} of {onnx.TensorProto.DataType.Name(elem)} (TensorRT takes INT8, FLOAT8E4M3FN, INT4)"
    block = next((a.i for a in n.attribute if a.name == "block_size"), 0)
    if kind == "int4":
        if n.op_type != "DequantizeLinear" or n.input[0] not in constants:
            return f"{n.op_type} of INT4 activations (TensorRT takes INT4 for constant weights only)"
        if not block or ranks.get(n.input[0], 2) != 2 or (len(n.input) > 2 and n.input[2]):
            return "INT4 DequantizeLinear without block_size on a 2-D weight, or with a zero point"
    elif block:
        return f"{n.op_type} of {kind} with block_size (TensorRT blocks INT4 weights only)"
    return None


def check_graph(model: Any, supported: frozenset[str] = SUPPORTED) -> list[str]:
    """-> one line per problem (empty if TensorRT's parser can import ``model``, an onnx.ModelProto).

    Reports each unsupported operator once, by name with its count and a node name, and each violated
    constant-input restriction."""
    problems: dict[str, list[str]] = {}
    functions = {(f.domain, f.name) for f in model.functions}

    def walk(graph, constants: set[str], outer_types: dict[str, int]) -> None:
        constants = constants | {i.name for i in graph.initializer}
        constants |= {o for n in graph.node if n.op_type == "Constant" and n.domain in ("", "ai.onnx")
                      for o in n.output}
        types = _elem_types(graph, outer_types)
        ranks = {i.name: len(i.dims) for i in graph.initializer}
        ranks.update({n.output[0]: len(n.attribute[0].t.dims) for n in graph.node
                      if n.op_type == "Constant" and n.attribute and n.attribute[0].HasField("t")})
        for n in graph.node:
            if (n.domain, n.op_type) in functions:
                key = f"model-local function {n.domain}::{n.op_type} (inline it before handing the graph to TensorRT)"
            elif n.domain not in ("", "ai.onnx"):
                key = f"{n.domain}::{n.op_type} (non-standard domain; TensorRT's parser only takes plugins there)"
            elif n.op_type not in supported:
                key = f"{n.op_type} (not in TensorRT's ONNX operator list)"
            else:
                key = None
                for pos in CONSTANT_INPUTS.get(n.op_type, ()):
                    if pos < len(n.input) and n.input[pos] and n.input[pos] not in constants:
                        key = f"{n.op_type} with a computed input {pos} (TensorRT needs it constant)"
                if key is None and n.op_type in ("QuantizeLinear", "DequantizeLinear"):
                    key = _qdq_problems(n, types, constants, ranks)
            if key is not None:
                problems.setdefault(key, []).append(n.name or n.output[0])
            for g in _subgraphs(n):
                walk(g, constants, types)

    walk(model.graph, set(), {})
    return [f"{k}: {len(v)} node(s), e.g. {v[0]}" for k, v in sorted(problems.items())]
