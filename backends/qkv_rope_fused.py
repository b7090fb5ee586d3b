# B batch, T new tokens, K hidden, Nq / Nk / Nv the q / k / v columns of a fused qkv projection
"""A CUDA engine's step graph with each RoPE layer's query and key transforms in the epilogue of its qkv GEMM.

After ``fuse_qkv`` and ``caches_in_place`` a RoPE layer's attention reads::

    qkv  = l4.linear_int4(x, w, s)                                         # [B, T, Nq + Nk + Nv]
    out  = attention(slice(qkv, -1, 0, Nq), slice(qkv, -1, Nq, Nq + Nk), slice(qkv, -1, Nq + Nk, ..), k_cache,
                     v_cache, start_pos, cos, sin, Hq, Hkv, D, use_rope=True, qk_norm, .., eps)

and the attention's body rotates and norms k in aten (a kernel of its own in the engine) and q in the attention
kernel (every key split of a decode step again, after q and its tables' round trip). ``qkv_rope_fused`` rewrites
each such layer to::

    qkv  = linear_rope(x, w, s, start_pos, cos, sin, 0, Nq + Nk, D, qk_norm, eps)  # q and k done in the epilogue
    out  = attention(<the same slices>, .., k_ready=True, q_ready=True)          # both taken as they come

``linear_rope`` is given (``l4compile.kernels.dispatch.linear_int4_rope`` on CUDA: ``l4::int4_mm_rope``, or the
plain product followed by the aten transform where the kernel does not apply), so the rewrite keeps the graph's
values whatever it is given: q and k get the same transform (``ops.attention._project``: RoPE at the tokens'
positions, then with qk-norm each head's RMS norm). Only where the qkv output is read by that attention's three
slices alone, with k the slice [Nq, Nq + Hkv * D) of the last dimension, and the rope tables are graph constants;
q is taken too where it is the slice [Nq - Hq * D, Nq) just before k (else k alone, ``q_ready`` False).
Everything else is left as it is. NoPE layers have no RoPE and are not touched.
"""
from __future__ import annotations

from typing import Callable

import torch

from .norm_router_fused import rebuilt

aten = torch.ops.aten
# l4::attention_cached's arguments: (q, k, v, k_cache, v_cache, start_pos, cos, sin, n_heads, n_kv_heads, head_dim,
# use_rope, qk_norm, chunk, temp_tuning, floor_scale, attn_scale, scaling, eps)
_K, _START, _COS, _SIN, _HEADS, _KV_HEADS, _HEAD_DIM, _ROPE, _QK_NORM, _EPS = 1, 5, 6, 7, 8, 9, 10, 11, 12, 18


def _last_dim_slice(node, source) -> tuple[int, int] | None:
    """(start, end) where ``node`` is ``aten.slice(source, -1 or the last dim, start, end[, 1])``, else None."""
    if getattr(node, "op", None) != "call_function" or node.target is not aten.slice.Tensor or node.kwargs:
        return None
    args = node.args
    if len(args) not in (4, 5) or args[0] is not source or (len(args) == 5 and args[4] != 1):
        return None
    val = source.meta.get("val")
    last = val.dim() - 1 if val is not None else None
    if args[1] not in (-1, last) or not all(isinstance(a, int) for a in args[2:4]):
        return None
    return args[2], args[3]


def rope_qkv_match(attn: torch.fx.Node) -> tuple[torch.fx.Node, int, int, int, bool] | None:
    """(the qkv ``l4.linear_int4`` node, the first column of the transformed span, its width, head_dim, qk_norm)
    where ``attn`` (a call with ``l4::attention_cached``'s arguments, no keyword arguments: the op itself, or its
    in-place form) is a RoPE layer whose key (and query) transform this rewrite moves into the qkv GEMM, as the
    module docstring says; else None. The span is q's and k's columns where q's slice ends where k's starts, k's
    alone otherwise. Also what ``compile --tune-kernels`` asks of a Program's graph (``kernels.autotune.problems``),
    so that it times a qkv GEMM in the form the engine will run."""
    args = attn.args
    if attn.kwargs or len(args) != 19 or args[_ROPE] is not True:
        return None
    qkv = args[_K].args[0] if isinstance(args[_K], torch.fx.Node) and args[_K].args else None
    if not (getattr(qkv, "op", None) == "call_function" and qkv.target is torch.ops.l4.linear_int4.default
            and not qkv.kwargs and len(qkv.args) == 3):
        return None
    spans = [_last_dim_slice(p, qkv) for p in args[:3]]
    if None in spans or set(qkv.users) != set(args[:3]) or any(set(p.users) != {attn} for p in args[:3]):
        return None
    if not all(getattr(t, "op", None) == "get_attr" for t in (args[_COS], args[_SIN])):
        return None
    (q0, q1), (k0, k1) = spans[0], spans[_K]
    if k1 - k0 != args[_KV_HEADS] * args[_HEAD_DIM]:
        return None
    if q1 == k0 and q1 - q0 == args[_HEADS] * args[_HEAD_DIM]:
        k0 = q0                                                  # q's columns come first: one span for both
    return qkv, k0, k1 - k0, args[_HEAD_DIM], args[_QK_NORM]


def qkv_rope_fused(gm: torch.fx.GraphModule, attentions: set, linear_rope: Callable) -> tuple[torch.fx.GraphModule,
                                                                                               int]:
    """-> (``gm`` rewritten as the module docstring says, the number of layers rewritten); ``gm`` itself is left as
    it is. ``attentions``: the call targets with ``l4::attention_cached``'s arguments that take ``k_ready`` and
    ``q_ready`` (``dispatch.attention_cached_in_place``); ``linear_rope(x, w, s, start_pos, cos, sin, col0, cols,
    head_dim, qk_norm, eps) -> [B, T, N]``."""
    graph = torch.fx.Graph()
    env: dict = {}
    graph.output(graph.graph_copy(gm.graph, env))
    count = 0
    for attn in [n for n in graph.nodes if n.op == "call_function" and n.target in attentions]:
        match = rope_qkv_match(attn)
        if match is None:
            continue
        qkv, *rope = match                    # rope: the span's first column, its width, head_dim, qk_norm
        args = attn.args
        q_ready = rope[1] > args[_KV_HEADS] * args[_HEAD_DIM]          # the span takes q's columns too
        with graph.inserting_before(qkv):     # the tables' own nodes may come after the GEMM
            tables = [graph.get_attr(t.target) for t in (args[_COS], args[_SIN])]
            new = graph.call_function(linear_rope, (*qkv.args, args[_START], *tables, *rope, args[_EPS]))
        new.meta.update(qkv.meta)
        qkv.replace_all_uses_with(new)
        attn.kwargs = {"k_ready": True, "q_ready": q_ready}
        count += 1
    return rebuilt(gm, graph), count
