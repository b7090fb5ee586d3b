"""The process-group check shared by the l4 ops that communicate (``l4::moe_ep``, ``l4::all_reduce``).

A sharded engine's rank artifact is compiled for one (rank, world size); running it in a process group of
another shape would silently compute the wrong thing (or hang), so every collective op checks first.
"""
from __future__ import annotations


def check_group(op: str, rank: int, world_size: int) -> None:
    """Raise RuntimeError unless the default process group exists and this process is ``rank`` of ``world_size``."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{op}: this engine shard is rank {rank} of {world_size} and needs a "
                           "torch.distributed process group; run it with torchrun -m l4compile.dist or "
                           f"`l4compile run ENGINE --nproc {world_size}`")
    if dist.get_world_size() != world_size or dist.get_rank() != rank:
        raise RuntimeError(f"{op}: artifact compiled for rank {rank} of {world_size}, running as rank "
                           f"{dist.get_rank()} of {dist.get_world_size()}")
