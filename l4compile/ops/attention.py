# B batch, T new tokens, L cache slots, Hq query heads, Hkv kv heads, D head_dim, P table positions
"""``l4::attention`` and ``l4::attention_cached``: one Llama 4 (iRoPE) attention per layer, semantics explicit.

Both take the q/k/v projections ``[B, T, H*D]`` and return the attention output ``[B, T, Hq*D]`` (before
o_proj). Per layer (LLAMA4.md):
* RoPE layers: real cos/sin rotation of interleaved pairs ``(x[2j], x[2j+1])`` from precomputed float32 tables
  ``cos/sin [P, D/2]`` (llama3 scaling and the attention factor folded in), then, if ``qk_norm``, a weightless
  RMS norm over D in float32; a chunked-causal mask: key k visible to query q iff k <= q and k//chunk == q//chunk.
* NoPE layers: no RoPE, no qk-norm, full causal mask; with ``temp_tuning`` the queries are scaled by
  ``1 + attn_scale * log1p(floor((p + 1) / floor_scale))`` at absolute position p.
* GQA: query head h reads kv head h // (Hq / Hkv); scores scaled by ``scaling``.

``l4::attention`` is the prefill form (positions 0..T-1, no cache). ``l4::attention_cached`` continues a
sequence at ``start_pos`` ([1] int64) with a cache ``[B, Hkv, L, D]`` per k and v, and returns the updated cache:
slot = position mod L. Chunked layers use L = attention_chunk_size (a ring buffer: a query only ever sees its own
chunk), NoPE layers L = max sequence length. Keys are the L cache slots followed by the T new keys; a slot's
position is the most recent p <= start-1 with p = slot (mod L), valid if p >= 0. The same graph serves prefill
(start 0, empty cache, any T) and decode (T = 1).

Lowering: the implementations below are plain aten with no data-dependent shapes; the Inductor backend
decomposes both ops into them (``DECOMPOSITIONS``) so Inductor compiles attention itself. CUDA engines keep the
projection from here and attend with the Triton ``l4::attention_fused`` (l4compile.kernels), which reads only the
visible keys where they lie instead of ``cat(cache, new keys)`` under a mask over every slot; a step that updates
its caches in place has the kernel transform q and write the new keys too (``l4::attention_fused_inplace``). ONNX:
``l4compile.onnx.attention`` writes the same arithmetic in ONNX ops (Gather tables, Mul/Sub/Add rotation,
ReduceMean/Sqrt norm, MatMul/Softmax/Where, ScatterElements cache writes); a change here must be made there too
(tests/backends/test_onnx_attention.py compares the two).
"""
from __future__ import annotations

import torch
from torch import Tensor


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, T, H, D]; cos/sin [T, D/2] float32 -> rotated pairs, in float32 then cast back like HF."""
    xf = x.float()
    x0, x1 = xf[..., 0::2], xf[..., 1::2]                         # [B, T, H, D/2]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2).type_as(x)


def _rms(x: Tensor, eps: float) -> Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


def _project(q: Tensor, k: Tensor, v: Tensor, pos: Tensor, cos: Tensor, sin: Tensor, n_heads: int,
             n_kv_heads: int, head_dim: int, use_rope: bool, qk_norm: bool, temp_tuning: bool, floor_scale: float,
             attn_scale: float, eps: float, raw_q: bool = False, raw_k: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """-> q [B, Hq, T, D], k and v [B, Hkv, T, D] with RoPE / qk-norm / temperature applied (``raw_q``: to k alone,
    q left for a kernel that applies them itself; ``raw_k``: not to k, which came transformed)."""
    b, t = q.shape[0], q.shape[1]
    q = q.view(b, t, n_heads, head_dim)                          # [B, T, Hq, D]
    k = k.view(b, t, n_kv_heads, head_dim)                       # [B, T, Hkv, D]
    v = v.view(b, t, n_kv_heads, head_dim)
    if use_rope:
        c, s = cos.index_select(0, pos), sin.index_select(0, pos)   # [T, D/2]
        k = k if raw_k else _rope(k, c, s)
        q = q if raw_q else _rope(q, c, s)
        if qk_norm:
            k = k if raw_k else _rms(k, eps)
            q = q if raw_q else _rms(q, eps)
    elif temp_tuning and not raw_q:
        scale = torch.log1p(torch.floor((pos.float() + 1.0) / floor_scale)) * attn_scale + 1.0   # [T]
        q = (q * scale[None, :, None, None]).to(q.dtype)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def _attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, n_heads: int, n_kv_heads: int, scaling: float) -> Tensor:
    """q [B, Hq, T, D], k/v [B, Hkv, N, D], mask [T, N] bool (True = visible) -> [B, T, Hq*D].

    GQA without copying K/V per query head: the rep = Hq/Hkv query heads that read kv head g (heads g*rep ..
    g*rep+rep-1) are folded into the query length, q [B, Hkv, rep*T, D] (row r*T + t), against k/v as they are,
    with the mask tiled to [rep*T, N]. At decode K/V is the cache, the largest thing attention touches; expanded to
    Hq heads it would be written once and read once more per query head of its group (5x for Scout's 40/8)."""
    b, _, n, d = k.shape
    t = q.shape[2]
    rep = n_heads // n_kv_heads
    q = q.reshape(b, n_kv_heads, rep * t, d)                                     # [B, Hkv, rep*T, D]
    mask = mask.repeat(rep, 1) if rep > 1 else mask                              # [rep*T, N]
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask[None, None], scale=scaling)
    return out.reshape(b, n_heads, t, d).transpose(1, 2).reshape(b, t, n_heads * d)


def _visible(q_pos: Tensor, k_pos: Tensor, chunk: int) -> Tensor:
    """[T] x [N] positions -> [T, N] bool; chunk == 0 means a full causal mask."""
    qp, kp = q_pos[:, None], k_pos[None, :]
    vis = (kp <= qp) & (kp >= 0)
    if chunk > 0:
        vis = vis & (torch.div(kp, chunk, rounding_mode="floor") == torch.div(qp, chunk, rounding_mode="floor"))
    return vis


def attention_impl(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, n_heads: int, n_kv_heads: int,
                   head_dim: int, use_rope: bool, qk_norm: bool, chunk: int, temp_tuning: bool, floor_scale: float,
                   attn_scale: float, scaling: float, eps: float) -> Tensor:
    pos = torch.arange(q.shape[1], device=q.device)                              # [T]
    qh, kh, vh = _project(q, k, v, pos, cos, sin, n_heads, n_kv_heads, head_dim, use_rope, qk_norm, temp_tuning,
                          floor_scale, attn_scale, eps)
    return _attend(qh, kh, vh, _visible(pos, pos, chunk), n_heads, n_kv_heads, scaling)


def attention_cached_impl(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, start_pos: Tensor,
                          cos: Tensor, sin: Tensor, n_heads: int, n_kv_heads: int, head_dim: int, use_rope: bool,
                          qk_norm: bool, chunk: int, temp_tuning: bool, floor_scale: float, attn_scale: float,
                          scaling: float, eps: float, fused_attend=None, fused_inplace: bool = False,
                          k_ready: bool = False, q_ready: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """``fused_attend``: None for the plain-aten attention over ``cat(cache, new keys)``; CUDA passes
    ``l4::attention_fused`` (l4compile.kernels), which reads the visible keys in place: same arguments and result
    as ``_attend`` here, ``(q, k_new, v_new, k_cache, v_cache, start_pos, n_heads, n_kv_heads, chunk, scaling)``.
    ``fused_inplace``: ``fused_attend`` is ``l4::attention_fused_inplace``: it takes q untransformed with the
    layer's transform arguments ``(q, k_new, v_new, k_cache, v_cache, start_pos, cos, sin, n_heads, n_kv_heads,
    chunk, scaling, use_rope, qk_norm, temp_tuning, floor_scale, attn_scale, eps)``, and writes the new keys into
    the caches it is given, which are then returned as the new caches (no index_copy here). ``k_ready`` /
    ``q_ready``: k / q comes with its RoPE / qk-norm applied (a CUDA engine's qkv GEMM does it in its epilogue:
    ``l4::int4_mm_rope``), and ``fused_attend`` is then told to leave q as it is."""
    t, slots = q.shape[1], k_cache.shape[2]
    start = start_pos.reshape(1).to(torch.int64)                                 # [1]
    pos = start + torch.arange(t, device=q.device)                               # [T] absolute positions
    qh, kh, vh = _project(q, k, v, pos, cos, sin, n_heads, n_kv_heads, head_dim, use_rope, qk_norm, temp_tuning,
                          floor_scale, attn_scale, eps, raw_q=fused_inplace or q_ready, raw_k=k_ready)
    if fused_inplace:
        q_modes = (False, False, False) if q_ready else (use_rope, qk_norm, temp_tuning)
        return (fused_attend(qh, kh, vh, k_cache, v_cache, start, cos, sin, n_heads, n_kv_heads, chunk, scaling,
                             *q_modes, floor_scale, attn_scale, eps), k_cache, v_cache)
    if fused_attend is not None:
        out = fused_attend(qh, kh, vh, k_cache, v_cache, start, n_heads, n_kv_heads, chunk, scaling)
    else:
        slot = torch.arange(slots, device=q.device)                              # [L]
        before = start - 1
        slot_pos = before - torch.remainder(before - slot, slots)                # [L] position held by each slot
        keys = torch.cat([k_cache, kh], dim=2)                                   # [B, Hkv, L+T, D]
        values = torch.cat([v_cache, vh], dim=2)
        out = _attend(qh, keys, values, _visible(pos, torch.cat([slot_pos, pos]), chunk), n_heads, n_kv_heads,
                      scaling)
    # New token i goes to slot (start + i) mod L. When T > L several share a slot and the last must win, so every
    # token writes the value of its slot's last token: duplicate indices carry equal rows and the order of the
    # writes does not matter. An index_copy of T rows, which an engine updating the caches in place
    # (backends/inductor) turns into a write of those rows alone.
    i = torch.arange(t, device=q.device)                                         # [T]
    dst = torch.remainder(pos, slots)                                            # [T] slot of each new token
    last_of_slot = i + slots * torch.div(t - 1 - i, slots, rounding_mode="floor")   # [T]
    k_new = k_cache.index_copy(2, dst, kh.index_select(2, last_of_slot))
    v_new = v_cache.index_copy(2, dst, vh.index_select(2, last_of_slot))
    return out, k_new, v_new


@torch.library.custom_op("l4::attention", mutates_args=())
def attention(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, n_heads: int, n_kv_heads: int,
              head_dim: int, use_rope: bool, qk_norm: bool, chunk: int, temp_tuning: bool, floor_scale: float,
              attn_scale: float, scaling: float, eps: float) -> Tensor:
    """q [B, T, Hq*D], k/v [B, T, Hkv*D] -> [B, T, Hq*D]; positions 0..T-1."""
    return attention_impl(q, k, v, cos, sin, n_heads, n_kv_heads, head_dim, use_rope, qk_norm, chunk, temp_tuning,
                          floor_scale, attn_scale, scaling, eps)


@attention.register_fake
def _attention_fake(q, k, v, cos, sin, n_heads, n_kv_heads, head_dim, *rest):
    return q.new_empty(q.shape[0], q.shape[1], n_heads * head_dim)


@torch.library.custom_op("l4::attention_cached", mutates_args=())
def attention_cached(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, start_pos: Tensor,
                     cos: Tensor, sin: Tensor, n_heads: int, n_kv_heads: int, head_dim: int, use_rope: bool,
                     qk_norm: bool, chunk: int, temp_tuning: bool, floor_scale: float, attn_scale: float,
                     scaling: float, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Continue at start_pos with caches [B, Hkv, L, D] -> (out [B, T, Hq*D], k_cache', v_cache')."""
    return attention_cached_impl(q, k, v, k_cache, v_cache, start_pos, cos, sin, n_heads, n_kv_heads, head_dim,
                                 use_rope, qk_norm, chunk, temp_tuning, floor_scale, attn_scale, scaling, eps)


@attention_cached.register_fake
def _attention_cached_fake(q, k, v, k_cache, v_cache, start_pos, cos, sin, n_heads, n_kv_heads, head_dim, *rest):
    return (q.new_empty(q.shape[0], q.shape[1], n_heads * head_dim), torch.empty_like(k_cache),
            torch.empty_like(v_cache))


DECOMPOSITIONS = {torch.ops.l4.attention.default: attention_impl,
                  torch.ops.l4.attention_cached.default: attention_cached_impl}


def plain_rope_tables(head_dim: int, positions: int, device=None, theta: float = 500000.0) -> tuple[Tensor, Tensor]:
    """float32 cos/sin [positions, D/2] of unscaled RoPE frequencies theta^(-2j/D) (Llama 4's theta): tables of the
    right shape and range for kernel tests, benchmarks and tuning, where no model config is at hand."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    freqs = torch.arange(positions, dtype=torch.float32, device=device)[:, None] * inv[None, :]   # [P, D/2]
    return torch.cos(freqs), torch.sin(freqs)


def rope_tables(config, positions: int) -> tuple[Tensor, Tensor]:
    """float32 cos/sin [positions, D/2] exactly as transformers computes them (llama3 scaling included)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope_type = config.rope_parameters.get("rope_type", "default")
    if rope_type == "default":
        from transformers.models.llama4.modeling_llama4 import Llama4TextRotaryEmbedding
        inv_freq, factor = Llama4TextRotaryEmbedding.compute_default_rope_parameters(config)
    else:
        inv_freq, factor = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
    freqs = torch.arange(positions, dtype=torch.float32)[:, None] * inv_freq.float()[None, :]   # [P, D/2]
    return torch.cos(freqs) * factor, torch.sin(freqs) * factor
