# T tokens, H hidden, M rows, K input features, N output features
"""CUDA dispatch of the l4 ops to the GPU kernels; CPU behaviour is untouched.

Two routes, the same choices in both:

* Eager (and AOTInductor's proxy executor, for ops that stay opaque): ``register_cuda_kernels`` gives
  ``l4::moe``, ``l4::moe_q``, ``l4::linear_int4`` and ``l4::linear_fp8`` a CUDA implementation
  (``register_kernel("cuda")``); tensors on any other device keep the reference implementations.
* Inductor / AOTInductor engines built with ``--device cuda``: ``cuda_decompositions`` maps the same ops to
  their kernel forms before compiling, so the ``triton_op`` bodies (host aten code + Triton kernels) and
  ``torch._scaled_mm`` are compiled INTO the ``.pt2``.

    l4::moe         -> l4::moe_fused (Triton: top-1 routing map in one kernel, grouped gate_up+SwiGLU, grouped down,
                       shared expert as group E)
    l4::moe_q       -> l4::moe_q_fused on Int4 (uint8) weights (the same, unpacking Int4 tiles in-kernel);
                       l4::moe_fp8_fused on float8 weights (the same, each row's activations quantized to
                       float8 in-kernel as linear_fp8 does; float8 dot operands on sm_89+)
    l4::linear_int4 -> l4::int4_mm   (Triton: packed-int4 GEMM/GEMV, x flattened to [M, K]); in a step whose Int4
                       GEMMs are chained by their split-K counters, l4::int4_mm_chained (the same, each launch zeroing
                       the next one's counters: backends.inductor.split_k_locks_chained); a RoPE layer's fused qkv
                       (backends.qkv_rope_fused) -> l4::int4_mm_rope (_chained): the keys' RoPE + qk-norm in its
                       epilogue, the attention taking k as it comes (``linear_int4_rope``, ``k_ready``)
    l4::linear_fp8  -> torch._scaled_mm with row-wise scales (sm89+, K and N multiples of 16), else reference
    a MoE layer's residual add + post-attention RMSNorm + router (aten, in a CUDA engine's step: backends
                       .norm_router_fused) -> l4::add_rms_norm_router (Triton, one launch), whose logits the fused
                       MoE takes (``moe_routed`` / ``moe_q_routed``: no router matmul of its own)
    that MoE's combine + the residual add after it + the next RMSNorm (aten: backends.moe_norm_fused) ->
                       l4::moe_fused_norm / moe_q_fused_norm / moe_fp8_fused_norm (``moe_routed_norm`` /
                       ``moe_q_routed_norm``: in the MoE's down launch at decode)
    l4::attention_cached -> its projection in aten, then l4::attention_fused (Triton: attention over the visible
                       cache slots and new keys, addressed by position, no cat, no [T, L+T] mask); in a step that
                       updates its caches in place, l4::attention_fused_inplace (the same on q as projected, whose
                       RoPE / qk-norm / temperature the kernel applies, then the new keys written into the caches by
                       its second launch: backends.inductor.caches_in_place); chained by counters (a CUDA engine's
                       step: backends.inductor.split_k_locks_chained), l4::attention_fused_chained (the same, with
                       the split merge and the cache write in its first launch where the keys are split: one launch)

Without Triton (a CUDA host where it is missing), MoE, Int4 and attention keep their reference implementations,
which run on CUDA too (slower). The kernel choice depends on dtypes only (static at trace time). Nothing here imports
Triton at import time.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from l4compile.ops import attention as attention_ops
from l4compile.ops import moe as moe_ops
from l4compile.ops import quant as quant_ops
from l4compile.quant import FP8_DTYPE

from . import triton_available
from .fp8_scaled_mm import linear_fp8_scaled_mm, scaled_mm_supported
from .layout import ATTENTION_MAX_HEAD_DIM

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)      # what the Triton kernels take


@functools.cache
def load_triton_ops() -> bool:
    """Register ``l4::moe_fused`` / ``l4::moe_q_fused`` / ``l4::int4_mm`` (imports Triton). False without Triton."""
    if not triton_available():
        return False
    from . import ops  # noqa: F401
    return True


def fused_moe_supported(x: Tensor, *weights: Tensor) -> bool:
    return (x.dim() == 2 and x.dtype in KERNEL_DTYPES and all(w.dtype == x.dtype for w in weights)
            and load_triton_ops())


def moe_cuda(x: Tensor, router_w: Tensor, gate_up: Tensor, down: Tensor, shared_gate: Tensor, shared_up: Tensor,
             shared_down: Tensor, top_k: int) -> Tensor:
    """``l4::moe`` on CUDA: the fused Triton MoE, or the grouped eager implementation without Triton."""
    args = (x, router_w, gate_up, down, shared_gate, shared_up, shared_down)
    if fused_moe_supported(*args):
        return torch.ops.l4.moe_fused(*args, top_k)
    return moe_ops._moe_impl(*args, top_k)


def moe_decomposition(x: Tensor, *weights_and_top_k):
    """``l4::moe`` in CUDA engines (same arguments): ``l4::moe_fused`` where it applies; NotImplemented (the op stays
    opaque, its CUDA kernel runs through the proxy executor) where the grouped fallback's host sync would not trace."""
    *weights, top_k = weights_and_top_k
    if fused_moe_supported(x, *weights):
        return torch.ops.l4.moe_fused(x, *weights, top_k)
    return NotImplemented


def fused_moe_int4_supported(x: Tensor, router_w: Tensor, *weights: Tensor) -> bool:
    """``weights``: l4::moe_q's (q, scale) pairs; the fused kernel takes Int4 (uint8) q tensors only."""
    return (x.dim() == 2 and x.dtype in KERNEL_DTYPES and router_w.dtype == x.dtype
            and all(q.dtype == torch.uint8 for q in weights[::2]) and load_triton_ops())


def fused_moe_fp8_supported(x: Tensor, router_w: Tensor, *weights: Tensor) -> bool:
    """``weights``: l4::moe_q's (q, scale) pairs; the fused FP8 kernel takes float8_e4m3fn q tensors with one scale
    per output channel (``quantize_fp8``: scale [.., N] for q [.., N, K])."""
    pairs = list(zip(weights[::2], weights[1::2]))
    return (x.dim() == 2 and x.dtype in KERNEL_DTYPES and router_w.dtype == x.dtype
            and all(q.dtype == FP8_DTYPE and s.shape == q.shape[:-1] for q, s in pairs) and load_triton_ops())


def _fused_moe_q(x: Tensor, router_w: Tensor, weights: tuple, top_k: int, logits: Tensor | None = None):
    """The fused Triton MoE for these quantized weights (Int4 or FP8), or None where neither applies; ``logits``:
    x @ router_w^T where the step computed them already (top-1)."""
    given = () if logits is None else (logits,)
    if fused_moe_int4_supported(x, router_w, *weights):
        return torch.ops.l4.moe_q_fused(x, router_w, *weights, top_k, *given)
    if fused_moe_fp8_supported(x, router_w, *weights):
        return torch.ops.l4.moe_fp8_fused(x, router_w, *weights, top_k, *given)
    return None


def moe_q_cuda(x: Tensor, router_w: Tensor, gate_up_q: Tensor, gate_up_s: Tensor, down_q: Tensor, down_s: Tensor,
               shared_gate_q: Tensor, shared_gate_s: Tensor, shared_up_q: Tensor, shared_up_s: Tensor,
               shared_down_q: Tensor, shared_down_s: Tensor, top_k: int) -> Tensor:
    """``l4::moe_q`` on CUDA: the fused Triton Int4 or FP8 MoE, or the reference (no Triton, other dtypes)."""
    weights = (gate_up_q, gate_up_s, down_q, down_s, shared_gate_q, shared_gate_s, shared_up_q, shared_up_s,
               shared_down_q, shared_down_s)
    out = _fused_moe_q(x, router_w, weights, top_k)
    return out if out is not None else quant_ops._moe_q_impl(x, router_w, *weights, top_k)


def moe_q_decomposition(x: Tensor, router_w: Tensor, *weights_and_top_k):
    """``l4::moe_q`` in CUDA engines (same arguments): ``l4::moe_q_fused`` / ``l4::moe_fp8_fused`` where one applies;
    NotImplemented (the op stays opaque and its CUDA kernel runs through the proxy executor) where the reference's
    host sync would not trace."""
    *weights, top_k = weights_and_top_k
    out = _fused_moe_q(x, router_w, tuple(weights), top_k)
    return out if out is not None else NotImplemented


def fused_norm_router_supported(a: Tensor, b: Tensor, norm_w: Tensor, router_w: Tensor) -> bool:
    """a, b [.., H] of one shape, norm_w [H] and router_w [E, H], all of one kernel dtype."""
    hidden = a.shape[-1]
    return (a.shape == b.shape and norm_w.shape == (hidden,) and router_w.dim() == 2 and router_w.shape[1] == hidden
            and a.dtype in KERNEL_DTYPES and a.dtype == b.dtype == norm_w.dtype == router_w.dtype
            and load_triton_ops())


def residual_norm_router(a: Tensor, b: Tensor, norm_w: Tensor, router_w: Tensor, eps: float
                         ) -> tuple[Tensor, Tensor, Tensor]:
    """A MoE layer's residual add, post-attention RMSNorm and router as a CUDA engine's step runs them
    (``backends.norm_router_fused``): a, b [.., H] -> (h = a + b like a, x = RMSNorm(h) * norm_w [N, H],
    logits = x @ router_w^T [N, E]), N = a.numel() / H: ``l4::add_rms_norm_router`` (one launch), else the reference
    (aten: Llama4TextRMSNorm, F.linear)."""
    hidden = a.shape[-1]
    if fused_norm_router_supported(a, b, norm_w, router_w):
        h, x, logits = torch.ops.l4.add_rms_norm_router(a.reshape(-1, hidden), b.reshape(-1, hidden), norm_w,
                                                        router_w, eps)
        return h.view(a.shape), x, logits
    h = a + b
    x = (attention_ops._rms(h, eps) * norm_w).reshape(-1, hidden)            # Llama4TextRMSNorm
    return h, x, torch.nn.functional.linear(x, router_w)


def moe_routed(x: Tensor, logits: Tensor, router_w: Tensor, gate_up: Tensor, down: Tensor, shared_gate: Tensor,
               shared_up: Tensor, shared_down: Tensor, top_k: int) -> Tensor:
    """``l4::moe`` (x and its op arguments) given its router ``logits`` = x @ router_w^T: ``l4::moe_fused`` on them
    (no router matmul), else the op itself, which computes them again."""
    args = (x, router_w, gate_up, down, shared_gate, shared_up, shared_down)
    if top_k == 1 and fused_moe_supported(*args):
        return torch.ops.l4.moe_fused(*args, top_k, logits)
    return torch.ops.l4.moe(*args, top_k)


def moe_q_routed(x: Tensor, logits: Tensor, router_w: Tensor, *weights_and_top_k) -> Tensor:
    """``l4::moe_q`` (x and its op arguments) given its router ``logits``: ``l4::moe_q_fused`` / ``l4::moe_fp8_fused``
    on them, else the op itself."""
    *weights, top_k = weights_and_top_k
    out = _fused_moe_q(x, router_w, tuple(weights), top_k, logits) if top_k == 1 else None
    return out if out is not None else torch.ops.l4.moe_q(x, router_w, *weights, top_k)


def _norm_fits(x: Tensor, residual: Tensor, norm_w: Tensor, shape) -> bool:
    """Whether the fused MoE's combine + residual + norm epilogue takes these: the residual of the MoE output's
    (viewed) shape, so the add does not broadcast, and all of x's dtype."""
    return (tuple(residual.shape) == tuple(shape) and residual.dtype == norm_w.dtype == x.dtype
            and norm_w.shape == (x.shape[-1],))


def _add_norm(y: Tensor, residual: Tensor, norm_w: Tensor, eps: float, shape) -> tuple[Tensor, Tensor]:
    """The reference of what follows a MoE layer: h' = residual + y.view(shape), x' = RMSNorm(h') * norm_w."""
    h = residual + y.view(shape)
    return h, attention_ops._rms(h, eps) * norm_w                            # Llama4TextRMSNorm


def moe_routed_norm(x: Tensor, logits: Tensor, router_w: Tensor, gate_up: Tensor, down: Tensor, shared_gate: Tensor,
                    shared_up: Tensor, shared_down: Tensor, top_k: int, residual: Tensor, norm_w: Tensor, eps: float,
                    shape) -> tuple[Tensor, Tensor]:
    """``moe_routed``, then the residual add after the MoE layer and the next RMSNorm, as a CUDA engine's step runs
    them (``backends.moe_norm_fused``) -> (h' = residual + moe.view(shape), x' = RMSNorm(h') * norm_w), both of
    ``shape``: ``l4::moe_fused_norm`` (the combine, add and norm in the MoE's down launch at decode), else the
    reference."""
    args = (x, router_w, gate_up, down, shared_gate, shared_up, shared_down)
    if top_k == 1 and fused_moe_supported(*args) and _norm_fits(x, residual, norm_w, shape):
        h, xo = torch.ops.l4.moe_fused_norm(*args, top_k, logits, residual.reshape(-1, x.shape[-1]), norm_w, eps)
        return h.view(shape), xo.view(shape)
    return _add_norm(moe_routed(x, logits, *args[1:], top_k), residual, norm_w, eps, shape)


def moe_q_routed_norm(x: Tensor, logits: Tensor, router_w: Tensor, *weights_top_k_and_norm) -> tuple[Tensor, Tensor]:
    """``moe_routed_norm`` for ``l4::moe_q`` (its arguments after x, logits, router_w; then residual, norm_w, eps,
    shape): ``l4::moe_q_fused_norm`` / ``l4::moe_fp8_fused_norm``, else the reference."""
    *weights, top_k, residual, norm_w, eps, shape = weights_top_k_and_norm
    if top_k == 1 and _norm_fits(x, residual, norm_w, shape):
        op = (torch.ops.l4.moe_q_fused_norm if fused_moe_int4_supported(x, router_w, *weights) else
              torch.ops.l4.moe_fp8_fused_norm if fused_moe_fp8_supported(x, router_w, *weights) else None)
        if op is not None:
            h, xo = op(x, router_w, *weights, top_k, logits, residual.reshape(-1, x.shape[-1]), norm_w, eps)
            return h.view(shape), xo.view(shape)
    return _add_norm(moe_q_routed(x, logits, router_w, *weights, top_k), residual, norm_w, eps, shape)


def fused_attention_supported(q: Tensor, k_cache: Tensor, v_cache: Tensor) -> bool:
    """caches [B, Hkv, L, D]: the kernel takes D up to ``ATTENTION_MAX_HEAD_DIM``, q and caches of one dtype."""
    return (q.dtype in KERNEL_DTYPES and k_cache.dtype == v_cache.dtype == q.dtype
            and k_cache.shape[-1] <= ATTENTION_MAX_HEAD_DIM and load_triton_ops())


def attention_cached_cuda(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, *rest):
    """``l4::attention_cached`` on CUDA (same arguments): the reference with ``l4::attention_fused`` as its
    attention, or the reference alone (plain aten) without Triton or for an unsupported dtype / head_dim."""
    if fused_attention_supported(q, k_cache, v_cache):
        return attention_ops.attention_cached_impl(q, k, v, k_cache, v_cache, *rest,
                                                   fused_attend=torch.ops.l4.attention_fused)
    return attention_ops.attention_cached_impl(q, k, v, k_cache, v_cache, *rest)


def attention_cached_in_place(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, *rest,
                              k_ready: bool = False, q_ready: bool = False) -> Tensor:
    """``l4::attention_cached`` (same arguments) with its caches updated in place -> the attention output alone. What
    a CUDA engine's step runs (``backends.inductor.caches_in_place``): ``l4::attention_fused_inplace`` applies q's
    RoPE and qk-norm (or temperature) in its partial kernel and writes the T new rows into the caches from its
    combine launch, so the step has no q-transform or cache-write kernels and copies no cache.
    Without the kernel, the reference's new caches are copied into the given ones (which an engine folds into a
    write of the new rows). ``k_ready`` / ``q_ready``: k / q comes with its RoPE / qk-norm applied
    (``linear_int4_rope``)."""
    if fused_attention_supported(q, k_cache, v_cache):
        return attention_ops.attention_cached_impl(q, k, v, k_cache, v_cache, *rest, fused_inplace=True,
                                                   fused_attend=torch.ops.l4.attention_fused_inplace,
                                                   k_ready=k_ready, q_ready=q_ready)[0]
    if k_ready or q_ready:
        out, k_new, v_new = attention_ops.attention_cached_impl(q, k, v, k_cache, v_cache, *rest, k_ready=k_ready,
                                                                q_ready=q_ready)
    else:
        out, k_new, v_new = torch.ops.l4.attention_cached(q, k, v, k_cache, v_cache, *rest)
    k_cache.copy_(k_new)
    v_cache.copy_(v_new)
    return out


def attention_cached_chained(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, *rest_and_lock,
                             k_ready: bool = False, q_ready: bool = False) -> tuple[Tensor, Tensor]:
    """``attention_cached_in_place`` (``l4::attention_cached``'s arguments, then ``lock``: [SPLIT_K_LOCK_WORDS] int32
    zeros) as a CUDA engine's chained step runs it (``backends.inductor.split_k_locks_chained``) -> (the attention
    output, a block of zeroed counters for the next chained launch). ``l4::attention_fused_chained`` merges the key
    splits and writes the caches in its partial kernel, so that a decode step's attention is one launch. Without
    the kernel, ``attention_cached_in_place``, and ``lock`` is handed on as it came (zeros). ``k_ready``,
    ``q_ready``: as there."""
    *rest, lock = rest_and_lock
    if not fused_attention_supported(q, k_cache, v_cache):
        return attention_cached_in_place(q, k, v, k_cache, v_cache, *rest, k_ready=k_ready, q_ready=q_ready), lock

    def attend(*args):
        return torch.ops.l4.attention_fused_chained(*args, lock)
    return attention_ops.attention_cached_impl(q, k, v, k_cache, v_cache, *rest, fused_inplace=True,
                                               fused_attend=attend, k_ready=k_ready, q_ready=q_ready)[0]


def linear_int4_cuda(x: Tensor, w_packed: Tensor, w_scale: Tensor) -> Tensor:
    """``l4::linear_int4`` on CUDA: x [.., K] -> [.., N] through the Triton Int4 kernel."""
    if not load_triton_ops():
        return quant_ops._linear_int4_impl(x, w_packed, w_scale)
    n, k = w_packed.shape[0], 2 * w_packed.shape[1]
    y = torch.ops.l4.int4_mm(x.reshape(-1, k), w_packed, w_scale)                   # [M, N]
    return y.reshape(*x.shape[:-1], n)


def int4_mm_splits(w_packed: Tensor | None, w_scale: Tensor | None) -> bool:
    """Whether ``l4::int4_mm`` may split K over these weights (its blocks' ``split_k`` > 1; unknown weights: True),
    so that a CUDA engine's step chains its counters (``linear_int4_chained``). Needs Triton."""
    if w_packed is None or w_scale is None:
        return True
    from . import ops                      # the op body's own choice (benchmarks patch ops.int4_blocks)
    return ops.default_int4_blocks(w_packed, w_scale).split_k > 1


def linear_int4_chained(x: Tensor, w_packed: Tensor, w_scale: Tensor, lock: Tensor) -> tuple[Tensor, Tensor]:
    """``l4::linear_int4`` as a CUDA engine's step runs it (``backends.inductor.split_k_locks_chained``): x [.., K]
    -> ([.., N], a fresh block of zeroed split-K counters for the next Int4 GEMM) through ``l4::int4_mm_chained``,
    whose counters are ``lock`` ([SPLIT_K_LOCK_WORDS] int32 zeros, left zeros). Needs Triton."""
    n, k = w_packed.shape[0], 2 * w_packed.shape[1]
    y, next_lock = torch.ops.l4.int4_mm_chained(x.reshape(-1, k), w_packed, w_scale, lock)    # [M, N]
    return y.reshape(*x.shape[:-1], n), next_lock


def k_rope_reference(y: Tensor, start_pos: Tensor, cos: Tensor, sin: Tensor, k_col0: int, k_cols: int,
                     head_dim: int, qk_norm: bool, eps: float) -> Tensor:
    """y [B, T, N] (a fused qkv output) with its keys' columns [k_col0, k_col0 + k_cols) RoPE-rotated at positions
    start + t and, with ``qk_norm``, RMS-normed per head: ``l4::attention_cached``'s k transform, in aten."""
    b, t = y.shape[0], y.shape[1]
    pos = start_pos.reshape(1).to(torch.int64) + torch.arange(t, device=y.device)          # [T]
    k = y[..., k_col0:k_col0 + k_cols].reshape(b, t, k_cols // head_dim, head_dim)          # [B, T, Hkv, D]
    k = attention_ops._rope(k, cos.index_select(0, pos), sin.index_select(0, pos))
    if qk_norm:
        k = attention_ops._rms(k, eps)
    return torch.cat([y[..., :k_col0], k.flatten(-2), y[..., k_col0 + k_cols:]], dim=-1)


def linear_int4_rope_supported(x: Tensor, w_packed: Tensor | None, w_scale: Tensor | None, head_dim: int,
                               k_col0: int, k_cols: int) -> bool:
    """Whether ``l4::int4_mm_rope`` takes this qkv GEMM: Triton, x [B, T, K] of a kernel dtype, and a tile width
    that holds whole heads (``ops.default_rope_blocks``; unknown weights: the shapes alone cannot tell, so False)."""
    if x.dim() != 3 or x.dtype not in KERNEL_DTYPES or w_packed is None or w_scale is None or not load_triton_ops():
        return False
    from . import ops
    return ops.default_rope_blocks(w_packed, w_scale, head_dim, k_col0, k_cols) is not None


def linear_int4_rope(x: Tensor, w_packed: Tensor, w_scale: Tensor, start_pos: Tensor, cos: Tensor, sin: Tensor,
                     k_col0: int, k_cols: int, head_dim: int, qk_norm: bool, eps: float) -> Tensor:
    """A RoPE layer's fused qkv projection as a CUDA engine's step runs it (``backends.qkv_rope_fused``): x [B, T, K]
    -> ``l4::linear_int4``'s [B, T, N] with the keys' columns [k_col0, k_col0 + k_cols) transformed as
    ``l4::attention_cached`` transforms k (RoPE at positions start + t, then with ``qk_norm`` each head's RMS norm),
    through ``l4::int4_mm_rope`` (in the GEMM's epilogue); ``k_rope_reference`` after the plain product where it
    does not apply."""
    if linear_int4_rope_supported(x, w_packed, w_scale, head_dim, k_col0, k_cols):
        return torch.ops.l4.int4_mm_rope(x, w_packed, w_scale, start_pos, cos, sin, k_col0, k_cols, head_dim,
                                         qk_norm, eps)
    return k_rope_reference(torch.ops.l4.linear_int4(x, w_packed, w_scale), start_pos, cos, sin, k_col0, k_cols,
                            head_dim, qk_norm, eps)


def linear_int4_rope_chained(x: Tensor, w_packed: Tensor, w_scale: Tensor, start_pos: Tensor, cos: Tensor,
                             sin: Tensor, k_col0: int, k_cols: int, head_dim: int, qk_norm: bool, eps: float,
                             lock: Tensor) -> tuple[Tensor, Tensor]:
    """``linear_int4_rope`` with split-K counters chained (``backends.inductor.split_k_locks_chained``) -> (y, the
    next launch's zeroed block): ``l4::int4_mm_rope_chained``; where it does not apply, ``linear_int4_rope`` and
    ``lock`` handed on as it came (zeros)."""
    if linear_int4_rope_supported(x, w_packed, w_scale, head_dim, k_col0, k_cols):
        return torch.ops.l4.int4_mm_rope_chained(x, w_packed, w_scale, start_pos, cos, sin, k_col0, k_cols, head_dim,
                                                 qk_norm, eps, lock)
    return linear_int4_rope(x, w_packed, w_scale, start_pos, cos, sin, k_col0, k_cols, head_dim, qk_norm, eps), lock


def int4_rope_splits(x, w_packed: Tensor | None, w_scale: Tensor | None, start_pos, cos, sin, k_col0: int,
                     k_cols: int, head_dim: int, *rest) -> bool:
    """Whether a ``linear_int4_rope`` call (its arguments; as ``split_k_locks_chained`` passes them: the weights as
    tensors, None where unknown) splits K, so that a CUDA engine's step chains its counters
    (``linear_int4_rope_chained``). Needs Triton."""
    if w_packed is None or w_scale is None:
        return True
    from . import ops
    b = ops.default_rope_blocks(w_packed, w_scale, head_dim, k_col0, k_cols)
    return b is not None and b.split_k > 1


def linear_fp8_cuda(x: Tensor, w_q: Tensor, w_scale: Tensor) -> Tensor:
    """``l4::linear_fp8`` on CUDA: ``torch._scaled_mm`` where it applies, else the dequantize reference."""
    if scaled_mm_supported(x, w_q, w_scale):
        return linear_fp8_scaled_mm(x, w_q, w_scale)
    return quant_ops._linear_fp8_impl(x, w_q, w_scale)


@functools.cache
def register_cuda_kernels() -> None:
    """Idempotent; called by ``import l4compile.ops``."""
    moe_ops.moe.register_kernel("cuda")(moe_cuda)
    quant_ops.moe_q.register_kernel("cuda")(moe_q_cuda)
    quant_ops.linear_int4.register_kernel("cuda")(linear_int4_cuda)
    quant_ops.linear_fp8.register_kernel("cuda")(linear_fp8_cuda)
    attention_ops.attention_cached.register_kernel("cuda")(attention_cached_cuda)


def cuda_decompositions() -> dict:
    """Extra decompositions for Inductor engines built for CUDA (merged over ``l4compile.ops.DECOMPOSITIONS``;
    ``l4::attention_cached``'s replaces the plain-aten one there). ``l4::moe`` / ``l4::moe_q`` are included only with
    Triton: their eager fallbacks have host syncs and stay opaque ops, also where no kernel applies (other
    dtypes), which ``moe_decomposition`` / ``moe_q_decomposition`` tell from the dtypes."""
    table = {torch.ops.l4.linear_fp8.default: linear_fp8_cuda}
    if load_triton_ops():
        table[torch.ops.l4.moe.default] = moe_decomposition
        table[torch.ops.l4.moe_q.default] = moe_q_decomposition
        table[torch.ops.l4.linear_int4.default] = linear_int4_cuda
        table[torch.ops.l4.attention_cached.default] = attention_cached_cuda
    return table


register_cuda_kernels()   # also when this module is imported before l4compile.ops (idempotent)
