"""lower_vision_rope: the vision tower's complex 2D RoPE -> real arithmetic (ONNX / TensorRT / AOTI take no complex).

Contract
--------
* Runs on the vision Program (``programs=("vision",)``). In every ``Llama4VisionAttention`` block (found by
  provenance) it matches, for q and for k::

      view_as_real(mul(view_as_complex(x), F))          x: float [T, S, H, D/2, 2], F: complex [1, S, 1, D/2]

  where ``F`` is computed from constants only (the rotary buffer ``freqs_ci``, reshaped). ``F`` is evaluated
  once at compile time and becomes two float32 buffers ``l4_vision_rope_cos`` / ``_sin`` (shared by layers
  that use the same table); the match becomes, with ``a = x[..., 0]``, ``b = x[..., 1]`` (interleaved pairs)::

      stack([a*cos - b*sin, a*sin + b*cos], -1)           float [T, S, H, D/2, 2]

* Each block must show exactly two rotations (q and k); anything else raises ``L4Error`` naming the layer.
  Afterwards no complex value, op or buffer may remain (checked). Guarantees ``vision_rope_lowered``.
* Stats: ``{"matches": n_rotations, "layers": n_blocks, "tables": distinct cos/sin tables}``.

Before (layer 0, q; T tiles, S = 577 patches + CLS, H heads, D head dim)::

    view_as_complex = aten.view_as_complex(reshape_2)                       # [T, S, H, D/2] complex64
    to_4 = aten.to(view_4, ...)   # view_4 = view(to_1(freqs_ci), [1, 577, 1, D/2])
    mul = aten.mul.Tensor(view_as_complex, to_4)
    view_as_real = aten.view_as_real(mul)                                   # [T, S, H, D/2, 2]

After::

    select = aten.select(reshape_2, -1, 0); select_1 = aten.select(reshape_2, -1, 1)
    sub = aten.sub(mul(select, l4_vision_rope_cos), mul(select_1, l4_vision_rope_sin))
    add = aten.add(mul(select, l4_vision_rope_sin), mul(select_1, l4_vision_rope_cos))
    stack = aten.stack([sub, add], -1)                                      # [T, S, H, D/2, 2] float32
"""
from __future__ import annotations

import torch
import torch.fx

from l4compile.errors import L4Error

from ._provenance import innermost_module
from ._registry import PassContext, PassResult, register_pass

aten = torch.ops.aten


def _const_value(node: torch.fx.Node, gm: torch.fx.GraphModule, memo: dict):
    """The tensor ``node`` computes if it depends on get_attr constants only, else None."""
    if node in memo:
        return memo[node]
    val = None
    if node.op == "get_attr":
        val = gm
        for part in str(node.target).split("."):
            val = getattr(val, part)
    elif node.op == "call_function" and all(isinstance(_const_value(d, gm, memo), torch.Tensor)
                                            for d in node.all_input_nodes):
        args = torch.fx.node.map_arg(node.args, lambda d: memo[d])
        kwargs = torch.fx.node.map_arg(node.kwargs, lambda d: memo[d])
        with torch.no_grad():
            val = node.target(*args, **kwargs)
    memo[node] = val
    return val


def _is_complex(node) -> bool:
    v = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return isinstance(v, torch.Tensor) and v.is_complex()


@register_pass("lower_vision_rope", guarantees=("vision_rope_lowered",), programs=("vision",))
def lower_vision_rope(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """Rewrite the vision tower's complex 2D RoPE (view_as_complex * freqs) into real cos/sin arithmetic."""
    graph = gm.graph
    memo: dict = {}
    tables: dict[tuple, tuple[torch.fx.Node, torch.fx.Node]] = {}
    per_block: dict[str, int] = {}
    for vr in [n for n in graph.nodes if n.target == aten.view_as_real.default]:
        block = innermost_module(vr, "Llama4VisionAttention")
        mul = vr.args[0]
        if block is None or not isinstance(mul, torch.fx.Node) or mul.target != aten.mul.Tensor:
            where = block or "outside attention"
            raise L4Error(f"lower_vision_rope: unexpected complex pattern at {vr.name} ({where})")
        vc, freqs = mul.args
        if not (isinstance(vc, torch.fx.Node) and vc.target == aten.view_as_complex.default):
            vc, freqs = freqs, vc
        if not (isinstance(vc, torch.fx.Node) and vc.target == aten.view_as_complex.default):
            raise L4Error(f"lower_vision_rope: {block}: the rotation does not multiply a view_as_complex value")
        f = _const_value(freqs, gm, memo) if isinstance(freqs, torch.fx.Node) else None
        if not (isinstance(f, torch.Tensor) and f.is_complex()):
            raise L4Error(f"lower_vision_rope: {block}: the RoPE factor is not a compile-time complex constant")
        key = (tuple(f.shape), f.data_ptr(), f.stride())
        if key not in tables:
            i = len(tables)
            suffix = "" if i == 0 else f"_{i}"
            cos_name, sin_name = f"l4_vision_rope_cos{suffix}", f"l4_vision_rope_sin{suffix}"
            gm.register_buffer(cos_name, f.real.float().contiguous())
            gm.register_buffer(sin_name, f.imag.float().contiguous())
            first_non_ph = next(n for n in graph.nodes if n.op != "placeholder")
            with graph.inserting_before(first_non_ph):
                tables[key] = (graph.get_attr(cos_name), graph.get_attr(sin_name))
        cos, sin = tables[key]
        x = vc.args[0]                                                   # float [..., D/2, 2]
        with graph.inserting_before(vr):
            a = graph.call_function(aten.select.int, (x, -1, 0))
            b = graph.call_function(aten.select.int, (x, -1, 1))
            ac = graph.call_function(aten.mul.Tensor, (a, cos))
            bs = graph.call_function(aten.mul.Tensor, (b, sin))
            asn = graph.call_function(aten.mul.Tensor, (a, sin))
            bc = graph.call_function(aten.mul.Tensor, (b, cos))
            re = graph.call_function(aten.sub.Tensor, (ac, bs))
            im = graph.call_function(aten.add.Tensor, (asn, bc))
            out = graph.call_function(aten.stack.default, ([re, im], -1))
        for n in (a, b, ac, bs, asn, bc, re, im, out):
            n.meta["nn_module_stack"] = vr.meta.get("nn_module_stack", {})
        vr.replace_all_uses_with(out)
        per_block[block] = per_block.get(block, 0) + 1
    bad = {b: c for b, c in per_block.items() if c != 2}
    if bad:
        raise L4Error(f"lower_vision_rope: expected 2 rotations (q, k) per attention block, got {bad}")
    # export's dtype/layout asserts on the (now dead) complex table are side-effecting and would keep it alive
    for n in list(graph.nodes):
        if n.target == aten._assert_tensor_metadata.default and _is_complex(n.args[0]):
            graph.erase_node(n)
    graph.eliminate_dead_code()
    # drop the complex buffers nothing reads any more
    used = {str(n.target) for n in graph.nodes if n.op == "get_attr"}
    for name, buf in list(gm.named_buffers()):
        if buf.is_complex() and name not in used:
            owner, _, attr = name.rpartition(".")
            mod = gm.get_submodule(owner) if owner else gm
            delattr(mod, attr)
    left = [n.name for n in graph.nodes if _is_complex(n) or n.target in (aten.view_as_complex.default,
                                                                          aten.view_as_real.default)]
    left += [name for name, b in gm.named_buffers() if b.is_complex()]
    if left:
        raise L4Error(f"lower_vision_rope: complex values remain after lowering: {', '.join(left[:5])}")
    return PassResult(gm, stats={"matches": sum(per_block.values()), "layers": len(per_block),
                                 "tables": len(tables)})
