"""A CUDA engine's step graph with each MoE layer's residual add, post-attention RMSNorm and router in one call.

In the step graph (``Program.gm``, l4 ops not yet decomposed) a Llama 4 MoE layer reads::

    h  = aten.add(a, b)                                # the residual stream: attention's o_proj output added
    hf = aten.to(h, float32)
    x  = aten.mul(aten.type_as(aten.mul(hf, aten.rsqrt(aten.add(aten.mean(aten.pow(hf, 2), [-1], True), eps))), h), w)
    y  = l4.moe / l4.moe_q(aten.reshape(x, [-1, H]), router_w, ..., top_k=1)

which a CUDA engine ran as an Inductor kernel (add + norm) and a cuBLAS matmul (the router, inside the MoE op's
body), beside the MoE's own kernels. ``norm_router_fused`` rewrites each such layer to::

    h, x, logits = norm_router(a, b, w, router_w, eps)      # one launch (l4::add_rms_norm_router)
    y            = routed[moe op](x, logits, router_w, ...)  # the fused MoE on those logits: no router matmul

and every other reader of h (the residual added after the MoE) reads the new h. The functions are given
(``l4compile.kernels.dispatch.residual_norm_router`` / ``moe_routed`` / ``moe_q_routed`` on CUDA); each computes
the reference where its kernel does not apply, so the rewrite keeps the graph's values whatever it is given.
What does not match exactly (another norm, a broadcast add, top-k > 1, x read elsewhere) is left as it is.
"""
from __future__ import annotations

import operator
from typing import Callable

import torch

aten = torch.ops.aten


def _call(node, target, n_args: int | None = None) -> bool:
    return (getattr(node, "op", None) == "call_function" and node.target is target and not node.kwargs
            and (n_args is None or len(node.args) == n_args))


def rms_norm_input(x) -> tuple | None:
    """x's producer as Llama4TextRMSNorm computes it -> (h, w, eps, the nodes from h's float32 cast to x), else None.
    In a float32 graph the cast is the identity and export lets it stand for h (type_as and later readers of h read
    the cast)."""
    if not _call(x, aten.mul.Tensor, 2):
        return None
    typed, w = x.args
    if not _call(typed, aten.type_as.default):
        typed, w = w, typed                                      # w * normed
    if not _call(typed, aten.type_as.default, 2) or not _call(typed.args[0], aten.mul.Tensor, 2):
        return None
    normed, like = typed.args
    hf, rsqrt = normed.args
    if not (_call(hf, aten.to.dtype, 2) and hf.args[1] == torch.float32 and _call(rsqrt, aten.rsqrt.default, 1)):
        return None
    h = hf.args[0]
    if like is not h and not (like is hf and _dtype(h) == torch.float32):
        return None
    add_eps = rsqrt.args[0]
    if not _call(add_eps, aten.add.Tensor, 2) or not isinstance(add_eps.args[1], float):
        return None
    mean = add_eps.args[0]
    if not (_call(mean, aten.mean.dim, 3) and list(mean.args[1]) == [-1] and mean.args[2] is True):
        return None
    sq = mean.args[0]
    if not (_call(sq, aten.pow.Tensor_Scalar, 2) and sq.args == (hf, 2)):
        return None
    return h, w, add_eps.args[1], {x, typed, normed, hf, rsqrt, add_eps, mean, sq}


def norm_readers(h, norm_out, chain: set) -> list[tuple] | None:
    """The readers of h outside its norm (``chain``, as ``rms_norm_input`` gives it, ending at ``norm_out``): pairs
    (reader, the node it reads: h, or h's float32 cast where that is h itself, in a float32 graph), which a rewrite
    that makes h anew points at the new h. None where the norm's inner steps, or a 16-bit graph's cast, are read
    elsewhere."""
    hf = next(n for n in chain if n.target is aten.to.dtype)
    if any(u not in chain for n in chain - {norm_out, hf} for u in n.users):
        return None
    others = [(u, v) for v in (h, hf) for u in v.users if u not in chain]
    if any(v is hf and _dtype(h) != torch.float32 for _, v in others):
        return None
    return others


def rebuilt(gm: torch.fx.GraphModule, graph: torch.fx.Graph) -> torch.fx.GraphModule:
    """``graph`` (a rewritten copy of ``gm``'s) without its dead nodes, as a GraphModule sharing ``gm``'s parameters
    and meta."""
    graph.eliminate_dead_code()
    out = torch.fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    out.meta.update(gm.meta)
    return out


def _dtype(node):
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return getattr(val, "dtype", None)


def norm_router_fused(gm: torch.fx.GraphModule, norm_router: Callable,
                      routed: dict) -> tuple[torch.fx.GraphModule, int]:
    """-> (``gm`` rewritten as the module docstring says, the number of MoE layers rewritten); ``gm`` itself is
    left as it is. ``norm_router(a, b, w, router_w, eps) -> (h, x [N, H], logits [N, E])``; ``routed``: MoE op
    (``torch.ops.l4.moe.default`` ...) -> a function of (x, logits, and the op's own arguments)."""
    graph = torch.fx.Graph()
    env: dict = {}
    graph.output(graph.graph_copy(gm.graph, env))
    order = {n: i for i, n in enumerate(graph.nodes)}
    count = 0
    for moe in [n for n in graph.nodes if n.op == "call_function" and n.target in routed]:
        x, router_w, *rest = moe.args
        if moe.kwargs or rest[-1] != 1:                         # top-1 routing only (Llama 4's)
            continue
        norm_out = x
        if _call(x, aten.reshape.default, 2) or _call(x, aten.view.default, 2):
            if len(x.users) != 1 or len(x.args[1]) != 2:
                continue
            norm_out = x.args[0]
        match = rms_norm_input(norm_out)
        if match is None or len(norm_out.users) != 1:
            continue
        h, w, eps, chain = match
        if not _call(h, aten.add.Tensor, 2) or not all(isinstance(v, torch.fx.Node) for v in h.args):
            continue
        others = norm_readers(h, norm_out, chain)
        if others is None or any(order[u] < order[moe] for u, _ in others):   # the new h is made just before the MoE
            continue
        with graph.inserting_before(moe):
            call = graph.call_function(norm_router, (*h.args, w, router_w, eps))
            new_h, new_x, logits = (graph.call_function(operator.getitem, (call, i)) for i in range(3))
            out = graph.call_function(routed[moe.target], (new_x, logits, router_w, *rest))
        for u, v in others:
            u.replace_input_with(v, new_h)
        moe.replace_all_uses_with(out)
        count += 1
    return rebuilt(gm, graph), count

