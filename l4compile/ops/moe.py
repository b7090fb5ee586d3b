# T tokens, E experts, H hidden, I expert width, K top-k, A = T*K routed assignments
"""``l4::moe``: the Llama 4 MoE block (router + top-k routed SwiGLU experts + shared expert) as one op.

Contract (exactly transformers' ``Llama4TextMoe``, with no token dropping)::

    logits = x @ router_w^T                                   # [T, E]
    val, idx = topk(logits, K, dim=1)                         # [T, K]
    s = sigmoid(val.float()).to(x.dtype)                      # raw-logit sigmoid, no renormalisation
    y = Shared(x) + sum_k Expert_{idx[:, k]}(s[:, k] * x)     # the score scales the expert INPUT
    Expert_e(z) = (up * silu(gate)) @ down[e],  [gate | up] = z @ gate_up[e]
    Shared(x)   = (silu(x @ shared_gate^T) * (x @ shared_up^T)) @ shared_down^T

Weights keep the HF layouts, so the pass wires the existing parameters in with no copies:
router_w [E, H] (nn.Linear), gate_up [E, H, 2I] (gate = first I columns), down [E, I, H],
shared_gate / shared_up [I, H] and shared_down [H, I] (nn.Linear).

Only the selected experts are computed: the A = T*K (token, expert) assignments are sorted by expert,
the tokens gathered once, and each expert runs one matmul pair on its contiguous slice; results are
scattered back with ``index_add``. Nothing of size [T, E, ...] beyond the router logits is built.

Backends
--------
* Eager / ``torch.export``: the op is opaque (``register_fake`` gives its shape), so export keeps one
  ``l4.moe`` node per block; the token count stays symbolic and routing never causes a recompile.
* Inductor / AOTInductor: the op stays OPAQUE and AOTI calls it back through the proxy executor, so a
  ``.pt2`` loads in a fresh process after ``import l4compile.ops`` (without it, loading fails with
  "Could not find schema for l4::moe"). Why not an Inductor decomposition: the natural static-shape
  form (argsort + ``searchsorted`` offsets + ``aten._grouped_mm``, see ``moe_decomposition``) fails in
  torch 2.13 for float32 because ``_grouped_mm``'s meta function only admits bf16 (its CPU kernel takes
  fp32); a per-expert loop in a decomposition needs E data-dependent (unbacked) sizes. The opaque op
  keeps one code path for every dtype, never recompiles for a routing (sizes are data-dependent only
  inside the kernel) and runs our expert-grouped CPU kernel, which measured faster than
  ``_grouped_mm`` on CPU. Cost: a Python callback per MoE layer per call (needs the Python runtime).
  ``DECOMPOSITIONS`` (bf16 only) is there for a backend that wants pure aten, e.g. CUDA bf16, via
  ``ExportedProgram.run_decompositions(DECOMPOSITIONS)``.
* CUDA: ``l4compile.kernels`` registers the fused Triton MoE (``l4::moe_fused``, a ``triton_op``: static
  shapes, no host sync) as this op's CUDA kernel and, for ``--device cuda`` Inductor engines, as its decomposition,
  so AOTInductor compiles the kernels into the package.
* ONNX (future): with standard ops, TopK -> Sigmoid -> then, unrolled for each expert e (E is static):
  Equal(idx, e) -> NonZero -> Gather(x) -> Mul(score) -> MatMul(gate_up[e]) -> Split -> Sigmoid/Mul
  (SiLU) -> Mul -> MatMul(down[e]) -> ScatterND(reduction=add) into the shared-expert output.
  ``com.microsoft.MoE`` scales expert OUTPUTS, which is wrong for Llama 4 in general (SwiGLU is not
  linear); for K = 1 it can still be used by feeding it ``s * x`` and router logits that are -inf
  except at the selected expert (softmax weight exactly 1).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["moe", "moe_reference", "moe_decomposition", "DECOMPOSITIONS"]


def _route(x: Tensor, router_w: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """-> expert index [T, K] and input scale [T, K] (x.dtype), exactly as HF's Llama4Router."""
    logits = F.linear(x, router_w)                                # [T, E]
    val, idx = torch.topk(logits, top_k, dim=1)                   # [T, K]
    return idx, torch.sigmoid(val.float()).to(x.dtype)


def _shared(x: Tensor, shared_gate: Tensor, shared_up: Tensor, shared_down: Tensor) -> Tensor:
    return F.linear(F.silu(F.linear(x, shared_gate)) * F.linear(x, shared_up), shared_down)   # [T, H]


def _sort_assignments(idx: Tensor, score: Tensor, top_k: int):
    """Sort the A = T*K assignments by expert -> (order [A], token [A], scale [A, 1], sorted expert [A])."""
    flat_e = idx.reshape(-1)                                      # [A]
    order = torch.argsort(flat_e, stable=True)                    # [A]
    tok = order // top_k if top_k > 1 else order                  # [A] token of each sorted assignment
    scale = score.reshape(-1).index_select(0, order).unsqueeze(1)  # [A, 1]
    return order, tok, scale, flat_e.index_select(0, order)


@torch.library.custom_op("l4::moe", mutates_args=())
def moe(x: Tensor, router_w: Tensor, gate_up: Tensor, down: Tensor, shared_gate: Tensor,
        shared_up: Tensor, shared_down: Tensor, top_k: int) -> Tensor:
    """x [T, H] -> [T, H]; see the module docstring. On CUDA, ``l4compile.kernels.dispatch`` registers the
    fused Triton kernel (``l4::moe_fused``) as this op's CUDA implementation; other devices run ``_moe_impl``."""
    return _moe_impl(x, router_w, gate_up, down, shared_gate, shared_up, shared_down, top_k)


def _moe_impl(x: Tensor, router_w: Tensor, gate_up: Tensor, down: Tensor, shared_gate: Tensor,
              shared_up: Tensor, shared_down: Tensor, top_k: int) -> Tensor:
    """The expert-grouped eager implementation (host sync for the group sizes; any device)."""
    idx, score = _route(x, router_w, top_k)
    out = _shared(x, shared_gate, shared_up, shared_down)         # [T, H]
    n_exp, i_dim = down.shape[0], down.shape[1]
    if top_k == 1 and x.shape[0] == 1:                            # decode fast path: one token, one expert
        e = int(idx)
        z = x * score                                             # [1, H]
        gate, up = torch.mm(z, gate_up[e]).split(i_dim, dim=1)    # [1, I] each
        return out.add_(torch.mm(up * F.silu(gate), down[e]))
    order, tok, scale, _ = _sort_assignments(idx, score, top_k)
    counts = torch.bincount(idx.reshape(-1), minlength=n_exp).tolist()   # [E] host ints
    z = x.index_select(0, tok) * scale                            # [A, H] expert inputs, sorted
    y = torch.empty_like(z)                                       # [A, H]
    start = 0
    for e, c in enumerate(counts):                                # loop over EXPERTS, never tokens
        if c:
            gate, up = torch.mm(z[start:start + c], gate_up[e]).split(i_dim, dim=1)   # [c, I] each
            torch.mm(up * F.silu(gate), down[e], out=y[start:start + c])           # [c, H]
            start += c
    return out.index_add_(0, tok, y)


@moe.register_fake
def _moe_fake(x, router_w, gate_up, down, shared_gate, shared_up, shared_down, top_k):
    torch._check(x.dim() == 2 and gate_up.dim() == 3 and down.dim() == 3, lambda: "l4::moe: bad ranks")
    torch._check(1 <= top_k <= router_w.shape[0], lambda: "l4::moe: top_k out of range")
    return torch.empty_like(x)


def moe_decomposition(x: Tensor, router_w: Tensor, gate_up: Tensor, down: Tensor, shared_gate: Tensor,
                      shared_up: Tensor, shared_down: Tensor, top_k: int) -> Tensor:
    """Static-shape aten form of ``l4::moe``: no data-dependent sizes, no host sync. Traceable (fake
    tensors) for bf16 only in torch 2.13 (``_grouped_mm`` meta); runs eagerly for any dtype."""
    n_exp, i_dim = down.shape[0], down.shape[1]
    idx, score = _route(x, router_w, top_k)
    out = _shared(x, shared_gate, shared_up, shared_down)         # [T, H]
    order, tok, scale, sorted_e = _sort_assignments(idx, score, top_k)
    experts = torch.arange(n_exp, device=x.device, dtype=sorted_e.dtype)          # [E]
    offs = torch.searchsorted(sorted_e, experts, right=True).to(torch.int32)      # [E] group ends
    z = x.index_select(0, tok) * scale                            # [A, H]
    gate_up_out = torch._grouped_mm(z, gate_up, offs=offs)        # [A, 2I]
    gate, up = gate_up_out.split(i_dim, dim=1)                    # [A, I] each
    y = torch._grouped_mm(up * F.silu(gate), down, offs=offs)     # [A, H]
    return out.index_add(0, tok, y)


DECOMPOSITIONS = {torch.ops.l4.moe.default: moe_decomposition}


def moe_reference(x: Tensor, router_w: Tensor, gate_up: Tensor, down: Tensor, shared_gate: Tensor,
                  shared_up: Tensor, shared_down: Tensor, top_k: int) -> Tensor:
    """Plain transcription of transformers' Llama4TextMoe.forward (dense over all E experts), for tests."""
    n_exp, hidden = gate_up.shape[0], x.shape[1]
    logits = F.linear(x, router_w)                                # [T, E]
    val, idx = torch.topk(logits, top_k, dim=1)
    scores = torch.full_like(logits, float("-inf")).scatter_(1, idx, val)
    scores = torch.sigmoid(scores.float()).to(scores.dtype)       # [T, E], 0 where not selected
    routed_in = x.repeat(n_exp, 1) * scores.transpose(0, 1).reshape(-1, 1)   # [E*T, H]
    h = torch.bmm(routed_in.view(n_exp, -1, hidden), gate_up)    # [E, T, 2I]
    gate, up = h.chunk(2, dim=-1)
    routed = torch.bmm(up * F.silu(gate), down).view(-1, hidden)  # [E*T, H]
    out = _shared(x, shared_gate, shared_up, shared_down)
    return out.add_(routed.reshape(n_exp, -1, hidden).sum(dim=0))
