# T tokens, Tr this rank's tokens, E experts, L local experts, H hidden, I expert width, K top-k, W world size
"""``l4::moe_ep``: the Llama 4 MoE block, expert-parallel over a torch.distributed process group.

Contract: the same math as ``l4::moe`` (see ``l4compile.ops.moe``), computed by W processes that each hold
the whole ``x`` (tokens are replicated: attention runs replicated or tensor-parallel) but only their own
experts::

    moe_ep(x, router_w, gate_up_local, down_local, shared_gate, shared_up, shared_down, top_k,
           rank_of_expert, rank, world_size, shared_sharded) == moe(x, router_w, gate_up, down, ..., top_k)

* ``rank_of_expert`` [E] names the rank that holds each expert; this rank's ``gate_up_local`` [L, H, 2I] and
  ``down_local`` [L, I, H] hold its experts in ascending global id order. ``rank`` / ``world_size`` are what
  the artifact was compiled for and are checked against the default process group.
* ``shared_sharded=False`` (the shared expert is replicated: ``shared_gate/up`` [I, H], ``shared_down``
  [H, I]): every rank owns a contiguous slice of the tokens (``Tr ~ T / W``): it routes them with the full
  (replicated) router and computes their shared expert. Dispatch: the per-expert assignment counts go to
  every rank first (``all_gather``, [W, E]), then each (token, expert) assignment's scaled input ``s * x``
  goes to the expert's rank (``all_to_all_single``); each rank runs its experts grouped by expert, in global
  token order (as ``l4::moe``); the results come back the same way and are ``index_add``-ed into the shared
  expert's output; finally an ``all_gather`` replicates the [T, H] output on every rank for the next layer.
  Four collectives per MoE layer, none of them sized by E.
* ``shared_sharded=True`` (the shared expert is tensor-parallel: this rank's ``shared_gate/up`` hold rows
  [r*I/W, (r+1)*I/W) and ``shared_down`` the matching columns, [H, I/W]): every rank routes ALL T tokens
  (the same x and router on every rank give the same routing), computes its shared-expert partial sum
  (its I/W columns of the SwiGLU) for every token and adds the outputs of its own experts for the
  assignments routed to them; one ``all_reduce`` (sum) then gives every rank the whole output. Each routed
  (token, expert) term lives on exactly one rank and each shared column block on exactly one rank, so the
  sum counts the shared expert once and every routed term once. One collective per MoE layer (the
  all-reduce the planner's cost model assumes for TP attention + EP experts).
* ``l4::moe_ep_q`` is the same on quantized weights (the arguments of ``l4::moe_q``, ``l4compile.ops.quant``,
  with this rank's experts): only the expert and shared-expert arithmetic differ (``ep_forward`` takes them
  as functions), the dispatch and combine are shared.
* Collectives use the default process group (``init_process_group``: gloo on CPU, NCCL on CUDA). With
  ``world_size == 1`` no process group is needed. The Python implementation is what AOTInductor's proxy
  executor calls back, so a compiled ``.pt2`` performs the collectives from inside the engine.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from typing import Callable

from ._group import check_group
from .moe import _route, _shared

__all__ = ["moe_ep", "moe_ep_q"]

Shared = Callable[[Tensor], Tensor]                      # x [T, H] -> shared expert output (or partial) [T, H]
Experts = Callable[[Tensor, list], Tensor]               # z [R, H] grouped by local expert, counts [L] -> [R, H]


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


def _reduce_combine(x: Tensor, router_w: Tensor, top_k: int, rank_of_expert: list[int], rank: int,
                    shared: Shared, experts: Experts) -> Tensor:
    """Shared expert TP-sharded: this rank's shared partial + its experts' terms over all T tokens, summed
    over ranks by one all_reduce -> [T, H]."""
    import torch.distributed as dist

    n_exp, dev = router_w.shape[0], x.device
    local = [e for e in range(n_exp) if rank_of_expert[e] == rank]                      # [L] ascending
    idx, score = _route(x, router_w, top_k)                                             # [T, K] each
    out = shared(x)                                                                     # [T, H] partial over I/W
    slot_of = torch.full((n_exp,), -1, dtype=torch.int64, device=dev)                   # [E] global -> local
    slot_of[torch.tensor(local, dtype=torch.int64, device=dev)] = torch.arange(len(local), device=dev)
    flat = slot_of[idx.reshape(-1)]                                                     # [A] local slot or -1
    mine = torch.nonzero(flat >= 0).squeeze(1)                                          # [Ar] (token, k) order
    slot = flat.index_select(0, mine)                                                   # [Ar]
    sel = mine.index_select(0, torch.argsort(slot, stable=True))                        # [Ar] by expert, token order
    tok = sel // top_k if top_k > 1 else sel                                            # [Ar]
    z = x.index_select(0, tok) * score.reshape(-1).index_select(0, sel).unsqueeze(1)    # [Ar, H] s * x
    counts = torch.bincount(slot, minlength=len(local)).tolist()                        # [L] host ints
    out.index_add_(0, tok, experts(z, counts))
    dist.all_reduce(out)                                                                # sum over ranks
    return out


def _dispatch_combine(x: Tensor, router_w: Tensor, top_k: int, rank_of_expert: list[int], rank: int,
                      world_size: int, shared: Shared, experts: Experts) -> Tensor:
    """Shared expert replicated: token slices, all_to_all dispatch and return, all_gather -> [T, H]."""
    import torch.distributed as dist

    n_exp, hidden, dev = router_w.shape[0], x.shape[1], x.device
    owner = torch.tensor(rank_of_expert, dtype=torch.int64, device=dev)                  # [E]
    local = [e for e in range(n_exp) if rank_of_expert[e] == rank]                      # [L] ascending
    lo, hi = _token_slice(x.shape[0], rank, world_size)
    xs = x[lo:hi]                                                                       # [Tr, H]
    idx, score = _route(xs, router_w, top_k)                                            # [Tr, K] each
    out = shared(xs)                                                                    # [Tr, H]

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
    y_grouped = experts(recv.index_select(0, group), [sum(c[s][e] for s in range(world_size)) for e in local])
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


def ep_forward(x: Tensor, router_w: Tensor, top_k: int, rank_of_expert: list[int], rank: int, world_size: int,
               shared_sharded: bool, shared: Shared, experts: Experts) -> Tensor:
    """The expert-parallel MoE over any expert / shared-expert arithmetic (float or quantized weights)."""
    check_group("l4::moe_ep", rank, world_size)
    if shared_sharded:
        return _reduce_combine(x, router_w, top_k, rank_of_expert, rank, shared, experts)
    return _dispatch_combine(x, router_w, top_k, rank_of_expert, rank, world_size, shared, experts)


@torch.library.custom_op("l4::moe_ep", mutates_args=())
def moe_ep(x: Tensor, router_w: Tensor, gate_up: Tensor, down: Tensor, shared_gate: Tensor, shared_up: Tensor,
           shared_down: Tensor, top_k: int, rank_of_expert: list[int], rank: int, world_size: int,
           shared_sharded: bool = False) -> Tensor:
    """x [T, H] (the same on every rank) -> [T, H] (the same on every rank); see the module docstring."""
    if world_size == 1:
        from .moe import moe
        return moe(x, router_w, gate_up, down, shared_gate, shared_up, shared_down, top_k)
    return ep_forward(x, router_w, top_k, rank_of_expert, rank, world_size, shared_sharded,
                      lambda h: _shared(h, shared_gate, shared_up, shared_down),
                      lambda z, counts: _run_experts(z, counts, gate_up, down))


@moe_ep.register_fake
def _moe_ep_fake(x, router_w, gate_up, down, shared_gate, shared_up, shared_down, top_k, rank_of_expert, rank,
                 world_size, shared_sharded=False):
    torch._check(x.dim() == 2 and gate_up.dim() == 3 and down.dim() == 3, lambda: "l4::moe_ep: bad ranks")
    torch._check(len(rank_of_expert) == router_w.shape[0], lambda: "l4::moe_ep: rank_of_expert must cover E")
    torch._check(0 <= rank < world_size, lambda: "l4::moe_ep: rank out of range")
    return torch.empty_like(x)


# ------------------------------------------------------------------------------------------ quantized weights

@torch.library.custom_op("l4::moe_ep_q", mutates_args=())
def moe_ep_q(x: Tensor, router_w: Tensor, gate_up_q: Tensor, gate_up_s: Tensor, down_q: Tensor, down_s: Tensor,
             shared_gate_q: Tensor, shared_gate_s: Tensor, shared_up_q: Tensor, shared_up_s: Tensor,
             shared_down_q: Tensor, shared_down_s: Tensor, top_k: int, rank_of_expert: list[int], rank: int,
             world_size: int, shared_sharded: bool = False) -> Tensor:
    """``l4::moe_q`` (fp8 / int4 weights, ``l4compile.ops.quant``) expert-parallel: ``moe_ep``'s dispatch
    with this rank's quantized experts ``gate_up_q`` [L, 2I, H(/2)], ``down_q`` [L, H, I(/2)] (and scales)."""
    from .quant import _expert, moe_q, qlinear

    if world_size == 1:
        return moe_q(x, router_w, gate_up_q, gate_up_s, down_q, down_s, shared_gate_q, shared_gate_s, shared_up_q,
                     shared_up_s, shared_down_q, shared_down_s, top_k)

    def shared(h: Tensor) -> Tensor:
        return qlinear(F.silu(qlinear(h, shared_gate_q, shared_gate_s)) * qlinear(h, shared_up_q, shared_up_s),
                       shared_down_q, shared_down_s)

    def experts(z: Tensor, counts: list[int]) -> Tensor:
        y, start = torch.empty_like(z), 0
        for e, c in enumerate(counts):                                                  # LOCAL experts
            if c:
                y[start:start + c] = _expert(z[start:start + c], gate_up_q[e], gate_up_s[e], down_q[e], down_s[e])
                start += c
        return y

    return ep_forward(x, router_w, top_k, rank_of_expert, rank, world_size, shared_sharded, shared, experts)


@moe_ep_q.register_fake
def _moe_ep_q_fake(x, router_w, gate_up_q, gate_up_s, down_q, down_s, shared_gate_q, shared_gate_s, shared_up_q,
                   shared_up_s, shared_down_q, shared_down_s, top_k, rank_of_expert, rank, world_size,
                   shared_sharded=False):
    torch._check(x.dim() == 2 and gate_up_q.dim() == 3 and down_q.dim() == 3, lambda: "l4::moe_ep_q: bad ranks")
    torch._check(len(rank_of_expert) == router_w.shape[0], lambda: "l4::moe_ep_q: rank_of_expert must cover E")
    torch._check(0 <= rank < world_size, lambda: "l4::moe_ep_q: rank out of range")
    return torch.empty_like(x)
