"""The ONNX graph optimizer run on every exported model (ONNX Runtime and TensorRT engines).

It is onnxscript's optimizer, the one ``torch.onnx.export(..., optimize=True)`` runs (as of onnxscript 0.7: inline
functions; up to two rounds of constant folding with shape inference, pattern rewrites and dead-code removal; then
constants lifted to initializers, duplicate initializers merged, common subexpressions eliminated), with one
difference: the rewrite rules whose pattern has more than one output node are left out. (torch's optimize=True
also runs onnxscript's opset-23 fusions, RMSNormalization / RotaryEmbedding / GQA, which do nothing at our opset 21.)

onnxscript matches such a pattern by indexing every node of the graph by op type once per candidate node:
O(nodes^2) per round. Our MoE lowering is unrolled per expert (``moe``), so the node count grows as layers x
experts; with 16 experts (tiny dimensions: only the node count matters here) the optimizer took 5.7 / 26.7 / 99.6 /
368 s at 2 / 4 / 8 / 16 layers (Scout's 48: about an hour) and takes 1.6 / 2.5 / 6.2 / 13.2 s without those rules
(40 s at 48 layers, 42k nodes). onnxscript 0.7 has one such rule, SlicesSplit (Slices of one tensor -> one
Split), and it fires on none of our graphs: the optimized graph has the same op counts, initializers and outputs
with and without it (tests/backends/test_onnx_optimize.py).
"""
from __future__ import annotations

import logging

from onnxscript import ir, optimizer, rewriter

common = ir.passes.common

ROUNDS = 2          # fold + rewrite rounds, as onnxscript's optimize_ir (it stops early when a round changes nothing)

log = logging.getLogger(__name__)


def rewrite_rules() -> tuple | None:
    """onnxscript's default rewrite rules whose pattern has a single output node; None where this onnxscript does
    not expose its default rules the way 0.7 does (``optimize`` then runs onnxscript's optimizer unchanged)."""
    rules = getattr(rewriter, "_DEFAULT_REWRITE_RULES", None)
    if not rules or not all(hasattr(r, "_target_pattern") for r in rules):
        return None
    return tuple(r for r in rules if r._target_pattern.has_single_output_node)


def optimize(model: ir.Model) -> ir.Model:
    """Optimize ``model`` (``torch.onnx.export(..., optimize=False).model``) in place, as described above."""
    rules = rewrite_rules()
    if rules is None:
        log.warning("this onnxscript does not expose its default rewrite rules as 0.7 does; running its optimizer "
                    "as is (its multi-output patterns, if any, make it quadratic in the node count)")
        optimizer.optimize_ir(model)
        return model
    common.InlinePass()(model)
    rewrite = rewriter.RewritePass(rules)
    for _ in range(ROUNDS):
        changed = [optimizer.fold_constants_ir(model, onnx_shape_inference=True).modified, rewrite(model).modified,
                   *(p()(model).modified for p in (common.RemoveUnusedNodesPass, common.RemoveUnusedFunctionsPass,
                                                   common.RemoveUnusedOpsetsPass))]
        if not any(changed):
            break
    ir.passes.Sequential(
        common.RemoveUnusedNodesPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.LiftSubgraphInitializersToMainGraphPass(),
        common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(),
        common.OutputFixPass(),
        common.NameFixPass(),
    )(model)
    return model
