"""l4::attention_cached against a per-query-head reference, and what its decode step materializes.

The reference expands K/V to every query head (transformers' ``repeat_kv``) and attends one query at a time over
an explicit list of (position, key, value) entries: cache slots first, then the new tokens. The op must match it
for GQA ratios 1 and 5 (Scout's 40/8), prefill and decode, ring-buffer wrap, chunked and global layers.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from l4compile.ops.attention import attention_cached_impl, plain_rope_tables

D = 16


def _tables(positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    return plain_rope_tables(D, positions)


def _args(n_heads, n_kv, use_rope, chunk, scaling):
    # n_heads, n_kv_heads, head_dim, use_rope, qk_norm, chunk, temp_tuning, floor_scale, attn_scale, scaling, eps
    return (n_heads, n_kv, D, use_rope, use_rope, chunk, not use_rope, 4.0, 0.1, scaling, 1e-5)


def _reference(q, k, v, k_cache, v_cache, start, cos, sin, n_heads, n_kv, use_rope, chunk, scaling):
    """Same projection as the op (it is checked against transformers elsewhere); attention per query head over
    K/V expanded to every head, one query at a time, with the cache's positions spelled out."""
    b, t, _ = q.shape
    slots = k_cache.shape[2]
    # project through the op itself at T new tokens with an empty (all-invalid) cache to get q/k/v as attended
    from l4compile.ops.attention import _project
    pos = torch.arange(start, start + t)
    qh, kh, vh = _project(q, k, v, pos, cos, sin, n_heads, n_kv, D, use_rope, use_rope, not use_rope, 4.0, 0.1, 1e-5)
    rep = n_heads // n_kv
    entries = [(start - 1 - ((start - 1 - s) % slots), k_cache[:, :, s], v_cache[:, :, s]) for s in range(slots)]
    entries += [(start + i, kh[:, :, i], vh[:, :, i]) for i in range(t)]
    out = torch.zeros(b, t, n_heads, D, dtype=torch.float64)
    for i in range(t):
        p = start + i
        seen = [(kk, vv) for kp, kk, vv in entries
                if 0 <= kp <= p and (chunk == 0 or kp // chunk == p // chunk)]
        keys = torch.stack([kk for kk, _ in seen], 2).double().repeat_interleave(rep, 1)     # [B, Hq, n, D]
        vals = torch.stack([vv for _, vv in seen], 2).double().repeat_interleave(rep, 1)
        scores = torch.einsum("bhd,bhnd->bhn", qh[:, :, i].double(), keys) * scaling
        out[:, i] = torch.einsum("bhn,bhnd->bhd", scores.softmax(-1), vals)
    return out.reshape(b, t, n_heads * D)


CASES = {
    # name: (n_heads, n_kv, use_rope, chunk, slots, start, t)
    "gqa5-decode-ring-wrapped": (10, 2, True, 8, 8, 21, 1),
    "gqa5-prefill-chunked": (10, 2, True, 8, 8, 0, 13),
    "gqa5-continue-across-chunk": (10, 2, True, 8, 8, 6, 5),
    "gqa5-decode-global-nope": (10, 2, False, 0, 32, 17, 1),
    "gqa5-prefill-global-nope": (10, 2, False, 0, 32, 0, 9),
    "mha-decode-ring": (4, 4, True, 8, 8, 11, 1),
    "gqa2-continue-global": (4, 2, False, 0, 32, 5, 3),
}


@pytest.mark.parametrize("case", list(CASES))
def test_attention_cached_matches_per_head_reference(case):
    n_heads, n_kv, use_rope, chunk, slots, start, t = CASES[case]
    g = torch.Generator().manual_seed(0)
    b = 2
    q = torch.randn(b, t, n_heads * D, generator=g)
    k = torch.randn(b, t, n_kv * D, generator=g)
    v = torch.randn(b, t, n_kv * D, generator=g)
    k_cache = torch.randn(b, n_kv, slots, D, generator=g)
    v_cache = torch.randn(b, n_kv, slots, D, generator=g)
    cos, sin = _tables(64)
    scaling = 1 / math.sqrt(D)
    out, k_new, v_new = attention_cached_impl(q, k, v, k_cache, v_cache, torch.tensor([start]), cos, sin,
                                              *_args(n_heads, n_kv, use_rope, chunk, scaling))
    ref = _reference(q, k, v, k_cache, v_cache, start, cos, sin, n_heads, n_kv, use_rope, chunk, scaling)
    assert out.shape == (b, t, n_heads * D)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)
    # the cache now holds the last min(T, L) new keys at slot = position mod L, the rest unchanged
    written = {(start + i) % slots: i for i in range(t)}                     # later tokens overwrite earlier ones
    for s in range(slots):
        if s in written:
            assert not torch.equal(k_new[:, :, s], k_cache[:, :, s])
            torch.testing.assert_close(v_new[:, :, s], v.view(b, t, n_kv, D)[:, written[s]])
        else:
            assert torch.equal(k_new[:, :, s], k_cache[:, :, s]) and torch.equal(v_new[:, :, s], v_cache[:, :, s])


def test_decode_step_never_copies_kv_per_query_head():
    """At decode the cache is the largest thing attention touches; with GQA (Scout: 40 query heads, 8 kv heads) an
    expanded copy per query head would write and read it 5 more times. No intermediate of the traced decode step may
    hold more elements than one cache plus the new token per kv head."""
    n_heads, n_kv, slots = 10, 2, 64
    b = 1
    q, k, v = torch.randn(b, 1, n_heads * D), torch.randn(b, 1, n_kv * D), torch.randn(b, 1, n_kv * D)
    k_cache, v_cache = torch.randn(b, n_kv, slots, D), torch.randn(b, n_kv, slots, D)
    cos, sin = _tables(128)
    gm = make_fx(lambda *a: attention_cached_impl(*a, *_args(n_heads, n_kv, True, 64, 0.25)))(
        q, k, v, k_cache, v_cache, torch.tensor([40]), cos, sin)
    limit = b * n_kv * (slots + 1) * D
    sizes = {n.name: n.meta["val"].numel() for n in gm.graph.nodes
             if n.op == "call_function" and isinstance(n.meta.get("val"), torch.Tensor)}
    assert sizes and max(sizes.values()) <= limit, {k_: s for k_, s in sizes.items() if s > limit}
