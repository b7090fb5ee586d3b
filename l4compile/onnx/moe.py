# T tokens, E experts, H hidden, I expert width, K top-k, n tokens routed to one expert (data-dependent)
"""ONNX lowering of ``l4::moe`` (see ``l4compile.ops.moe`` for the op's contract).

Formulation: router MatMul -> TopK -> Sigmoid, then the expert loop UNROLLED over the E experts (E is
static), each expert computing only the tokens routed to it::

    idx, val = TopK(Cast(x @ router_w^T, float), K); score = Sigmoid(val)   [T, K]
    hit_e  = Equal(idx, e)                      [T, K] (at most one True per row: top-k indices are distinct)
    nz     = NonZero(Cast(hit_e, float))        [2, n] (token, slot) pairs routed to expert e
    rows   = nz[0]                              [n]
    z      = Gather(x, rows) * GatherND(score, nz^T)[:, None]       # the score scales the expert INPUT
    gate, up = Split(MatMul(z, gate_up[e]))     [n, I] each
    y      = MatMul(up * gate * Sigmoid(gate), down[e])             [n, H]
    out   += ScatterND(zeros[T, H], rows[:, None], y)               # rows are unique: no reduction needed

Why this and not the alternatives:

* Dense (every expert for every token, as transformers does): E x the routed FLOPs (16x Scout, 128x
  Maverick). Not acceptable as the main path.
* Gather-based (``Gather(gate_up, idx)`` -> [T, K, H, 2I], then batched MatMul): exact and free of
  data-dependent shapes, but it materialises one H x 2I weight copy PER TOKEN: at Scout dimensions
  (H 5120, 2I 16384, fp32) that is 335 MB per routed token, so a 512-token prefill would need ~170 GB.
  It only makes sense for decode (T*K tiny), and even there it triples the weight traffic of the step.
* ``com.microsoft.MoE``: scales expert OUTPUTS by a softmax weight; Llama 4 scales the INPUT by a
  sigmoid (SwiGLU is not linear, so the two differ), and it would tie the TensorRT path (which reuses
  this export) to a contrib op TensorRT's parser does not know.
* The per-expert unroll computes exactly the routed work, uses only standard ops that ONNX Runtime's CPU
  and CUDA EPs and TensorRT's ONNX parser (NonZero, ScatterND, Gather, GatherND, TopK) support, and its
  numerics are the same matmuls as the torch kernel. ScatterND is used WITHOUT a reduction (into a zero
  buffer, then Add) because TensorRT's scatter layer has no reduction mode; NonZero gets a float input
  because TensorRT's parser lists NonZero for FP32/FP16 only. Cost: ~12 small nodes per expert per MoE
  layer (data-dependent shapes are fine for ORT and TensorRT alike).
"""
from __future__ import annotations

from typing import Callable

from onnxscript import ir
from onnxscript import opset21 as op

ONNX_OPSET = 21


def _i64(*values: int):
    return op.Constant(value=ir.tensor(list(values), dtype=ir.DataType.INT64))


def _scalar(value: int):
    return op.Constant(value=ir.tensor(value, dtype=ir.DataType.INT64))            # rank 0: Gather drops the axis


def moe_onnx(x, router_w, gate_up, down, shared_gate, shared_up, shared_down, top_k: int):
    """ONNX-script (traced) translation of ``l4::moe``: x [T, H] -> [T, H]."""
    n_exp = int(gate_up.shape[0])
    i_dim = int(down.shape[1])

    def shared(v):                                                             # nn.Linear weights: v @ W^T
        sg = op.MatMul(v, op.Transpose(shared_gate, perm=[1, 0]))              # [T, I]
        su = op.MatMul(v, op.Transpose(shared_up, perm=[1, 0]))                # [T, I]
        return op.MatMul(swiglu(sg, su), op.Transpose(shared_down, perm=[1, 0]))   # [T, H]

    def expert(z, e: int):
        h = op.MatMul(z, op.Gather(gate_up, _scalar(e), axis=0))              # [n, 2I] (gate_up[e]: [H, 2I])
        gate, up = split_gate_up(h, i_dim)                                     # [n, I] each
        return op.MatMul(swiglu(gate, up), op.Gather(down, _scalar(e), axis=0))    # [n, H] (down[e]: [I, H])

    return routed_moe(x, router_w, top_k, n_exp, shared, expert)


def swiglu(gate, up):
    """up * silu(gate), elementwise."""
    return op.Mul(up, op.Mul(gate, op.Sigmoid(gate)))


def split_gate_up(h, i_dim: int):
    """[n, 2I] -> (gate = first I columns, up = last I columns)."""
    return (op.Slice(h, _i64(0), _i64(i_dim), _i64(1)), op.Slice(h, _i64(i_dim), _i64(2 * i_dim), _i64(1)))


def routed_moe(x, router_w, top_k: int, n_exp: int, shared: Callable, expert: Callable):
    """The MoE structure shared by ``l4::moe`` and ``l4::moe_q`` (``l4compile.onnx.quant``): router, TopK,
    sigmoid scores, the shared expert ``shared(x) -> [T, H]`` and, per expert e, ``expert(z, e) -> [n, H]`` on
    the n score-scaled tokens routed to it (z [n, H]), scattered back into the output."""
    # router: logits [T, E] = x @ router_w^T; TopK keeps the largest K (ties as torch: lowest index first)
    # TopK runs on float32 logits (ONNX TopK has no bf16 before opset 24); the cast is exact, so the order and
    # the selected values are those of the model-dtype logits torch ranks.
    logits = op.Cast(op.MatMul(x, op.Transpose(router_w, perm=[1, 0])), to=ir.DataType.FLOAT)   # [T, E]
    val, idx = op.TopK(logits, _i64(top_k), axis=1, largest=1, sorted=1)      # [T, K] each
    score = op.CastLike(op.Sigmoid(val), x)                                    # [T, K], sigmoid in float32
    out = shared(x)                                                            # [T, H]
    zeros = op.Expand(op.CastLike(op.Constant(value_float=0.0), x), op.Shape(x))   # [T, H] scatter target
    for e in range(n_exp):
        hit = op.Cast(op.Equal(idx, _scalar(e)), to=ir.DataType.FLOAT)            # [T, K] 0/1
        nz = op.NonZero(hit)                                                   # [2, n]
        rows = op.Gather(nz, _scalar(0), axis=0)                                  # [n] tokens routed to e
        s = op.GatherND(score, op.Transpose(nz, perm=[1, 0]))                  # [n] their scores
        z = op.Mul(op.Gather(x, rows, axis=0), op.Unsqueeze(s, _i64(1)))       # [n, H]
        y = expert(z, e)                                                       # [n, H]
        out = op.Add(out, op.ScatterND(zeros, op.Unsqueeze(rows, _i64(1)), y))  # [T, H]
    return out
