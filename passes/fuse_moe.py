"""fuse_moe: replace each Llama 4 MoE block with one ``l4.moe`` op that computes only the selected experts.

Contract
--------
* Input: a ``Program.gm`` (unlifted export graph, weights as ``get_attr`` ``lm.<param name>``, call nodes
  with ``nn_module_stack``). Blocks are found by provenance: every call node whose module stack contains
  a ``Llama4TextMoe`` module belongs to that module's block (router, experts and shared expert included).
* Each block must match the transformers pattern: one router ``linear`` on the block input whose output
  feeds one ``topk(k, dim=1)``; two ``bmm`` on the ``experts.gate_up_proj`` / ``experts.down_proj``
  weights; the shared expert's three ``linear`` (gate/up on the block input, down on their product);
  exactly one node leaving the block, an ``add`` of the shared-expert output. Anything else raises
  ``L4Error`` naming the layer: a Llama4TextMoe that is not fused is an error, never a silent no-op.
  So is a MoE layer of the config (``moe_layers``) that has no block in the graph.
* Dense MLP layers (``Llama4TextMLP`` outside a MoE, Maverick's even layers) are not touched.
* Output: same graph with the block's output replaced by the op, the block's nodes erased and dead
  code eliminated. Stats: ``{"matches": n_fused, "layers": [layer indices]}``. Guarantees ``moe_fused``.

Before (one block, K = 1, E experts; trimmed)::

    reshape_12 = aten.reshape(mul_26, [-1, 64])
    linear_11 = aten.linear(reshape_12, router_weight)
    topk = aten.topk(linear_11, 1, 1); getitem = topk[0]; getitem_1 = topk[1]
    scatter_ = aten.scatter_(aten.full_like(linear_11, -inf), 1, getitem_1, getitem)
    sigmoid = aten.sigmoid(aten.to(scatter_, float32))
    mul_27 = aten.mul(aten.repeat(reshape_12, [E, 1]), aten.reshape(aten.transpose(..), [-1, 1]))
    bmm = aten.bmm(aten.view(mul_27, [E, -1, 64]), experts_gate_up_proj)
    ... chunk, silu, mul ...; bmm_1 = aten.bmm(mul_28, experts_down_proj)
    linear_14 = aten.linear(mul_29, shared_expert_down_proj_weight)    # after gate/up linears
    add_ = aten.add_(linear_14, aten.sum(aten.reshape(aten.view(bmm_1, ..), [E, -1, 64]), [0]))

After::

    reshape_12 = aten.reshape(mul_26, [-1, 64])
    moe = l4.moe(reshape_12, router_weight, experts_gate_up_proj, experts_down_proj,
                 shared_expert_gate_proj_weight, shared_expert_up_proj_weight,
                 shared_expert_down_proj_weight, 1)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx

from l4compile.errors import L4Error
from l4compile.ops import moe as _moe_op  # noqa: F401  (registers torch.ops.l4.moe)

from ._provenance import innermost_module, layer_index
from ._registry import PassContext, PassResult, register_pass

aten = torch.ops.aten
MOE_CLASS = "Llama4TextMoe"
_ADD_OPS = (aten.add_.Tensor, aten.add.Tensor)


@dataclass(frozen=True)
class FuseMoeOptions:
    require_match: bool = True     # raise if no MoE block, or not every config.moe_layers entry, is found


def _attr(node, target: str) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "get_attr" and str(node.target) == target


class _Block:
    """The nodes of one MoE module and the pieces the fused op needs."""

    def __init__(self, path: str, nodes: list[torch.fx.Node]):
        self.path, self.nodes, self.layer = path, nodes, layer_index(path)

    def fail(self, why: str):
        raise L4Error(f"fuse_moe: cannot match the MoE block of layer {self.layer} ({self.path}): {why}; "
                      f"the graph is not the transformers Llama4TextMoe pattern (skip the pass with "
                      f"--skip-pass fuse_moe to compile it unfused)")

    def _one(self, what: str, pred) -> torch.fx.Node:
        hits = [n for n in self.nodes if pred(n)]
        if len(hits) != 1:
            self.fail(f"expected exactly one {what}, found {len(hits)}")
        return hits[0]

    def _linear(self, what: str, weight: str) -> torch.fx.Node:
        target = f"{self.path}.{weight}"
        return self._one(f"{what} linear on '{target}'",
                         lambda n: n.target == aten.linear.default and len(n.args) == 2
                         and _attr(n.args[1], target))

    def match(self) -> dict:
        p = self.path
        router = self._linear("router", "router.weight")
        x = router.args[0]
        topk = self._one("topk", lambda n: n.target == aten.topk.default)
        if topk.args[0] is not router:
            self.fail("topk does not read the router logits")
        k = topk.args[1] if len(topk.args) > 1 else topk.kwargs.get("k")
        dim = topk.args[2] if len(topk.args) > 2 else topk.kwargs.get("dim", -1)
        n_exp = router.args[1].meta.get("val").shape[0] if "val" in router.args[1].meta else None
        if not isinstance(k, int) or dim not in (1, -1):
            self.fail(f"topk has k={k!r}, dim={dim!r}; expected a constant k over the expert dim")
        if n_exp is not None and not 1 <= k <= n_exp:
            self.fail(f"top-k {k} out of range for {n_exp} experts")
        if not any(n.target == aten.sigmoid.default for n in self.nodes):
            self.fail("no sigmoid of the router scores")
        gate_up = self._one("experts gate_up bmm",
                            lambda n: n.target == aten.bmm.default and _attr(n.args[1], f"{p}.experts.gate_up_proj"))
        down = self._one("experts down bmm",
                         lambda n: n.target == aten.bmm.default and _attr(n.args[1], f"{p}.experts.down_proj"))
        if sum(n.target == aten.bmm.default for n in self.nodes) != 2:
            self.fail("unexpected extra bmm in the routed experts")
        sg = self._linear("shared gate", "shared_expert.gate_proj.weight")
        su = self._linear("shared up", "shared_expert.up_proj.weight")
        sd = self._linear("shared down", "shared_expert.down_proj.weight")
        if sg.args[0] is not x or su.args[0] is not x:
            self.fail("shared expert gate/up do not read the block input")
        if sum(n.target == aten.silu.default for n in self.nodes) != 2:
            self.fail("expected SiLU in the routed experts and the shared expert")
        members = set(self.nodes)
        leaving = [n for n in self.nodes if n is not x and any(u not in members for u in n.users)]
        if len(leaving) != 1:
            self.fail(f"expected one output leaving the block, found {[n.name for n in leaving]}")
        out = leaving[0]
        if out.target not in _ADD_OPS or out.args[0] is not sd:
            self.fail(f"block output {out.name} is not shared_expert(x) + routed experts")
        return dict(x=x, out=out, k=k, args=(x, router.args[1], gate_up.args[1], down.args[1],
                                             sg.args[1], su.args[1], sd.args[1], k))


def _blocks(gm: torch.fx.GraphModule) -> list[_Block]:
    groups: dict[str, list[torch.fx.Node]] = {}
    for n in gm.graph.nodes:
        if n.op == "call_function":
            path = innermost_module(n, MOE_CLASS)
            if path is not None:
                groups.setdefault(path, []).append(n)
    return [_Block(p, ns) for p, ns in groups.items()]


def _expected_layers(config) -> list[int] | None:
    layers = getattr(config, "moe_layers", None)
    return sorted(int(i) for i in layers) if layers is not None else None


@register_pass("fuse_moe", guarantees=("moe_fused",), options=FuseMoeOptions)
def fuse_moe(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """Fuse each Llama4TextMoe block (router, top-k experts, shared expert) into one l4.moe op."""
    opts = ctx.options if isinstance(ctx.options, FuseMoeOptions) else FuseMoeOptions()
    blocks = _blocks(gm)
    matched = [(b, b.match()) for b in blocks]          # match everything before touching the graph
    expected = _expected_layers(ctx.model_config)
    found = sorted(b.layer for b in blocks)
    if opts.require_match and expected is not None:
        n_layers = getattr(ctx.model_config, "num_hidden_layers", None)
        expected = [i for i in expected if n_layers is None or i < n_layers]
        missing = sorted(set(expected) - set(found))
        if missing:
            raise L4Error(f"fuse_moe: config declares MoE layers {missing} but the graph has no Llama4TextMoe "
                          f"block for them (was the graph traced from a different model?)")
    if opts.require_match and not blocks:
        raise L4Error("fuse_moe: found no Llama4TextMoe block in the graph (every Llama 4 text model has MoE "
                      "layers); was the graph traced with l4compile.program.trace?")
    graph = gm.graph
    for block, m in matched:
        with graph.inserting_before(m["out"]):
            fused = graph.call_function(torch.ops.l4.moe.default, m["args"])
        fused.meta = dict(m["out"].meta)                 # provenance (nn_module_stack) and "val" of the block
        m["out"].replace_all_uses_with(fused)
        keep, erased = {m["x"]}, set()
        for n in reversed(block.nodes):                  # reverse graph order: users before producers
            if n not in keep and not n.users:
                graph.erase_node(n)
                erased.add(n)
        left = [n.name for n in block.nodes if n not in keep and n not in erased]
        if left:
            raise L4Error(f"fuse_moe: layer {block.layer}: nodes {left} of the MoE block are still used "
                          f"after fusion")
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    layers = sorted(b.layer for b, _ in matched)
    return PassResult(gm=gm, changed=bool(matched), stats={"matches": len(matched), "layers": layers})
