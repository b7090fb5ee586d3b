# T tokens, H hidden, R = 2T grouped rows (top-1: T routed rows, then the T shared rows), BM rows a tile, BH columns
"""Triton: a top-1 MoE's combine, the residual add after it and the next RMSNorm, in the MoE's down launch.

A Llama 4 layer ends ``h' = h + moe(x)`` and the next layer (or the final norm) begins with ``RMSNorm(h') * w``.
The fused MoE's down GEMM leaves its rows in grouped order (y [R, H]); a CUDA engine's step then ran one Inductor
kernel a layer for the gather of each token's routed row onto its shared row (``ops.combine_rows``), the residual
add and the norm. Here, for a token t::

    moe  = (y[T + t] + y[routed_row[t]]).to(dtype)            float32 sum, rounded once (combine_rows)
    h'   = (h[t] + moe).to(dtype)                             the residual stream (aten.add in the dtype)
    x'   = (h' * rsqrt(mean(h'^2) + eps)).to(dtype) * w       rounded twice, as Llama4TextRMSNorm (norm_router)

Steps of at most ``MOE_NORM_DECODE_TOKENS`` tokens (decode) do it in the down launch: every program that stores a
finished [BM, BN] tile of y (after its split-K sum, where it splits) counts each of the tile's rows at the row's
token (``arrive_tokens``: CTA barrier, acq_rel atomics at gpu scope, as ``split_k.split_k_arrive``); the program that
brings a token's count to 2 x cdiv(H, BN) has seen every tile of both its rows stored and runs ``combine_norm_row``
for it, reading y with ``.cg`` loads (L2, not a stale L1 line). The gate_up launch zeroes the counters (it runs
before, ``split_k.zero_words``), so the step needs no fill. Longer steps (prefill) run ``moe_norm_kernel``, one
program a token, as a launch of its own; the grid of each path is 0 on the other's steps (guard-free in T).

Shapes: y [R, H]; routed_row [T] int64; row_tok [R] int32; h (the residual) [T, H]; w [H]; h_out, x_out [T, H];
counters [>= T] int32.
"""
import triton
import triton.language as tl

from .norm_router import _normed


@triton.jit
def combine_norm_row(tok, mapped, y_ptr, stride_yr, stride_yh, routed_row_ptr, res_ptr, stride_rt, w_ptr, h_ptr,
                     stride_ht, x_ptr, stride_xt, T, eps, H: tl.constexpr, BLOCK_H: tl.constexpr):
    """Token ``tok``'s h' and x' (the module docstring), in two passes over H in unrolled BH chunks (a chunk's loads
    do not wait on the one before it: a pass is about one round trip, not H / BH): h' stored by pass 1 and read back
    by pass 2 after a CTA barrier (the same program's stores). A mapped 1-token step's routed row is row 0 (no
    round trip for it)."""
    dtype = h_ptr.dtype.element_ty
    epsf = tl.cast(eps, tl.float32)          # Inductor types a Python float argument fp64
    t = tok.to(tl.int64)
    routed = tl.load(routed_row_ptr + t, mask=mapped == 0, other=0)
    shared = T + t
    ss = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for c0 in tl.static_range(0, H, BLOCK_H):
        cols = c0 + tl.arange(0, BLOCK_H)
        m = cols < H
        ys = tl.load(y_ptr + shared * stride_yr + cols * stride_yh, mask=m, other=0.0, cache_modifier=".cg")
        yr = tl.load(y_ptr + routed * stride_yr + cols * stride_yh, mask=m, other=0.0, cache_modifier=".cg")
        moe = (ys.to(tl.float32) + yr.to(tl.float32)).to(dtype).to(tl.float32)
        res = tl.load(res_ptr + t * stride_rt + cols, mask=m, other=0.0).to(tl.float32)
        hf = (res + moe).to(dtype).to(tl.float32)
        tl.store(h_ptr + t * stride_ht + cols, hf.to(dtype), mask=m)
        ss += hf * hf
    r = tl.math.rsqrt(tl.sum(ss, axis=0) / H + epsf)
    tl.debug_barrier()
    for c0 in tl.static_range(0, H, BLOCK_H):
        cols = c0 + tl.arange(0, BLOCK_H)
        m = cols < H
        hf = tl.load(h_ptr + t * stride_ht + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(x_ptr + t * stride_xt + cols, _normed(hf, r, w_ptr, cols, m, dtype), mask=m)


@triton.jit
def arrive_tokens(cnt_ptr, row_tok_ptr, rows, rmask, mapped, BLOCK_M: tl.constexpr):
    """Count a stored tile's rows ``rows`` (valid where ``rmask``) at their tokens -> the rows whose count reached
    2 x num_programs(1) here [BM] bool. A mapped 1-token step (``moe_route.tile_span``) has no row map: token 0."""
    tok = tl.load(row_tok_ptr + rows, mask=rmask & (mapped == 0), other=0)
    tl.debug_barrier()                       # every thread's stores of the tile before the counts release them
    old = tl.atomic_add(cnt_ptr + tok, tl.full((BLOCK_M,), 1, tl.int32), mask=rmask, sem="acq_rel", scope="gpu")
    return rmask & (old == 2 * tl.num_programs(1) - 1)


@triton.jit
def finish_tokens(done, row_tok_ptr, row0, mapped, y_ptr, stride_yr, stride_yh, routed_row_ptr, res_ptr, stride_rt,
                  w_ptr, h_ptr, stride_ht, x_ptr, stride_xt, T, eps, BLOCK_M: tl.constexpr, H: tl.constexpr,
                  BLOCK_H: tl.constexpr):
    """``combine_norm_row`` for each token whose row ``row0 + i`` is done (``arrive_tokens``), 32 rows of the tile at a
    time as a bit mask (one reduction each; rows cannot be indexed in registers)."""
    ii = tl.arange(0, BLOCK_M)
    for c in tl.static_range(0, BLOCK_M, 32):
        part = (ii >= c) & (ii < c + 32)
        bits = tl.sum(tl.where(done & part, tl.full((BLOCK_M,), 1, tl.int64) << tl.where(part, ii - c, 0), 0), axis=0)
        if bits != 0:
            for i in range(0, 32):
                if ((bits >> i) & 1) != 0:
                    tok = tl.load(row_tok_ptr + row0 + c + i, mask=mapped == 0, other=0)
                    combine_norm_row(tok, mapped, y_ptr, stride_yr, stride_yh, routed_row_ptr, res_ptr, stride_rt,
                                     w_ptr, h_ptr, stride_ht, x_ptr, stride_xt, T, eps, H, BLOCK_H)


@triton.jit
def down_epilogue(cnt_ptr, row_tok_ptr, rows, rmask, row0, mapped, y_ptr, stride_yr, stride_yh, routed_row_ptr,
                  res_ptr, stride_rt, w_ptr, h_ptr, stride_ht, x_ptr, stride_xt, T, eps, NORM_T: tl.constexpr,
                  BLOCK_M: tl.constexpr, H: tl.constexpr, BLOCK_H: tl.constexpr):
    """What a down program runs after storing a finished tile of y (rows ``rows`` from ``row0``) in a step of at most
    NORM_T tokens: ``arrive_tokens``, then ``finish_tokens``. Longer steps: nothing (``moe_norm_kernel``)."""
    if T <= NORM_T:
        done = arrive_tokens(cnt_ptr, row_tok_ptr, rows, rmask, mapped, BLOCK_M)
        finish_tokens(done, row_tok_ptr, row0, mapped, y_ptr, stride_yr, stride_yh, routed_row_ptr, res_ptr, stride_rt,
                      w_ptr, h_ptr, stride_ht, x_ptr, stride_xt, T, eps, BLOCK_M, H, BLOCK_H)


@triton.jit
def moe_norm_kernel(y_ptr, routed_row_ptr, res_ptr, w_ptr, h_ptr, x_ptr, T, eps, stride_yr, stride_yh, stride_rt,
                    stride_ht, stride_xt, H: tl.constexpr, BLOCK_H: tl.constexpr):
    """Longer steps' path: program t runs ``combine_norm_row`` for token t. Grid: (T,), or (0,) where the down
    launch does it."""
    combine_norm_row(tl.program_id(0), 0, y_ptr, stride_yr, stride_yh, routed_row_ptr, res_ptr, stride_rt, w_ptr,
                     h_ptr, stride_ht, x_ptr, stride_xt, T, eps, H, BLOCK_H)
