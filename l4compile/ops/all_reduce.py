# W world size; x any shape
"""``l4::all_reduce``: the sum of a tensor over every rank of the default process group, as a pure op.

Contract::

    all_reduce(x, rank, world_size) -> sum over ranks r of x_r      # same shape and dtype as x, a new tensor

* Tensor parallelism (``passes/shard_tensor_parallel.py``) puts it after every row-split matmul (attention
  ``o_proj``, a dense MLP's ``down_proj``): each rank holds a partial sum ``[.., H]`` over its slice of the
  contracted dimension and needs the full one. Every rank gets bit-identical results (gloo and NCCL
  all-reduce broadcast one reduced value), which the replicated work after it (norms, the router) relies on.
* ``rank`` / ``world_size`` are what the artifact was compiled for and are checked against the default
  process group (gloo on CPU, NCCL on CUDA); with ``world_size == 1`` it is a copy and needs no group.
* Functional (``mutates_args=()``): the input is never written, so export and Inductor treat it as a pure
  op. It has no decomposition: AOTInductor keeps it opaque and calls this implementation back through its
  proxy executor (like ``l4::moe_ep``), so a compiled ``.pt2`` performs the collective from inside the
  engine, in graph order (every rank's graph is the same sequence of collectives, ordered by data
  dependencies, so no rank can wait on a different one).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._group import check_group

__all__ = ["all_reduce"]


@torch.library.custom_op("l4::all_reduce", mutates_args=())
def all_reduce(x: Tensor, rank: int, world_size: int) -> Tensor:
    """x [..] (this rank's partial) -> [..] the sum over all ranks, identical on every rank."""
    out = x.clone(memory_format=torch.contiguous_format)
    if world_size == 1:
        return out
    import torch.distributed as dist

    check_group("l4::all_reduce", rank, world_size)
    dist.all_reduce(out)
    return out


@all_reduce.register_fake
def _all_reduce_fake(x, rank, world_size):
    torch._check(0 <= rank < world_size, lambda: "l4::all_reduce: rank out of range")
    return torch.empty_like(x, memory_format=torch.contiguous_format)
