"""quantize: rewrite weight matmuls onto quantized weights (``--quant fp8`` / ``--quant int4``).

Contract
--------
* A no-op (``changed=False``) unless ``compile_config.quant`` (or the pass option ``scheme``) is not ``none``.
* Runs after ``fuse_moe`` (the routed experts are then one ``l4.moe`` node whose weights it swaps) and after
  ``lower_irope`` (which matches the attention projections as ``aten.linear``).
* Which weights: decided per parameter role by the named predicates of ``l4compile.quant``
  (``should_quantize``): attention q/k/v/o, dense MLPs, the shared expert and the routed experts are
  quantized; the router, norms and embeddings never; the lm_head only with ``quantize_lm_head``.
* Every ``aten.linear(x, get_attr W)`` on a quantized role becomes ``l4.linear_fp8`` / ``l4.linear_int4``;
  every ``l4.moe`` becomes ``l4.moe_q`` (router weight unchanged). New weights (fp8 or packed int4, and
  scales) are buffers on the GraphModule read by ``get_attr`` nodes named ``l4q_<param>_{w,s}``; the old
  float weights are deleted from the module so the engine only stores the quantized ones.
* Finding nothing to quantize is an error (``L4Error``), never a silent no-op.
* Weight values are read through ``ctx.weight`` (under ``--stream-weights`` the graph holds meta tensors and each
  float weight is loaded just before it is quantized and dropped after), and quantized one expert at a time.
* Stats: ``scheme``, ``linears``, ``moe_blocks``, ``weight_bytes`` {before, after} over every tensor the
  graph reads, ``quantized_bytes`` {before, after} over the rewritten weights only; in verify mode also
  ``layer_sqnr`` {parameter: dB}: each quantized weight's output SQNR against the float layer on the
  calibration prompts (the Program's example inputs, run through the float model before the rewrite;
  ``l4compile.quant.layer_sqnr``), and ``layer_sqnr_min``.
* Lossy: the result declares ``min_logit_sqnr_db`` (fp8 25 dB, int4 18 dB: ``l4compile.parity.SQNR_MIN_DB``),
  so ``--verify`` judges this pass by logit SQNR against its input instead of the exact-pass drift bound.

Before / after (int4, one attention projection and one MoE block)::

    linear = aten.linear(mul_3, lm_model_layers_0_self_attn_q_proj_weight)
    moe = l4.moe(reshape_12, router_w, experts_gate_up_proj, experts_down_proj, sg_w, su_w, sd_w, 1)
  ->
    linear = l4.linear_int4(mul_3, l4q_model_layers_0_self_attn_q_proj_weight_w, ..._s)
    moe = l4.moe_q(reshape_12, router_w, l4q_..gate_up_proj_w, l4q_..gate_up_proj_s, l4q_..down_proj_w, ..., 1)
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.fx

from l4compile.errors import L4Error
from l4compile.ops import quant as _quant_ops  # noqa: F401  (registers l4::linear_fp8 / linear_int4 / moe_q)
from l4compile.program import PARAM_PREFIX
from l4compile.parity import SQNR_MIN_DB
from l4compile.quant import (QuantScheme, float_model_from_graph, get_scheme, layer_sqnr,
                             quantize as quantize_weight, role_of, should_quantize)

from ._registry import PassContext, PassResult, register_pass
from ._slicing import delete_tensor, get_tensor

aten = torch.ops.aten
_LINEAR_OP = {"fp8_e4m3": "linear_fp8", "int4": "linear_int4"}
_MIN_DB = {"fp8_e4m3": SQNR_MIN_DB["fp8"], "int4": SQNR_MIN_DB["int4"]}   # verify bound, by weight storage


@dataclass(frozen=True)
class QuantizeOptions:
    scheme: str | None = None               # default: compile_config.quant
    group_size: int | None = None           # int4: override the scheme's 128
    quantize_lm_head: bool = False


def _graph_bytes(gm: torch.fx.GraphModule) -> int:
    seen = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    total = 0
    for t in seen:
        v = get_tensor(gm, t)
        if isinstance(v, torch.Tensor):
            total += v.numel() * v.element_size()
    return total


def _quantize_per_expert(w: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """[.., N, K] -> (q, s), one leading slice (expert) at a time so the float32 temporaries stay one expert big
    (Scout's gate_up is 5.4 GB in float32); bit-identical to quantizing the whole tensor (scales are per row)."""
    if w.dim() < 3:
        return quantize_weight(w, scheme)
    parts = [quantize_weight(w[e], scheme) for e in range(w.shape[0])]
    return torch.stack([q for q, _ in parts]), torch.stack([s for _, s in parts])


class _Rewriter:
    def __init__(self, gm: torch.fx.GraphModule, scheme: QuantScheme, ctx: PassContext):
        self.gm, self.scheme, self.ctx = gm, scheme, ctx
        self.cache: dict[str, tuple[str, str]] = {}
        self.old: set[str] = set()
        self.bytes_before = self.bytes_after = 0

    def role(self, node) -> str | None:
        if not (isinstance(node, torch.fx.Node) and node.op == "get_attr"):
            return None
        t = str(node.target)
        return role_of(t[len(PARAM_PREFIX):]) if t.startswith(PARAM_PREFIX) else None

    def wanted(self, node) -> bool:
        role = self.role(node)
        return role is not None and should_quantize(role, self.scheme)

    def weights(self, node: torch.fx.Node, hf_experts: bool = False) -> tuple[torch.fx.Node, torch.fx.Node]:
        """get_attr node of a float weight -> get_attr nodes of (quantized weight, scales), inserted before use."""
        target = str(node.target)
        if target not in self.cache:
            w = self.ctx.weight(self.gm, target).detach()      # --stream-weights: loaded now, dropped after
            if hf_experts:                                   # HF [E, K, N] used as x @ W -> [E, N, K]
                w = w.transpose(1, 2)
            q, s = _quantize_per_expert(w, self.scheme)
            base = "l4q_" + re.sub(r"\W", "_", target[len(PARAM_PREFIX):])
            self.gm.register_buffer(base + "_w", q.contiguous())
            self.gm.register_buffer(base + "_s", s.contiguous())
            self.cache[target] = (base + "_w", base + "_s")
            self.old.add(target)
            self.bytes_before += w.numel() * w.element_size()
            self.bytes_after += q.numel() * q.element_size() + s.numel() * s.element_size()
        names = self.cache[target]
        return tuple(self.gm.graph.get_attr(n) for n in names)  # type: ignore[return-value]


@register_pass("quantize", after=("fuse_moe", "lower_irope"), options=QuantizeOptions)
def quantize(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """Quantize linear and fused-MoE weights to fp8 (W8A8) or int4 (weight-only) per --quant."""
    opts = ctx.options if isinstance(ctx.options, QuantizeOptions) else QuantizeOptions()
    name = opts.scheme or getattr(ctx.compile_config, "quant", "none")
    if name == "none":
        return PassResult(gm, changed=False, stats={"scheme": "none"})
    scheme = get_scheme(name)
    over = {"quantize_lm_head": opts.quantize_lm_head}
    if opts.group_size is not None:
        over["group_size"] = opts.group_size
    scheme = scheme.with_options(**over)
    bytes_before = _graph_bytes(gm)
    calib = _layer_sqnr(gm, ctx, scheme) if ctx.verify else None          # before the float weights go
    rw = _Rewriter(gm, scheme, ctx)
    graph = gm.graph
    linear_op = getattr(torch.ops.l4, _LINEAR_OP[scheme.weight]).default
    n_linear = n_moe = 0
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target == aten.linear.default:
            bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            if bias is not None or not rw.wanted(node.args[1]):
                continue
            with graph.inserting_before(node):
                wq, ws = rw.weights(node.args[1])
                new = graph.call_function(linear_op, (node.args[0], wq, ws))
            n_linear += 1
        elif node.target == torch.ops.l4.moe.default:
            x, router, gu, dn, sg, su, sd, k = node.args
            if rw.role(router) != "router" or not all(rw.wanted(w) for w in (gu, dn, sg, su, sd)):
                raise L4Error(f"quantize: l4.moe node {node.name} does not read the expected router / expert / "
                              f"shared-expert parameters; run quantize on graphs from fuse_moe")
            with graph.inserting_before(node):
                q_args = [*rw.weights(gu, hf_experts=True), *rw.weights(dn, hf_experts=True),
                          *rw.weights(sg), *rw.weights(su), *rw.weights(sd)]
                new = graph.call_function(torch.ops.l4.moe_q.default, (x, router, *q_args, k))
            n_moe += 1
        else:
            continue
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    if not n_linear and not n_moe:
        raise L4Error("quantize: found no linear or l4.moe node on a quantizable weight; was the graph traced "
                      "with l4compile.program.trace (weights as get_attr 'lm.<param>')?")
    for node in list(graph.nodes):                           # old float weights: unused get_attr, then attrs
        if node.op == "get_attr" and str(node.target) in rw.old and not node.users:
            graph.erase_node(node)
    still_read = {str(n.target) for n in graph.nodes if n.op == "get_attr"}
    for target in rw.old - still_read:
        delete_tensor(gm, target)
    graph.lint()
    gm.recompile()
    stats = {"scheme": scheme.to_dict(), "linears": n_linear, "moe_blocks": n_moe,
             "weight_bytes": {"before": bytes_before, "after": _graph_bytes(gm)},
             "quantized_bytes": {"before": rw.bytes_before, "after": rw.bytes_after}}
    if calib is not None:
        stats["layer_sqnr"] = calib
        stats["layer_sqnr_min"] = min(calib.values(), default=None)
    return PassResult(gm, changed=True, stats=stats, min_logit_sqnr_db=_MIN_DB[scheme.weight])


def _layer_sqnr(gm: torch.fx.GraphModule, ctx: PassContext, scheme: QuantScheme) -> dict[str, float]:
    """Per quantized weight output SQNR (dB, 2 decimals) on the calibration prompts (the example input_ids)."""
    lm = float_model_from_graph(gm, ctx.model_config)
    ids = ctx.example_inputs[0]
    return {k: round(v, 2) for k, v in layer_sqnr(lm, scheme, ids).items()}
