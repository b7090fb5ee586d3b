"""A CUDA engine's step graph with each MoE layer's combine, the residual add after it and the next RMSNorm in the
MoE's own launches.

After ``norm_router_fused`` a Llama 4 MoE layer ends, and the next layer (or the final norm) begins::

    y  = routed(x, logits, router_w, ..., top_k=1)           # the fused MoE on its router logits: [N, H]
    h' = aten.add(h, aten.view(y, shape))                    # the residual stream
    x' = RMSNorm(h') * w                                     # as ``norm_router_fused.rms_norm_input`` matches it

which a CUDA engine ran as one Inductor kernel a layer after the MoE's launches (the gather of each token's routed
row onto its shared row, the add, the norm). ``moe_norm_fused`` rewrites each such layer to::

    h', x' = routed_norm(x, logits, router_w, ..., top_k, h, w, eps, shape)

and every reader of h' and x' reads the new ones. ``routed`` -> ``routed_norm`` is given (CUDA:
``l4compile.kernels.dispatch.moe_routed`` -> ``moe_routed_norm``, ``moe_q_routed`` -> ``moe_q_routed_norm``, whose
kernels do it in the MoE's down launch at decode); each computes the reference where its kernel does not apply, so
the rewrite keeps the graph's values whatever it is given. What does not match exactly (y or the norm's steps read
elsewhere, another norm) is left as it is, and so is a norm whose output an FP8 linear reads (``l4::linear_fp8``,
an FP8 engine's qkv): Inductor fuses that norm with the linear's per-token activation quantization, so moving the
norm into the MoE would leave the quantization a launch of its own (bench-scout FP8: 1 launch a step fewer at
decode for 4 layers, 3 more at prefill).
"""
from __future__ import annotations

import operator

import torch

from .norm_router_fused import _call, norm_readers, rebuilt, rms_norm_input

aten = torch.ops.aten


def _reads_fp8(node) -> bool:
    """Whether ``node`` is an FP8 linear, or a view of its input that one reads."""
    if node.target is torch.ops.l4.linear_fp8.default:
        return True
    views = (aten.view.default, aten.reshape.default)
    return node.target in views and any(u.target is torch.ops.l4.linear_fp8.default for u in node.users)


def moe_norm_fused(gm: torch.fx.GraphModule, fused: dict) -> tuple[torch.fx.GraphModule, int]:
    """-> (``gm`` rewritten as the module docstring says, the number of MoE layers rewritten); ``gm`` itself is left
    as it is. ``fused``: routed MoE call target -> a function of (its arguments, residual, norm weight, eps, shape)
    -> (h', x'), both of ``shape``."""
    graph = torch.fx.Graph()
    env: dict = {}
    graph.output(graph.graph_copy(gm.graph, env))
    order = {n: i for i, n in enumerate(graph.nodes)}
    norms = {}                                              # h -> (x', its norm's weight, eps, the norm's nodes)
    for node in graph.nodes:
        match = rms_norm_input(node)
        if match is not None:
            norms.setdefault(match[0], (node, *match[1:]))
    count = 0
    for moe in [n for n in graph.nodes if n.op == "call_function" and n.target in fused]:
        if moe.kwargs or moe.args[-1] != 1 or len(moe.users) != 1:               # top-1, y read once
            continue
        view = next(iter(moe.users))
        if not (_call(view, aten.view.default, 2) or _call(view, aten.reshape.default, 2)) or len(view.users) != 1:
            continue
        add = next(iter(view.users))
        if not _call(add, aten.add.Tensor, 2) or add not in norms:
            continue
        h = add.args[1] if add.args[0] is view else add.args[0]
        x_new, w, eps, chain = norms[add]
        if not isinstance(h, torch.fx.Node) or h is view:
            continue
        if any(_reads_fp8(u) for u in x_new.users):
            continue
        others = norm_readers(add, x_new, chain)                               # to read the new h'
        if others is None or isinstance(w, torch.fx.Node) and order[w] > order[add]:   # the call goes before the add
            continue
        with graph.inserting_before(add):
            call = graph.call_function(fused[moe.target], (*moe.args, h, w, eps, view.args[1]))
            new_h, new_x = (graph.call_function(operator.getitem, (call, i)) for i in range(2))
        for u, v in others:
            u.replace_input_with(v, new_h)
        x_new.replace_all_uses_with(new_x)
        count += 1
    return rebuilt(gm, graph), count
