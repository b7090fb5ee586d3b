"""Stored weights of matmuls: which get_attr tensors a matmul reads (``weights_of``), reading and deleting them, and
for the sharding passes rank-local slices of them.

# N output features, K input features, G int4 group size
A matmul on a stored weight is ``aten.linear(x, W [N, K])`` (no bias) or, after ``quantize``,
``l4.linear_fp8(x, W_q [N, K], W_s [N])`` / ``l4.linear_int4(x, W_q [N, K/2], W_s [N, K/G])``. ``Slicer`` gives
one rank's GraphModule copies of its slice of such weights (``out``: rows [lo, hi) of the weight and its
scales; ``in``: columns [lo, hi)); the tensors of the logical graph, which every rank graph shares until
sliced, are never written.
"""
from __future__ import annotations

import math

import torch
import torch.fx

from l4compile.errors import L4Error
from l4compile.ops import quant as _quant_op  # noqa: F401  (registers l4.linear_fp8 / linear_int4)
from l4compile.quant import FP8_DTYPE

aten = torch.ops.aten
LINEARS = (aten.linear.default, torch.ops.l4.linear_fp8.default, torch.ops.l4.linear_int4.default)


def weights_of(node) -> tuple[torch.fx.Node, ...] | None:
    """A matmul on a stored weight -> its get_attr nodes: ``aten.linear(x, W)`` (no bias) -> (W,);
    ``l4.linear_fp8 / linear_int4(x, W_q, W_s)`` -> (W_q, W_s). Anything else -> None."""
    if not (isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in LINEARS):
        return None
    ws = node.args[1:2] if node.target == aten.linear.default else node.args[1:3]
    if len(node.args) != len(ws) + 1 or not all(isinstance(w, torch.fx.Node) and w.op == "get_attr" for w in ws):
        return None
    return tuple(ws)


def get_tensor(gm: torch.nn.Module, target: str) -> torch.Tensor:
    """The tensor at a get_attr target (dotted path) of ``gm``."""
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def delete_tensor(gm: torch.nn.Module, target: str) -> None:
    """Remove the tensor at a get_attr target (dotted path) from the module that holds it."""
    owner_path, _, leaf = target.rpartition(".")
    delattr(gm.get_submodule(owner_path) if owner_path else gm, leaf)


class Slicer:
    """Replaces weights of one rank's GraphModule by slices (new tensors; the logical graph's stay intact).
    ``out``: output features (rows of an [N, K] weight and of its scales); ``in``: input features."""

    def __init__(self, gm: torch.fx.GraphModule):
        self.gm, self.done = gm, set()

    def _set(self, w: torch.fx.Node, value: torch.Tensor) -> None:
        target = str(w.target)
        if target in self.done:
            raise L4Error(f"shard_tensor_parallel: weight {target} is read twice; cannot split it once")
        *path, leaf = target.split(".")
        owner = self.gm.get_submodule(".".join(path)) if path else self.gm
        if isinstance(getattr(owner, leaf), torch.nn.Parameter):
            setattr(owner, leaf, torch.nn.Parameter(value.contiguous(), requires_grad=False))
        else:
            owner.register_buffer(leaf, value.contiguous())                       # quantized weights, scales
        w.meta.pop("val", None)
        self.done.add(target)

    def __call__(self, weights: tuple[torch.fx.Node, ...], split: str, lo: int, hi: int) -> None:
        w = get_tensor(self.gm, str(weights[0].target)).detach()
        if split == "out" or len(weights) == 1:                                   # rows, or float columns
            dim = 0 if split == "out" else 1
            for node in weights:
                self._set(node, get_tensor(self.gm, str(node.target)).detach().narrow(dim, lo, hi - lo))
        elif w.dtype == FP8_DTYPE:                                                # fp8 [N, K]: scales per row
            self._set(weights[0], w[:, lo:hi])
        else:                                                                     # int4 [N, K/2], scales [N, K/G]
            scale = get_tensor(self.gm, str(weights[1].target)).detach()
            k, width = 2 * w.shape[1], hi - lo
            group = k // scale.shape[1]
            if lo % 2 or width % 2:
                raise L4Error(f"shard_tensor_parallel: int4 weight {weights[0].target} packs 2 inputs per byte; "
                              f"{width} inputs per rank cannot be split")
            sub = math.gcd(group, width)                                          # local groups nest in global
            parent = torch.div(lo + torch.arange(0, width, sub), group, rounding_mode="floor")   # [width/sub]
            self._set(weights[0], w[:, lo // 2:hi // 2])
            self._set(weights[1], scale.index_select(1, parent.to(scale.device)))
