# T tokens, Tr this rank's tokens, E experts, L local experts, H hidden, I expert width, K top-k, W world size
"""``l4::moe_ep``: the Llama 4 MoE block, expert-parallel over a torch.distributed process group.

Contract: the same math as ``l4::moe`` (see ``l4compile.ops.moe``), computed by W processes that each hold
the whole ``x`` (attention, dense layers and the shared expert are replicated) but only their own experts::

    moe_ep(x, router_w, gate_up_local, down_local, shared_gate, shared_up, shared_down, top_k,
           rank_of_expert, rank, world_size) == moe(x, router_w, gate_up, down, ..., top_k)

* ``rank_of_expert`` [E] names the rank that holds each expert; this rank's ``gate_up_local`` [L, H, 2I] and
  ``down_local`` [L, I, H] hold its experts in ascending global id order. ``rank`` / ``world_size`` are what
  the artifact was compiled for and are checked against the default process group.
* Every rank owns a contiguous slice of the tokens (``Tr ~ T / W``): it routes them with the full
  (replicated) router and computes their shared expert. Dispatch: the per-expert assignment counts go to
  every rank first (``all_gather``, [W, E]), then each (token, expert) assignment's scaled input ``s * x``
  goes to the expert's rank (``all_to_all_single``); each rank runs its experts grouped by expert, in global
  token order (as ``l4::moe``); the results come back the same way and are ``index_add``-ed into the shared
  expert's output; finally an ``all_gather`` replicates the [T, H] output on every rank for the next layer.
  Four collectives per MoE layer, none of them sized by E.
* Collectives use the default process group (``init_process_group``: gloo on CPU, NCCL on CUDA). With
  ``world_size == 1`` no process group is needed. The Python implementation is what AOTInductor's proxy
  executor calls back, so a compiled ``.pt2`` performs the collectives from inside the engine.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .moe import _route, _shared

__all__ = ["moe_ep"]


def _check_group(rank: int, world_size: int) -> None:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"l4::moe_ep: this engine shard is rank {rank} of {world_size} and needs a "
                           "torch.distributed process group; run it with torchrun -m l4compile.dist or "
                           f"`l4compile run ENGINE --nproc {world_size}`")
    if dist.get_world_size() != world_size or dist.get_rank() != rank:
        raise RuntimeError(f"l4::moe_ep: artifact compiled for rank {rank} of {world_size}, running as rank "
                           f"{dist.get_rank()} of {dist.get_world_size()}")


def _token_slice(t: int, rank: int, world: int) -> tuple[int, int]:
    per, extra = divmod(t, world)
    lo = rank * per + min(rank, extra)
    return lo, lo + per + (1 if rank < extra else 0)


def _run_experts(z: Tensor, counts: list[int], gate_up: Tensor, down: Tensor) -> Tensor:
    """z [R, H] grouped by local expert (counts [L]) -> expert outputs [R, H]."""
    i_dim = down.shape[1]
    y = torch.empty_like(z)
    start = 0
    for e, c in enumerate(counts):                                # loop over LOCAL experts, never tokens
        if c:
            gate, up = torch.mm(z[start:start + c], gate_up[e]).split(i_dim, dim=1)   # [c, I] each
            torch.mm(up * F.silu(gate), down[e], out=y[start:start + c])           # [c, H]
            start += c
    return y


@torch.library.custom_op("l4::moe_ep", mutates_args=())
def moe_ep(x: Tensor, router_w: Tensor, gate_up: Tensor, down: Tensor, shared_gate: Tensor, shared_up: Tensor,
           shared_down: Tensor, top_k: int, rank_of_expert: list[int], rank: int, world_size: int) -> Tensor:
    """x [T, H] (the same on every rank) -> [T, H] (the same on every rank); see the module docstring."""
    if world_size == 1:
        from .moe import moe
        return moe(x, router_w, gate_up, down, shared_gate, shared_up, shared_down, top_k)
    import torch.distributed as dist

    _check_group(rank, world_size)
    n_exp, hidden, dev = router_w.shape[0], x.shape[1], x.device
    owner = torch.tensor(rank_of_expert, dtype=torch.int64, device=dev)                  # [E]
    local = [e for e in range(n_exp) if rank_of_expert[e] == rank]                      # [L] ascending
    lo, hi = _token_slice(x.shape[0], rank, world_size)
    xs = x[lo:hi]                                                                       # [Tr, H]
    idx, score = _route(xs, router_w, top_k)                                            # [Tr, K] each
    out = _shared(xs, shared_gate, shared_up, shared_down)                              # [Tr, H]

    # dispatch: sort this rank's assignments by (destination rank, expert), token order kept within
    flat_e = idx.reshape(-1)                                                            # [A]
    order = torch.argsort(owner[flat_e] * n_exp + flat_e, stable=True)                  # [A]
    tok = order // top_k if top_k > 1 else order                                        # [A]
    send = xs.index_select(0, tok) * score.reshape(-1).index_select(0, order).unsqueeze(1)   # [A, H]
    counts = torch.bincount(flat_e, minlength=n_exp)                                    # [E]
    gathered = [torch.empty_like(counts) for _ in range(world_size)]
    dist.all_gather(gathered, counts)                                                   # counts first
    c = torch.stack(gathered).tolist()                                                  # [W][E] host ints
    send_splits = [sum(c[rank][e] for e in range(n_exp) if rank_of_expert[e] == d) for d in range(world_size)]
    recv_splits = [sum(c[s][e] for e in local) for s in range(world_size)]
    recv = xs.new_empty(sum(recv_splits), hidden)                                       # [R, H] by (source, expert)
    dist.all_to_all_single(recv, send.contiguous(), recv_splits, send_splits)

    # regroup by (expert, source): the global token order, as l4::moe sees it
    blocks = torch.tensor([c[s][e] for s in range(world_size) for e in local], dtype=torch.int64, device=dev)
    slot = torch.arange(len(local), device=dev).repeat(world_size)                      # [W*L]
    group = torch.argsort(torch.repeat_interleave(slot, blocks), stable=True)           # [R]
    y_grouped = _run_experts(recv.index_select(0, group), [sum(c[s][e] for s in range(world_size)) for e in local],
                             gate_up, down)                                             # [R, H]
    y = torch.empty_like(y_grouped).index_copy_(0, group, y_grouped)                    # [R, H] by (source, expert)

    # combine: results go back to the ranks that own the tokens, then every rank gets every token
    back = xs.new_empty(send.shape[0], hidden)                                          # [A, H]
    dist.all_to_all_single(back, y, send_splits, recv_splits)
    out.index_add_(0, tok, back)
    width = _token_slice(x.shape[0], 0, world_size)[1]                                  # the largest slice
    padded = out.new_zeros(width, hidden)
    padded[:out.shape[0]] = out
    parts = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:b - a] for p, (a, b) in
                      ((parts[r], _token_slice(x.shape[0], r, world_size)) for r in range(world_size))])


@moe_ep.register_fake
def _moe_ep_fake(x, router_w, gate_up, down, shared_gate, shared_up, shared_down, top_k, rank_of_expert, rank,
                 world_size):
    torch._check(x.dim() == 2 and gate_up.dim() == 3 and down.dim() == 3, lambda: "l4::moe_ep: bad ranks")
    torch._check(len(rank_of_expert) == router_w.shape[0], lambda: "l4::moe_ep: rank_of_expert must cover E")
    torch._check(0 <= rank < world_size, lambda: "l4::moe_ep: rank out of range")
    return torch.empty_like(x)
