# N rows (tokens), H hidden, E experts; BH a chunk of H, BE experts a program (row path), BT rows a program (block path)
"""Triton kernel: a Llama 4 layer's residual add, post-attention RMSNorm and MoE router in ONE launch.

In a CUDA engine's step each layer ran these as two launches: an Inductor kernel for the residual add and the norm,
then the router's matmul (a cuBLAS call at T tokens x E experts, tiny at decode). Here, for each row::

    h      = a + b                                                  rounded to the dtype (the residual stream)
    x      = (h.float() * rsqrt(mean(h.float()^2) + eps)).to(dtype) * w      rounded twice, as Llama4TextRMSNorm
    logits = x @ router_w^T                                         float32 sums, rounded once (F.linear)

exactly the reference's roundings; sums are float32 in another order than the reference's.

Two paths, chosen in the kernel from N (the grid is a guard-free expression of a symbolic N, ``ops``):
* rows (N <= DECODE_T, decode): program (row, expert block): the row's whole H, in unrolled BH chunks, then BE
  router rows by broadcast-multiply and sum; the row's E / BE programs each redo its norm (20 KB of loads), so a
  1-token step has E / BE programs on as many SMs instead of one program reading all of router_w. Only expert block
  0 stores h and x.
* blocks (N > DECODE_T, prefill): program (block of BT rows, 0): two passes over H (a + b, storing h, and the sum of
  squares; then h read back, x stored, and the router as a [BT, BH] x [BH, BE_ALL] dot), so router_w is read once
  per BT rows; programs of expert block > 0 return.

Shapes: a, b [N, H] (strided); w [H]; router_w [E, H] (strided); h, x [N, H]; logits [N, E].
Grid: rows (N, cdiv(E, BE)); blocks (cdiv(N, BT), 1).
"""
import triton
import triton.language as tl


@triton.jit
def _row_h(a_ptr, b_ptr, rows, cols, mask, sa0, sa1, sb0, sb1):
    """h = a + b at rows x cols (broadcast index tensors), float32 add rounded to a's dtype, -> float32."""
    a = tl.load(a_ptr + rows * sa0 + cols * sa1, mask=mask, other=0.0)
    b = tl.load(b_ptr + rows * sb0 + cols * sb1, mask=mask, other=0.0)
    return (a.to(tl.float32) + b.to(tl.float32)).to(a.dtype).to(tl.float32)


@triton.jit
def _normed(hf, r, w_ptr, cols, cmask, dtype: tl.constexpr):
    """x = (h * r).to(dtype) * w, rounded to dtype (hf float32 [.., BH], r the broadcastable rsqrt) -> dtype."""
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    return ((hf * r).to(dtype).to(tl.float32) * w).to(dtype)


@triton.jit
def add_rms_norm_router_kernel(a_ptr, b_ptr, w_ptr, r_ptr, h_ptr, x_ptr, lg_ptr, N, E, eps,
                               sa0, sa1, sb0, sb1, sr0, sr1, sh0, sx0, sl0,
                               H: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_E: tl.constexpr,
                               BLOCK_T: tl.constexpr, BLOCK_EA: tl.constexpr, BLOCK_HB: tl.constexpr,
                               DECODE_T: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr):
    pid_r, pid_e = tl.program_id(0), tl.program_id(1)
    dtype = h_ptr.dtype.element_ty
    epsf = tl.cast(eps, tl.float32)          # Inductor types a Python float argument fp64
    if N <= DECODE_T:
        row = pid_r.to(tl.int64)
        ee = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)                             # [BE]
        emask = ee < E
        first = pid_e == 0
        ss = tl.zeros((BLOCK_H,), dtype=tl.float32)
        for k0 in tl.static_range(0, H, BLOCK_H):
            cols = k0 + tl.arange(0, BLOCK_H)
            cmask = cols < H
            hf = _row_h(a_ptr, b_ptr, row, cols, cmask, sa0, sa1, sb0, sb1)
            tl.store(h_ptr + row * sh0 + cols, hf.to(dtype), mask=cmask & first)
            ss += hf * hf
        r = tl.math.rsqrt(tl.sum(ss, axis=0) / H + epsf)
        acc = tl.zeros((BLOCK_E,), dtype=tl.float32)
        for k0 in tl.static_range(0, H, BLOCK_H):
            cols = k0 + tl.arange(0, BLOCK_H)
            cmask = cols < H
            x = _normed(_row_h(a_ptr, b_ptr, row, cols, cmask, sa0, sa1, sb0, sb1), r, w_ptr, cols, cmask, dtype)
            tl.store(x_ptr + row * sx0 + cols, x, mask=cmask & first)
            wr = tl.load(r_ptr + ee[:, None] * sr0 + cols[None, :] * sr1, mask=emask[:, None] & cmask[None, :],
                         other=0.0)                                              # [BE, BH]
            acc += tl.sum(wr.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
        tl.store(lg_ptr + row * sl0 + ee, acc.to(dtype), mask=emask)
    elif pid_e == 0:
        rows = pid_r * BLOCK_T + tl.arange(0, BLOCK_T)                           # [BT]
        rmask = rows < N
        r2 = rows.to(tl.int64)[:, None]
        ss = tl.zeros((BLOCK_T,), dtype=tl.float32)
        for k0 in range(0, H, BLOCK_HB):
            cols = k0 + tl.arange(0, BLOCK_HB)
            m = rmask[:, None] & (cols < H)[None, :]
            hf = _row_h(a_ptr, b_ptr, r2, cols[None, :], m, sa0, sa1, sb0, sb1)  # [BT, BH]
            tl.store(h_ptr + r2 * sh0 + cols[None, :], hf.to(dtype), mask=m)
            ss += tl.sum(hf * hf, axis=1)
        r = tl.math.rsqrt(ss / H + epsf)[:, None]                                # [BT, 1]
        tl.debug_barrier()           # the block's h stores are seen by all its threads (pass 2's layout may differ)
        ee = tl.arange(0, BLOCK_EA)
        emask = ee < E
        acc = tl.zeros((BLOCK_T, BLOCK_EA), dtype=tl.float32)
        for k0 in range(0, H, BLOCK_HB):
            cols = k0 + tl.arange(0, BLOCK_HB)
            cmask = cols < H
            m = rmask[:, None] & cmask[None, :]
            hf = tl.load(h_ptr + r2 * sh0 + cols[None, :], mask=m, other=0.0).to(tl.float32)   # this block's h
            # w's offsets broadcast to the tile's [BT, BH]: as a [BH] row its load stays synchronous in the
            # software-pipelined loop (one round trip an iteration); the repeats are L1 hits
            x = _normed(hf, r, w_ptr, cols[None, :] + 0 * r2, m, dtype)                       # [BT, BH]
            tl.store(x_ptr + r2 * sx0 + cols[None, :], x, mask=m)
            wt = tl.load(r_ptr + ee[None, :] * sr0 + cols[:, None] * sr1, mask=cmask[:, None] & emask[None, :],
                         other=0.0)                                              # [BH, BE_ALL]
            xd = x
            if DOT_F32:                                                          # interpreter (see moe_gate_up)
                xd, wt = xd.to(tl.float32), wt.to(tl.float32)
            acc = tl.dot(xd, wt, acc, input_precision=PRECISION)
        tl.store(lg_ptr + r2 * sl0 + ee[None, :], acc.to(dtype), mask=rmask[:, None] & emask[None, :])
