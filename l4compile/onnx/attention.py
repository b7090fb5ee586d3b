# B batch, T new tokens, L cache slots, N keys (L + T, or T without a cache), Hq query heads, Hkv kv heads,
# D head_dim, R = Hq / Hkv query heads per kv head, P table positions
"""ONNX lowering of ``l4::attention`` and ``l4::attention_cached`` (the ops' contract: ``l4compile.ops.attention``).

The same arithmetic as the ops' aten implementations, written once in ONNX ops, so the ONNX path exports the graph
as traced and never decomposes attention into aten first (that retrace, and torch.onnx's own retrace of the ~80
aten nodes a layer it left, made the export + optimize of bench-scout at 8 layers 27 s against 9.7 s now:
``benchmarks/onnx_attention.py``)::

    q, k, v   = Reshape to [B, T, H, D]; RoPE (Gather cos/sin [T, D/2]; even/odd Slices; Mul/Sub/Add; interleave)
                and the weightless RMS qk-norm in float32, or (NoPE) the temperature scale [T] on q
    keys      = Concat(k_cache, k) on the slot axis                     [B, Hkv, N, D]
    mask      = LessOrEqual(key pos, query pos) And key pos >= 0 (And same chunk)   [T, N] bool
    scores    = MatMul(q folded to [B, Hkv, R*T, D] * scaling, keys^T)  GQA without copying K/V per query head
    out       = MatMul(Softmax(Where(Tile(mask, [R, 1]), scores, lowest)), values) -> [B, T, Hq*D]
    k_cache'  = ScatterElements(k_cache, slot of each new token, its row, axis=2)

The cache is written where it lies (ScatterElements on the slot axis): no transpose of the cache to put that axis
first, which an aten index_copy lowers to (two full-cache Transposes per cache per layer per step). Every query
sees at least its own key, so no softmax row is all masked (no NaN guard). Standard opset-21 ops only, all in
TensorRT's ONNX operator list.
"""
from __future__ import annotations

from onnxscript import ir
from onnxscript import opset21 as op

from .moe import _i64, _scalar

FLOAT = ir.DataType.FLOAT
INT64 = ir.DataType.INT64


def _f32(value: float):
    return op.Constant(value=ir.tensor(value, dtype=FLOAT))


# ``dtype``: the model's (q's) ONNX dtype, read from the op's inputs: float32 work skips the casts
def _to_float(x, dtype):
    return x if dtype == FLOAT else op.Cast(x, to=FLOAT)


def _back(xf, dtype):
    """float32 ``xf`` back to the model dtype, as the aten ops' ``type_as``."""
    return xf if dtype == FLOAT else op.Cast(xf, to=dtype)


def _rope(x, c, s, head_dim: int, dtype):
    """x [B, T, H, D]; c/s [1, T, 1, D/2] float32 -> pairs (x[2j], x[2j+1]) rotated, in float32, cast back."""
    xf = _to_float(x, dtype)
    x0 = op.Slice(xf, _i64(0), _i64(head_dim), _i64(-1), _i64(2))             # [B, T, H, D/2] even
    x1 = op.Slice(xf, _i64(1), _i64(head_dim), _i64(-1), _i64(2))             # odd
    r0 = op.Sub(op.Mul(x0, c), op.Mul(x1, s))
    r1 = op.Add(op.Mul(x0, s), op.Mul(x1, c))
    pairs = op.Concat(op.Unsqueeze(r0, _i64(-1)), op.Unsqueeze(r1, _i64(-1)), axis=-1)   # [B, T, H, D/2, 2]
    return _back(op.Reshape(pairs, _i64(0, 0, 0, head_dim)), dtype)           # [B, T, H, D]


def _rms(x, eps: float, dtype):
    xf = _to_float(x, dtype)
    ms = op.ReduceMean(op.Mul(xf, xf), _i64(-1), keepdims=1)                 # [B, T, H, 1]
    return _back(op.Mul(xf, op.Reciprocal(op.Sqrt(op.Add(ms, _f32(eps))))), dtype)


def _project(q, k, v, pos, cos, sin, n_heads: int, n_kv_heads: int, head_dim: int, use_rope: bool, qk_norm: bool,
             temp_tuning: bool, floor_scale: float, attn_scale: float, eps: float):
    """q [B, T, Hq*D], k/v [B, T, Hkv*D], pos [T] int64 -> q [B, Hq, T, D], k and v [B, Hkv, T, D]."""
    dtype = q.dtype
    q = op.Reshape(q, _i64(0, 0, n_heads, head_dim))                          # [B, T, Hq, D]
    k = op.Reshape(k, _i64(0, 0, n_kv_heads, head_dim))
    v = op.Reshape(v, _i64(0, 0, n_kv_heads, head_dim))
    if use_rope:
        c = op.Unsqueeze(op.Gather(cos, pos, axis=0), _i64(0, 2))             # [1, T, 1, D/2]
        s = op.Unsqueeze(op.Gather(sin, pos, axis=0), _i64(0, 2))
        q, k = _rope(q, c, s, head_dim, dtype), _rope(k, c, s, head_dim, dtype)
        if qk_norm:
            q, k = _rms(q, eps, dtype), _rms(k, eps, dtype)
    elif temp_tuning:   # 1 + attn_scale * log1p(floor((p + 1) / floor_scale)), p the absolute position
        steps = op.Floor(op.Div(op.Add(op.Cast(pos, to=FLOAT), _f32(1.0)), _f32(floor_scale)))
        scale = op.Add(op.Mul(op.Log(op.Add(steps, _f32(1.0))), _f32(attn_scale)), _f32(1.0))   # [T]
        q = _back(op.Mul(_to_float(q, dtype), op.Unsqueeze(scale, _i64(0, 2, 3))), dtype)
    perm = [0, 2, 1, 3]
    return op.Transpose(q, perm=perm), op.Transpose(k, perm=perm), op.Transpose(v, perm=perm)


def _visible(q_pos, k_pos, chunk: int):
    """[T] x [N] int64 positions -> [T, N] bool: k <= q, k >= 0 and (chunk > 0) the same chunk."""
    qp, kp = op.Unsqueeze(q_pos, _i64(1)), op.Unsqueeze(k_pos, _i64(0))       # [T, 1], [1, N]
    vis = op.And(op.LessOrEqual(kp, qp), op.GreaterOrEqual(kp, _scalar(0)))
    if chunk > 0:   # key positions below 0 are already hidden: Div's truncation equals floor where it matters
        vis = op.And(vis, op.Equal(op.Div(kp, _scalar(chunk)), op.Div(qp, _scalar(chunk))))
    return vis


def _attend(q, k, v, mask, n_heads: int, n_kv_heads: int, head_dim: int, scaling: float, dtype):
    """q [B, Hq, T, D], k/v [B, Hkv, N, D], mask [T, N] bool -> [B, T, Hq*D]; the R query heads of a kv head are
    folded into the query rows (row r*T + t) against k/v as they are."""
    rep = n_heads // n_kv_heads
    qf = op.Reshape(q, _i64(0, n_kv_heads, -1, head_dim))                     # [B, Hkv, R*T, D]
    qf = op.Mul(qf, op.Constant(value=ir.tensor(scaling, dtype=dtype)))
    scores = op.MatMul(qf, op.Transpose(k, perm=[0, 1, 3, 2]))                # [B, Hkv, R*T, N]
    if rep > 1:
        mask = op.Tile(mask, _i64(rep, 1))                                   # [R*T, N]
    lowest = op.Constant(value=ir.tensor(dtype.min, dtype=dtype))
    probs = op.Softmax(op.Where(mask, scores, lowest), axis=-1)
    out = op.MatMul(probs, v)                                                 # [B, Hkv, R*T, D]
    out = op.Transpose(op.Reshape(out, _i64(0, n_heads, -1, head_dim)), perm=[0, 2, 1, 3])   # [B, T, Hq, D]
    return op.Reshape(out, _i64(0, 0, n_heads * head_dim))


def _arange(n):
    """n: int64 scalar -> [n] = 0 .. n-1."""
    return op.Range(_scalar(0), n, _scalar(1))


def attention_onnx(q, k, v, cos, sin, n_heads: int, n_kv_heads: int, head_dim: int, use_rope: bool, qk_norm: bool,
                   chunk: int, temp_tuning: bool, floor_scale: float, attn_scale: float, scaling: float, eps: float):
    """``l4::attention``: positions 0..T-1, no cache -> [B, T, Hq*D]."""
    pos = _arange(op.Gather(op.Shape(q), _scalar(1), axis=0))                 # [T]
    qh, kh, vh = _project(q, k, v, pos, cos, sin, n_heads, n_kv_heads, head_dim, use_rope, qk_norm, temp_tuning,
                          floor_scale, attn_scale, eps)
    return _attend(qh, kh, vh, _visible(pos, pos, chunk), n_heads, n_kv_heads, head_dim, scaling, q.dtype)


def attention_cached_onnx(q, k, v, k_cache, v_cache, start_pos, cos, sin, n_heads: int, n_kv_heads: int,
                          head_dim: int, use_rope: bool, qk_norm: bool, chunk: int, temp_tuning: bool,
                          floor_scale: float, attn_scale: float, scaling: float, eps: float):
    """``l4::attention_cached``: continue at start_pos [1] with caches [B, Hkv, L, D] -> (out, k_cache', v_cache')."""
    t = op.Gather(op.Shape(q), _scalar(1), axis=0)                            # T, int64 scalar
    slots = op.Gather(op.Shape(k_cache), _scalar(2), axis=0)                  # L
    start = op.Reshape(op.Cast(start_pos, to=INT64), _i64(1))                 # [1]
    i = _arange(t)                                                            # [T]
    pos = op.Add(start, i)                                                    # [T] absolute positions
    qh, kh, vh = _project(q, k, v, pos, cos, sin, n_heads, n_kv_heads, head_dim, use_rope, qk_norm, temp_tuning,
                          floor_scale, attn_scale, eps)
    before = op.Sub(start, _scalar(1))
    slot_pos = op.Sub(before, op.Mod(op.Sub(before, _arange(slots)), slots))  # [L] position each slot holds
    keys = op.Concat(k_cache, kh, axis=2)                                     # [B, Hkv, L+T, D]
    values = op.Concat(v_cache, vh, axis=2)
    mask = _visible(pos, op.Concat(slot_pos, pos, axis=0), chunk)             # [T, L+T]
    out = _attend(qh, keys, values, mask, n_heads, n_kv_heads, head_dim, scaling, q.dtype)
    # new token i goes to slot (start + i) mod L; where T > L the last token of a slot must win, so each writes its
    # slot's last token's row (duplicate indices carry equal rows: the order of the writes does not matter)
    dst = op.Mod(pos, slots)                                                  # [T]
    last = op.Add(i, op.Mul(slots, op.Div(op.Sub(op.Sub(t, _scalar(1)), i), slots)))   # [T], all >= 0
    index = op.Reshape(dst, _i64(1, 1, -1, 1))                                # [1, 1, T, 1]

    def write(cache, new):                                                    # new [B, Hkv, T, D]
        rows = op.Gather(new, last, axis=2)
        return op.ScatterElements(cache, op.Expand(index, op.Shape(rows)), rows, axis=2)

    return out, write(k_cache, kh), write(v_cache, vh)
