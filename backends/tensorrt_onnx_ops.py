"""The ONNX operators TensorRT's ONNX parser (onnx-tensorrt) imports, and a checker for a TensorRT-bound graph.

Source: onnx-tensorrt ``docs/operators.md`` ("Supported ONNX Operators", the TensorRT 8.5 matrix, opset <= 17),
rows marked ``Y``. TensorRT 10 adds operators to this list (it never removed one), so a graph that passes this
check is importable by every TensorRT >= 8.5; when we need an op only newer parsers know, add it here with the
version in a comment. Restrictions from the same table that concern tensors our exporter may leave dynamic are
checked too (``CONSTANT_INPUTS``): TensorRT needs those inputs to be initializers or Constant nodes.

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
}


def _subgraphs(node) -> list:
    import onnx

    out = []
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            out.append(attr.g)
        elif attr.type == onnx.AttributeProto.GRAPHS:
            out.extend(attr.graphs)
    return out


def check_graph(model: Any, supported: frozenset[str] = SUPPORTED) -> list[str]:
    """-> one line per problem (empty if TensorRT's parser can import ``model``, an onnx.ModelProto).

    Reports each unsupported operator once, by name with its count and a node name, and each violated
    constant-input restriction."""
    problems: dict[str, list[str]] = {}
    functions = {(f.domain, f.name) for f in model.functions}

    def walk(graph, constants: set[str]) -> None:
        constants = constants | {i.name for i in graph.initializer}
        constants |= {o for n in graph.node if n.op_type == "Constant" and n.domain in ("", "ai.onnx")
                      for o in n.output}
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
            if key is not None:
                problems.setdefault(key, []).append(n.name or n.output[0])
            for g in _subgraphs(n):
                walk(g, constants)

    walk(model.graph, set())
    return [f"{k}: {len(v)} node(s), e.g. {v[0]}" for k, v in sorted(problems.items())]
