# T tokens, E experts, K top-k, H hidden, I expert width, A = T*K, R = A + T, N out features, Kin in features,
# Gh / Gi Int4 scale groups over H / I; attention: B batch, Hq / Hkv heads, T new tokens, L cache slots, D head_dim
"""``l4::moe_fused``, ``l4::moe_q_fused``, ``l4::moe_fp8_fused`` (and their ``_norm`` forms), ``l4::int4_mm`` (and
``_rope``), ``l4::attention_fused``, ``l4::attention_fused_inplace`` / ``attention_fused_chained`` and
``l4::add_rms_norm_router``: the Triton kernels as ``torch.library.triton_op`` operators.

``triton_op`` makes the bodies visible to torch.compile / torch.export: Inductor and AOTInductor see the host
code (plain aten) and the kernels themselves (``wrap_triton``) and compile both into the engine, so a CUDA
``.pt2`` needs neither Python callbacks nor Triton at load time. The bodies have no host syncs and no
data-dependent shapes (see ``layout.moe_rows``), so they trace with a symbolic token count and also serve as
their own fake implementations. A top-1 MoE step is four launches: the router matmul, ``moe_route_kernel`` (the
whole grouped-row map), the two grouped GEMMs; the combine of routed and shared rows is a gather Inductor fuses.
The bf16 and FP8 MoEs, and the Int4 one with unsplit GEMMs (the default), run three at a 1-token step: their GEMMs
map the step from the logits (``moe_route.tile_span``) and the route launch's grid is empty. In a CUDA engine's step
the router matmul is gone too: ``add_rms_norm_router`` makes the logits in the launch that adds the residual and
norms the MoE's input (``backends.norm_router_fused``), and the MoE op takes them; and so is the combine, which the
``_norm`` form of the op does with the residual add after it and the next layer's input norm, in its down launch at
decode (``moe_norm.py``, ``backends.moe_norm_fused``): a batch-1 decode step's MoE layer is two launches.
Int4 GEMMs with ``split_k`` > 1 stay one launch each (``split_k.py``: the last program of a tile adds the
partials), plus a memset of their tile counters where a step splits; chained (``int4_mm_chained``, what a CUDA
engine's step runs), each launch zeroes the next one's counters and a step needs one memset in all.

Contracts (same as the reference ops, which the tests compare against):

    moe_fused(x [T, H], router_w [E, H], gate_up [E, H, 2I], down [E, I, H], shared_gate [I, H],
              shared_up [I, H], shared_down [H, I], top_k) -> [T, H]          == l4::moe
    moe_q_fused(x, router_w, (q, scale) x 5 of packed Int4 weights, top_k) -> [T, H]     == l4::moe_q on Int4
    moe_fp8_fused(x, router_w, (q, scale) x 5 of float8 weights, top_k) -> [T, H]       == l4::moe_q on FP8
        (each of the three MoE ops takes, last, the router logits x @ router_w^T when the step has them: top-1,
        no router matmul of its own)
    moe_fused_norm / moe_q_fused_norm / moe_fp8_fused_norm(the MoE op's arguments, top_k = 1, logits [T, E],
                    residual [T, H], norm_w [H], eps) -> (h' = residual + the MoE's [T, H], x' = RMSNorm(h') * norm_w):
                    the combine, the residual add and the next RMSNorm in the down launch at steps of up to
                    MOE_NORM_DECODE_TOKENS tokens, in moe_norm_kernel's launch for longer ones (``moe_norm.py``)
    add_rms_norm_router(a [N, H], b [N, H], norm_w [H], router_w [E, H], eps) -> (h = a + b, x = RMSNorm(h) * norm_w,
                        logits = x @ router_w^T)            == the residual add, Llama4TextRMSNorm and F.linear
    int4_mm(x [M, Kin], w_packed [N, Kin/2] uint8, w_scale [N, Kin/G]) -> [M, N]
                                                                               == l4::linear_int4 on 2-D x
    int4_mm_chained(x, w_packed, w_scale, lock [SPLIT_K_LOCK_WORDS] int32 zeros) -> ([M, N], zeros like lock)
                                       the same product; lock (its split-K counters) left zeros, and a fresh block
                                       of zeros for the next GEMM's (``backends.inductor.split_k_locks_chained``)
    int4_mm_rope(x [B, T, Kin], w_packed, w_scale, start_pos [1], cos [P, D/2], sin, k_col0, k_cols, head_dim,
                 qk_norm, eps) -> [B, T, N]: the same product with the columns [k_col0, k_col0 + k_cols) (q's and
                 k's) transformed as l4::attention_cached transforms q and k (RoPE at start + t, then qk-norm), in the
                 epilogue (``k_rope.py``); int4_mm_rope_chained(.., lock) -> (that, zeros like lock), chained
    attention_fused(q [B, Hq, T, D], k_new [B, Hkv, T, D], v_new, k_cache [B, Hkv, L, D], v_cache, start_pos [1],
                    n_heads, n_kv_heads, chunk, scaling) -> [B, T, Hq*D]
                                               == l4::attention_cached's attention over cat(cache, new keys)
    attention_fused_inplace(q before its RoPE / qk-norm / temperature, k_new, v_new, k_cache, v_cache, start_pos,
                    cos [P, D/2], sin, n_heads, n_kv_heads, chunk, scaling, use_rope, qk_norm, temp_tuning,
                    floor_scale, attn_scale, eps) -> the same, the kernel transforming q as l4::attention_cached does,
                    and k_cache / v_cache updated IN PLACE to l4::attention_cached's new caches
    attention_fused_chained(the same arguments, lock [SPLIT_K_LOCK_WORDS] int32 zeros) -> (the same output, zeros
                    like lock): the same, with the split merge and the cache write in the partial kernel where a
                    step splits its keys (one launch at decode); lock (its counters) left zeros, and a fresh block
                    of zeros for the next chained launch (``backends.inductor.split_k_locks_chained``)

Importing this module imports Triton (``l4compile.kernels.dispatch`` does it only when Triton is there).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
import triton
from torch import Tensor
from torch.library import triton_op, wrap_triton

from l4compile.ops.moe import _route

from . import access_memo, interpreting, tuned_blocks
from .attention import attention_combine_kernel, attention_partial_kernel
from .int4_mm import int4_mm_bf16x2_kernel, int4_mm_kernel
from .layout import (ATTENTION_COMBINE_STAGES, ATTENTION_DECODE_BLOCK_M, ATTENTION_MAX_SPLITS, MOE_NORM_BLOCK_H,
                     MOE_NORM_DECODE_TOKENS, MOE_ROUTE_DECODE_TOKENS, NORM_ROUTER_BLOCK_H, NORM_ROUTER_BLOCK_HB,
                     NORM_ROUTER_BLOCK_T, NORM_ROUTER_DECODE_TOKENS, NORM_ROUTER_EXPERTS, AttentionBlocks,
                     INT4_PREFILL_ROWS, SPLIT_K_LOCK_WORDS, Int4Blocks, MoeRows, attention_blocks, attention_splits,
                     fma_unpack, int4_blocks, int4_prefill_blocks, moe_blocks, moe_fp8_blocks, moe_int4_blocks,
                     moe_int4_prefill_blocks, moe_rows, num_tiles, rope_int4_blocks, scale_words, split_k_plan)
from .moe_down import moe_down_kernel
from .moe_fp8_down import moe_fp8_down_kernel
from .moe_fp8_gate_up import moe_fp8_gate_up_kernel
from .moe_gate_up import moe_gate_up_kernel
from .moe_int4_down import moe_int4_down_kernel
from .moe_int4_gate_up import moe_int4_gate_up_kernel
from .moe_norm import moe_norm_kernel
from .moe_route import moe_route_kernel
from .norm_router import add_rms_norm_router_kernel
from .tuned_blocks import int4_key, moe_key

access_memo.install()      # each kernel's TTIR once per signature, not per traced call (access_memo.py)


def _dot_mode(dtype: torch.dtype) -> dict:
    """PRECISION: float32 engines keep IEEE fp32 dots (no TF32), so they stay within the 1e-4 parity budget.
    DOT_F32: under the CPU interpreter, bf16 dot operands go in as float32 (see moe_gate_up's docstring)."""
    f32 = interpreting() and dtype == torch.bfloat16
    return {"PRECISION": "ieee" if dtype == torch.float32 or f32 else "tf32", "DOT_F32": f32}


def _fp8_mode(x: Tensor) -> dict:
    """The FP8 kernels' operand modes (``fp8_rows``): float8 dot operands for 16-bit activations on sm_89+ (float32
    engines keep bf16 operands, which hold float8 values exactly: the same products, no FP8 MMA accumulator); float32
    operands and float32 rounding to the float8 grid under the CPU interpreter."""
    interp = interpreting()
    fp8_dot = (not interp and x.dtype != torch.float32 and x.device.type == "cuda"
               and torch.cuda.get_device_capability(x.device) >= (8, 9))
    return {"FP8_DOT": fp8_dot, "DOT_F32": interp, "EMULATE_FP8": interp}


def _group_block(n_exp: int) -> int:
    """BLOCK_G: the E routed groups and the shared one, as a power of two >= 2 (the route kernel's one-hot blocks,
    ``moe_route.tile_span``'s argmax over a 1-token step's logits)."""
    return max(2, triton.next_power_of_2(n_exp + 1))


def moe_route(logits: Tensor, block_m: int, zero: tuple[Tensor, ...] = (), in_kernel: bool = False, on=1,
              rows_of: MoeRows | None = None) -> MoeRows:
    """Top-1 routing of router logits [T, E] -> the grouped-row map for tiles of ``block_m`` rows, in one launch
    (``moe_route_kernel``); equal to ``moe_rows(*top-1 of logits, E, block_m)`` (equal maxima: the first expert).
    ``zero``: up to two flat int32 tensors the same launch fills with zeros (split-K counters of the GEMMs after it).
    ``in_kernel``: the grouped GEMMs build the tiles of a 1-token step from its logits themselves
    (``moe_route.tile_span``), so the launch has an empty grid then (a guard-free expression of a symbolic T: an
    engine skips it at batch-1 decode); nothing to zero then. ``on`` (0 or 1, an int or a SymInt) multiplies the
    grid: 0 where another tile size's map serves the step (``fused_moe_int4``'s prefill blocks). ``rows_of``: that
    other map, whose row arrays (row_tok, row_scale, routed_row: the same for any BM) this launch writes, so that
    what reads them after both launches reads the step's; the tile arrays are this map's own."""
    if len(zero) > 2 or any(z.dtype != torch.int32 or z.dim() != 1 for z in zero):
        raise ValueError("moe_route: zero takes up to two flat int32 tensors")
    if in_kernel and zero:
        raise ValueError("moe_route: with in_kernel the launch may not run, so it cannot zero split-K counters")
    n_tok, n_exp = logits.shape
    dev = logits.device
    block_g = _group_block(n_exp)
    block_t = max(16, min(256, 8192 // block_g))
    n_tiles = num_tiles(2 * n_tok, n_exp + 1, block_m)
    shared = ((rows_of.row_tok, rows_of.row_scale, rows_of.routed_row) if rows_of is not None else
              (torch.empty(2 * n_tok, device=dev, dtype=torch.int32),
               torch.empty(2 * n_tok, device=dev, dtype=torch.float32),
               torch.empty(n_tok, device=dev, dtype=torch.int64)))
    rows = MoeRows(*shared, *(torch.empty(n_tiles, device=dev, dtype=torch.int32) for _ in range(3)))
    # unused counter pointers (0 ints to zero) get buffers of their own: an output passed again there would alias
    # the kernel's mutated arguments, which Inductor resolves with a copy kernel per MoE layer (bf16 and FP8 steps)
    za, zb = (*zero, *(torch.empty(1, device=dev, dtype=torch.int32) for _ in range(2 - len(zero))))
    if _never(on):                                      # the other map serves this step: no launch at all
        return rows
    grid = (torch.sym_max(0, torch.sym_min(1, n_tok - 1)) if in_kernel else 1) * on           # 0 at T = 1
    wrap_triton(moe_route_kernel)[(grid,)](
        logits, rows.row_tok, rows.row_scale, rows.routed_row, rows.tile_group, rows.tile_row0, rows.tile_row_end,
        za, zb, n_tok, n_exp, n_tiles, za.numel() if zero else 0, zb.numel() if len(zero) > 1 else 0,
        logits.stride(0), logits.stride(1),
        BLOCK_M=block_m, BLOCK_T=block_t, BLOCK_G=block_g, BLOCK_NT=block_t, DECODE_T=MOE_ROUTE_DECODE_TOKENS)
    return rows


def _rows(x: Tensor, router_w: Tensor, top_k: int, block_m: int, logits: Tensor | None = None) -> MoeRows:
    """The grouped-row map of x's routing: the one-launch kernel for top-1 (on ``logits`` when given: x @ router_w^T,
    computed by ``l4::add_rms_norm_router``), ``moe_rows`` (aten) otherwise."""
    if logits is not None and top_k != 1:
        raise ValueError("fused MoE: router logits are taken for top-1 routing only")
    if top_k == 1:
        return moe_route(F.linear(x, router_w) if logits is None else logits, block_m)   # logits [T, E]
    idx, score = _route(x, router_w, top_k)                                      # [T, K] each
    return moe_rows(idx, score, router_w.shape[0], block_m)


def combine_rows(y: Tensor, rows: MoeRows, n_tok: int, top_k: int) -> Tensor:
    """y [R, H] in grouped-row order -> [T, H]: each token's shared row plus its K routed rows, gathered by
    ``rows.routed_row`` (a gather Inductor fuses into one pointwise kernel; a scatter-add would stay an opaque op),
    summed in float32 in row (= expert) order and rounded once, as the reference's ``index_add_`` does on the CPU."""
    by_row = rows.routed_row.view(n_tok, top_k)                                  # [T, K]
    if top_k > 1:
        by_row = by_row.sort(dim=1).values
    out = y[n_tok * top_k:].float()                                              # [T, H] shared rows
    for k in range(top_k):
        out = out + y.index_select(0, by_row[:, k]).float()
    return out.to(y.dtype)


class _NormLaunch:
    """What the fused MoE's launches take for ``norm`` = (residual [T, H], norm_w [H], eps), or None (``moe_norm.py``):
    ``gate_up`` / ``down`` the kernels' trailing arguments and constexprs; ``finish(y, rows)`` -> the op's result:
    ``combine_rows``' [T, H], or (h' = residual + that, x' = RMSNorm(h') * norm_w), each [T, H]."""

    def __init__(self, norm, x: Tensor, rows: MoeRows, top_k: int, hidden: int):
        n_tok = x.shape[0]
        self.n_tok, self.top_k, self.norm = n_tok, top_k, norm
        block_h = min(MOE_NORM_BLOCK_H, triton.next_power_of_2(hidden))
        if norm is None:        # unused pointers: inputs the kernels never write (no store under FUSE_NORM=False)
            self.gate_up = ((rows.tile_group, 0), {"FUSE_NORM": False})
            self.down = ((rows.tile_group, rows.row_tok, rows.routed_row, x, x, x, x, 0.0, 0, 0, 0),
                         {"FUSE_NORM": False, "NORM_T": MOE_NORM_DECODE_TOKENS, "HN": hidden, "BLOCK_HN": block_h})
            return
        residual, norm_w, eps = norm
        if top_k != 1:
            raise ValueError("fused MoE: the combine + residual + norm epilogue takes top-1 routing only")
        if residual.shape != x.shape or norm_w.shape != (hidden,) or not residual.dtype == norm_w.dtype == x.dtype:
            raise ValueError(f"fused MoE: residual {tuple(residual.shape)} {residual.dtype} and norm weight "
                             f"{tuple(norm_w.shape)} {norm_w.dtype} must be [T, H] and [H] of x's dtype {x.dtype}")
        self.residual, self.norm_w, self.eps = residual.contiguous(), norm_w.contiguous(), eps
        self.h = torch.empty((n_tok, hidden), device=x.device, dtype=x.dtype)
        self.x = torch.empty_like(self.h)
        counters = torch.empty(MOE_NORM_DECODE_TOKENS, device=x.device, dtype=torch.int32)
        self.block_h = block_h
        self.gate_up = ((counters, MOE_NORM_DECODE_TOKENS), {"FUSE_NORM": True})
        self.down = ((counters, rows.row_tok, rows.routed_row, self.residual, self.norm_w, self.h, self.x, eps,
                      self.residual.stride(0), self.h.stride(0), self.x.stride(0)),
                     {"FUSE_NORM": True, "NORM_T": MOE_NORM_DECODE_TOKENS, "HN": hidden, "BLOCK_HN": block_h})

    def finish(self, y: Tensor, rows: MoeRows):
        if self.norm is None:
            return combine_rows(y, rows, self.n_tok, self.top_k)
        # steps longer than the down launch's epilogue takes: one program a token (grid 0 otherwise, guard-free in T)
        longer = torch.sym_max(0, torch.sym_min(1, self.n_tok - MOE_NORM_DECODE_TOKENS))
        wrap_triton(moe_norm_kernel)[(self.n_tok * longer,)](
            y, rows.routed_row, self.residual, self.norm_w, self.h, self.x, self.n_tok, self.eps, y.stride(0),
            y.stride(1), self.residual.stride(0), self.h.stride(0), self.x.stride(0), H=y.shape[1],
            BLOCK_H=self.block_h)
        return self.h, self.x


def fused_moe(x: Tensor, router_w: Tensor, gate_up: Tensor, down: Tensor, shared_gate: Tensor, shared_up: Tensor,
              shared_down: Tensor, top_k: int, blocks: tuple[int, int, int] | None = None,
              logits: Tensor | None = None, norm: tuple | None = None):
    """The body of ``l4::moe_fused`` (and, with ``norm``, of ``l4::moe_fused_norm``); ``blocks`` (BM, BN, BK)
    overrides the static choice (tests); ``logits``: see ``_route_map``; ``norm``: see ``_NormLaunch``."""
    n_exp, i_dim, hidden = down.shape
    n_tok = x.shape[0]
    bm, bn, bk = blocks or moe_blocks(hidden, i_dim)
    logits, rows, in_map, map_modes = _route_map(x, router_w, top_k, bm, logits=logits)
    n_rows = n_tok * (top_k + 1)
    n_tiles = rows.tile_group.shape[0]
    mode = _dot_mode(x.dtype)
    nl = _NormLaunch(norm, x, rows, top_k, hidden)
    act = torch.empty((n_rows, i_dim), device=x.device, dtype=x.dtype)           # [R, I]
    wrap_triton(moe_gate_up_kernel)[(n_tiles, triton.cdiv(i_dim, bn))](
        x, gate_up, shared_gate, shared_up, act, rows.row_tok, rows.row_scale, rows.tile_group, rows.tile_row0,
        rows.tile_row_end, hidden, i_dim, n_exp, x.stride(0), x.stride(1), gate_up.stride(0), gate_up.stride(1),
        gate_up.stride(2), shared_gate.stride(0), shared_gate.stride(1), act.stride(0), act.stride(1), logits,
        rows.routed_row, *in_map, *nl.gate_up[0], BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, **map_modes, **mode,
        **nl.gate_up[1])
    y = torch.empty((n_rows, hidden), device=x.device, dtype=x.dtype)            # [R, H]
    wrap_triton(moe_down_kernel)[(n_tiles, triton.cdiv(hidden, bn))](
        act, down, shared_down, y, rows.tile_group, rows.tile_row0, rows.tile_row_end, hidden, i_dim, n_exp,
        act.stride(0), act.stride(1), down.stride(0), down.stride(1), down.stride(2), shared_down.stride(0),
        shared_down.stride(1), y.stride(0), y.stride(1), logits, *in_map, *nl.down[0], BLOCK_M=bm, BLOCK_N=bn,
        BLOCK_K=bk, **map_modes, **mode, **nl.down[1])
    return nl.finish(y, rows)


def _route_map(x: Tensor, router_w: Tensor, top_k: int, block_m: int, locks: tuple[Tensor, ...] = (),
               logits: Tensor | None = None, on=1):
    """The routing of a fused MoE whose grouped GEMMs take ``moe_route.tile_span``'s arguments -> (logits, map,
    (T, logits' expert stride), the GEMMs' constexprs MAP_IN_KERNEL / BLOCK_G). Top-1 without split-K ``locks`` to
    zero: the GEMMs map a 1-token step from the logits themselves and the route launch's grid is empty then; top-1
    with locks: the route kernel maps every step and zeroes them; top-k: ``moe_rows`` (x stands in for the logits,
    a pointer never read). ``logits`` [T, E]: x @ router_w^T as computed already (``l4::add_rms_norm_router``, in a
    CUDA engine's step), so the MoE launches no router matmul of its own; top-1 only. ``on``: ``moe_route``'s."""
    n_exp = router_w.shape[0]
    in_kernel = top_k == 1 and not locks
    if top_k == 1:
        logits = F.linear(x, router_w) if logits is None else logits             # [T, E]
        rows = moe_route(logits, block_m, locks, in_kernel, on)
    else:
        logits, rows = x, _rows(x, router_w, top_k, block_m, logits)             # given logits: refused
    return logits, rows, (x.shape[0], logits.stride(-1)), {"MAP_IN_KERNEL": in_kernel,
                                                            "BLOCK_G": _group_block(n_exp)}


@dataclass(frozen=True)
class _MoeTiling:
    """One tile size's launches of the fused Int4 MoE: ``on`` (0 or 1, an int or a SymInt) multiplies their row
    tiles; ``gate_up`` / ``down`` are its blocks, ``*_split`` their ``_split_k_buffers``, ``grid_*`` the grids'
    first two axes, ``words`` their SCALE_WORDS (``_k_step``); ``rows`` its map and ``modes`` the map constexprs
    (``_route_map``'s), set once its route launch is made (which zeroes the split counters, so comes after them)."""
    on: object
    gate_up: Int4Blocks
    down: Int4Blocks
    gate_up_split: tuple
    down_split: tuple
    grid_gate_up: tuple
    grid_down: tuple
    words: tuple[bool, bool]
    rows: MoeRows | None = None
    modes: dict | None = None


def fused_moe_int4(x: Tensor, router_w: Tensor, gate_up_q: Tensor, gate_up_s: Tensor, down_q: Tensor, down_s: Tensor,
                   shared_gate_q: Tensor, shared_gate_s: Tensor, shared_up_q: Tensor, shared_up_s: Tensor,
                   shared_down_q: Tensor, shared_down_s: Tensor, top_k: int,
                   blocks: tuple[Int4Blocks, Int4Blocks] | None = None, logits: Tensor | None = None,
                   norm: tuple | None = None, prefill: tuple[Int4Blocks, Int4Blocks] | None = None):
    """The body of ``l4::moe_q_fused`` (with ``norm``: ``l4::moe_q_fused_norm``); ``blocks`` (gate_up, down; same BM)
    overrides ``default_moe_int4_blocks``; ``logits``: see ``_route_map``; ``norm``: see ``_NormLaunch``.
    The shared gate/up weights share one set of strides and every scale group matches its routed counterpart
    (one Gh, one Gi per kernel), as the quantize pass produces them. ``prefill`` (gate_up, down; same BM, unsplit):
    the blocks of top-1 steps of more than ``INT4_PREFILL_ROWS`` tokens, on a tile map of their own BM, launched
    beside the decode blocks' route, gate_up and down (each with an empty grid where the other runs; both write the
    same row map, activations and output); by default ``default_moe_int4_prefill_blocks``, none where only
    ``blocks`` is given."""
    n_exp, hidden, i_dim = down_q.shape[0], down_q.shape[1], 2 * down_q.shape[2]
    group_h, group_i = hidden // gate_up_s.shape[2], i_dim // down_s.shape[2]
    if (shared_gate_q.stride() != shared_up_q.stride() or shared_gate_s.stride() != shared_up_s.stride()
            or shared_gate_s.shape[1] != gate_up_s.shape[2] or shared_down_s.shape[1] != down_s.shape[2]):
        raise ValueError("moe_q_fused: shared gate/up strides or shared scale groups differ from the routed ones")
    bgu, bdn = blocks or default_moe_int4_blocks(down_q, gate_up_s, down_s)
    if prefill is None and blocks is None and top_k == 1:
        prefill = default_moe_int4_prefill_blocks(down_q, gate_up_s, down_s, x.dtype)
    for gu_b, dn_b in (bgu, bdn), *((prefill,) if prefill is not None else ()):
        if gu_b.block_m != dn_b.block_m:
            raise ValueError("moe_q_fused: gate_up and down blocks must share BM (one tile map)")
        if gu_b.bf16x2:                                                          # gate_up: N = I, K = H
            _check_bf16x2(x, i_dim, hidden, gate_up_s, gu_b)
        if dn_b.bf16x2:                                                          # down: N = H, K = I
            _check_bf16x2(x, hidden, i_dim, down_s, dn_b)
    if prefill is not None and (top_k != 1 or max(prefill[0].split_k, prefill[1].split_k) > 1):
        raise ValueError("moe_q_fused: prefill blocks take top-1 routing and do not split K")
    n_tok = x.shape[0]
    n_rows = n_tok * (top_k + 1)
    # 1 iff T <= INT4_PREFILL_ROWS (guard-free in a symbolic T): the decode blocks' launches, else the prefill ones'
    short = 1 if prefill is None else _short_step(n_tok)

    def tiling(on, gate_up: Int4Blocks, down: Int4Blocks) -> _MoeTiling:
        n_tiles = num_tiles(n_rows, n_exp + 1, gate_up.block_m) * on           # the map's tiles (moe_route, moe_rows)
        grid_gu, grid_dn = (n_tiles, triton.cdiv(i_dim, gate_up.block_n)), (n_tiles, triton.cdiv(hidden, down.block_n))
        words_gu, step_gu = _k_step(gate_up, group_h, gate_up_s, shared_gate_s, shared_up_s)
        words_dn, step_dn = _k_step(down, group_i, down_s, shared_down_s)
        # split-K counters of both GEMMs: zeroed by the top-1 route kernel, no fill kernels of their own
        return _MoeTiling(on, gate_up, down,
                          _split_k_buffers(n_rows, 2 * i_dim, hidden, gate_up, x, grid_gu[0] * grid_gu[1], step_gu,
                                           top_k != 1),
                          _split_k_buffers(n_rows, hidden, i_dim, down, x, grid_dn[0] * grid_dn[1], step_dn,
                                           top_k != 1),
                          grid_gu, grid_dn, (words_gu, words_dn))

    decode = tiling(short, bgu, bdn)
    gu, dn = decode.gate_up_split, decode.down_split
    # both GEMMs unsplit (nothing to zero): a 1-token top-1 step's tiles come from its logits in the GEMMs
    unsplit = all(isinstance(p[4], int) and p[4] == 1 for p in (gu, dn))
    logits, rows, in_map, map_modes = _route_map(x, router_w, top_k, bgu.block_m,
                                                 () if top_k != 1 or unsplit else (gu[2], dn[2]), logits, short)
    nl = _NormLaunch(norm, x, rows, top_k, hidden)
    act = torch.empty((n_rows, i_dim), device=x.device, dtype=x.dtype)           # [R, I]
    y = torch.empty((n_rows, hidden), device=x.device, dtype=x.dtype)            # [R, H]
    tilings = [replace(decode, rows=rows, modes=map_modes)]
    if prefill is not None:     # the prefill map: its own tiles, the row arrays above; unsplit, so nothing to zero
        p = tiling(1 - short, *prefill)
        tilings.append(replace(p, rows=moe_route(logits, p.gate_up.block_m, on=p.on, rows_of=rows),
                               modes={**map_modes, "MAP_IN_KERNEL": False}))
    tilings = [t for t in tilings if not _never(t.on)]
    mode = _dot_mode(x.dtype)
    for t in tilings:
        part, part_strides, lock, k_split, splits = t.gate_up_split
        wrap_triton(moe_int4_gate_up_kernel)[(*t.grid_gate_up, splits)](
            x, gate_up_q, gate_up_s, shared_gate_q, shared_gate_s, shared_up_q, shared_up_s, act, part, lock,
            t.rows.row_tok, t.rows.row_scale, t.rows.tile_group, t.rows.tile_row0, t.rows.tile_row_end, hidden,
            i_dim, n_exp, group_h, k_split, splits, x.stride(0), x.stride(1), *gate_up_q.stride(),
            *gate_up_s.stride(), *shared_gate_q.stride(), *shared_gate_s.stride(), act.stride(0), act.stride(1),
            *part_strides, logits, t.rows.routed_row, *in_map, *nl.gate_up[0], BLOCK_M=t.gate_up.block_m,
            BLOCK_N=t.gate_up.block_n, BLOCK_K=t.gate_up.block_k, SCALE_PER_BLOCK=t.gate_up.scale_per_block,
            SCALE_WORDS=t.words[0],
            BF16X2=t.gate_up.bf16x2, FMA_UNPACK=fma_unpack(t.gate_up, (gate_up_q, shared_gate_q, shared_up_q),
                                                           (gate_up_s, shared_gate_s, shared_up_s)),
            **t.modes, **mode, **nl.gate_up[1], **_launch(t.gate_up))
    for t in tilings:
        part, part_strides, lock, k_split, splits = t.down_split
        wrap_triton(moe_int4_down_kernel)[(*t.grid_down, splits)](
            act, down_q, down_s, shared_down_q, shared_down_s, y, part, lock, t.rows.tile_group, t.rows.tile_row0,
            t.rows.tile_row_end, hidden, i_dim, n_exp, group_i, k_split, splits, act.stride(0), act.stride(1),
            *down_q.stride(), *down_s.stride(), *shared_down_q.stride(), *shared_down_s.stride(), y.stride(0),
            y.stride(1), *part_strides, logits, *in_map, *nl.down[0], BLOCK_M=t.down.block_m,
            BLOCK_N=t.down.block_n, BLOCK_K=t.down.block_k, SCALE_PER_BLOCK=t.down.scale_per_block,
            SCALE_WORDS=t.words[1], BF16X2=t.down.bf16x2,
            FMA_UNPACK=fma_unpack(t.down, (down_q, shared_down_q), (down_s, shared_down_s)), **t.modes, **mode,
            **nl.down[1], **_launch(t.down))
    return nl.finish(y, rows)


def fused_moe_fp8(x: Tensor, router_w: Tensor, gate_up_q: Tensor, gate_up_s: Tensor, down_q: Tensor, down_s: Tensor,
                  shared_gate_q: Tensor, shared_gate_s: Tensor, shared_up_q: Tensor, shared_up_s: Tensor,
                  shared_down_q: Tensor, shared_down_s: Tensor, top_k: int,
                  blocks: tuple[tuple[int, int, int], tuple[int, int, int]] | None = None,
                  logits: Tensor | None = None, norm: tuple | None = None):
    """The body of ``l4::moe_fp8_fused`` (with ``norm``: ``l4::moe_fp8_fused_norm``); ``blocks`` ((BM, BN, BK) of
    gate_up and down; same BM) overrides the static choice (tests); ``logits``: see ``_route_map``; ``norm``: see
    ``_NormLaunch``. Float8 weights in nn.Linear orientation with one scale per output
    channel (``quantize_fp8``); the shared gate/up weights share one set of strides."""
    n_exp, hidden, i_dim = down_q.shape
    if shared_gate_q.stride() != shared_up_q.stride() or shared_gate_s.stride() != shared_up_s.stride():
        raise ValueError("moe_fp8_fused: the shared gate and up weights (or scales) have different strides")
    bgu, bdn = blocks or moe_fp8_blocks(hidden, i_dim)
    if bgu[0] != bdn[0]:
        raise ValueError("moe_fp8_fused: gate_up and down blocks must share BM (one tile map)")
    n_tok = x.shape[0]
    logits, rows, in_map, map_modes = _route_map(x, router_w, top_k, bgu[0], logits=logits)
    n_rows = n_tok * (top_k + 1)
    n_tiles = rows.tile_group.shape[0]
    mode = _fp8_mode(x)
    nl = _NormLaunch(norm, x, rows, top_k, hidden)
    act = torch.empty((n_rows, i_dim), device=x.device, dtype=x.dtype)           # [R, I]
    wrap_triton(moe_fp8_gate_up_kernel)[(n_tiles, triton.cdiv(i_dim, bgu[1]))](
        x, gate_up_q, gate_up_s, shared_gate_q, shared_gate_s, shared_up_q, shared_up_s, act, rows.row_tok,
        rows.row_scale, rows.tile_group, rows.tile_row0, rows.tile_row_end, hidden, i_dim, n_exp,
        x.stride(0), x.stride(1), *gate_up_q.stride(), *gate_up_s.stride(), *shared_gate_q.stride(),
        shared_gate_s.stride(0), act.stride(0), act.stride(1), logits, rows.routed_row, *in_map, *nl.gate_up[0],
        BLOCK_M=bgu[0], BLOCK_N=bgu[1], BLOCK_K=bgu[2], **mode, **map_modes, **nl.gate_up[1])
    y = torch.empty((n_rows, hidden), device=x.device, dtype=x.dtype)            # [R, H]
    wrap_triton(moe_fp8_down_kernel)[(n_tiles, triton.cdiv(hidden, bdn[1]))](
        act, down_q, down_s, shared_down_q, shared_down_s, y, rows.tile_group, rows.tile_row0, rows.tile_row_end,
        hidden, i_dim, n_exp, act.stride(0), act.stride(1), *down_q.stride(), *down_s.stride(),
        *shared_down_q.stride(), shared_down_s.stride(0), y.stride(0), y.stride(1), logits, *in_map, *nl.down[0],
        BLOCK_M=bdn[0], BLOCK_N=bdn[1], BLOCK_K=bdn[2], **mode, **map_modes, **nl.down[1])
    return nl.finish(y, rows)


def _k_step(b: Int4Blocks, group: int, *scales: Tensor) -> tuple[bool, int]:
    """(SCALE_WORDS, K step) of an Int4 GEMM launch: its scales load as 32-bit words (``layout.scale_words``, only
    with one scale per row per K block) and its K loop then steps 2G inputs, else one K block. The kernels derive
    the same step from these constexprs (``STEP``); split-K slices are multiples of it."""
    words = b.scale_per_block and scale_words(*scales)
    return words, 2 * group if words else b.block_k


def _split_k_buffers(rows, part_cols: int, k_in: int, b: Int4Blocks, x: Tensor, n_tiles, step: int,
                     zero_locks: bool = True, lock: Tensor | None = None):
    """What an Int4 GEMM split ``split_k.py``'s way needs -> (part, part strides, lock, K_SPLIT, S): S and K_SPLIT (a
    multiple of the kernel's K ``step``: BK, or 2G when it loads scales as words) from ``split_k_plan`` (SymInts in a
    symbolic ``rows``); part: float32 partials [S, rows, part_cols] (strides given) and lock: one int32 zero counter
    per output tile, both flat. Empty when S is a constant 1 (no fill kernel); when S is a SymInt, never under 2
    elements, so that no contiguity check of a symbolic size asks whether it is 0 or 1: S = 1 at prefill and S > 1
    at decode in one engine would make that a guard on T (export then refuses the dynamic token count).
    ``zero_locks=False``: lock is left unset, for a kernel launched before the GEMM to zero (``moe_route``).
    ``lock``: a chained GEMM's zeroed block of ``SPLIT_K_LOCK_WORDS`` counters, used as it is (S = 1 where the tiles
    outnumber them)."""
    splits, k_split = split_k_plan(rows, part_cols, k_in, step, b.split_k, n_tiles,
                                   None if lock is None else lock.numel())
    used = torch.sym_min(1, splits - 1)
    least = 2 if isinstance(splits, torch.SymInt) else 0
    part = torch.empty(torch.sym_max(least, splits * used * rows * part_cols), device=x.device, dtype=torch.float32)
    if lock is None:
        lock = (torch.zeros if zero_locks else torch.empty)(torch.sym_max(least, n_tiles * used), device=x.device,
                                                             dtype=torch.int32)
    return part, (rows * part_cols, part_cols, 1), lock, k_split, splits


def _check_bf16x2(x: Tensor, n_out: int, k_in: int, w_scale: Tensor, b: Int4Blocks) -> None:
    """What the inline-PTX unpack (``int4_mm.int4_pairs_bf16``) needs of an Int4 GEMM of ``n_out`` outputs over
    ``k_in`` inputs; ValueError otherwise."""
    why = ("it is sm_90 PTX, which the CPU interpreter cannot run" if interpreting() else
           "x and the scales must be bfloat16" if (x.dtype, w_scale.dtype) != (torch.bfloat16,) * 2 else
           "it needs one scale per row per K block (SCALE_PER_BLOCK)" if not b.scale_per_block else
           "BK must be >= 32 (two dots of BK/2 >= 16) and BN x BK >= 1024 (4 bytes a thread)"
           if b.block_k < 32 or b.block_n * b.block_k < 1024 else
           f"N {n_out} and K {k_in} must divide by BN {b.block_n} and BK {b.block_k} (its loads are not masked)"
           if n_out % b.block_n or k_in % b.block_k else None)
    if why:
        raise ValueError(f"Int4 GEMM [{n_out} x {k_in}]: the bf16x2 unpack does not apply: {why}")


def _check_lock(op: str, lock: Tensor, device: torch.device) -> None:
    """ValueError unless ``lock`` is a chained launch's block of counters: [SPLIT_K_LOCK_WORDS] int32 on ``device``."""
    if lock.dtype != torch.int32 or lock.shape != (SPLIT_K_LOCK_WORDS,) or lock.device != device:
        raise ValueError(f"{op}: lock must be [{SPLIT_K_LOCK_WORDS}] int32 zeros on {device}, got "
                         f"{list(lock.shape)} {lock.dtype} on {lock.device}")


def _launch(b: Int4Blocks | AttentionBlocks) -> dict:
    """The launch options of a kernel's blocks: ``num_stages`` and ``num_warps`` only where the blocks set them
    (sweep candidates, the Int4 prefill blocks; otherwise Triton's defaults). AttentionBlocks have no num_stages."""
    return {k: v for k, v in (("num_stages", getattr(b, "num_stages", None)), ("num_warps", b.num_warps)) if v}


def _short_step(rows):
    """1 where a step of ``rows`` rows / tokens (an int or a SymInt) runs the Int4 decode blocks (at most
    ``INT4_PREFILL_ROWS``), else 0: a guard-free expression, so an engine's symbolic step keeps one graph."""
    return torch.sym_max(0, torch.sym_min(1, INT4_PREFILL_ROWS + 1 - rows))


def _never(on) -> bool:
    """Whether a launch's grid factor ``on`` (0 or 1, an int or a SymInt) is the constant 0: no launch is made."""
    return isinstance(on, int) and on == 0


def default_int4_blocks(w_packed: Tensor, w_scale: Tensor) -> Int4Blocks:
    """The blocks ``l4::int4_mm`` launches with on these weights: the active tuned table's for their problem
    (``tuned_blocks``), else ``layout.int4_blocks`` of their shape."""
    n_out, k_in = w_packed.shape[0], 2 * w_packed.shape[1]
    group = k_in // w_scale.shape[1]
    return tuned_blocks.lookup(int4_key(n_out, k_in, group, w_scale.dtype)) or int4_blocks(n_out, k_in, group)


def default_int4_prefill_blocks(w_packed: Tensor, w_scale: Tensor, x_dtype: torch.dtype) -> Int4Blocks | None:
    """The blocks ``l4::int4_mm`` launches with at a step of more than ``INT4_PREFILL_ROWS`` rows of ``x_dtype``
    (``layout.int4_prefill_blocks``), or None where its decode blocks serve every step."""
    n_out, k_in = w_packed.shape[0], 2 * w_packed.shape[1]
    return int4_prefill_blocks(n_out, k_in, k_in // w_scale.shape[1], x_dtype, w_scale.dtype)


def default_moe_int4_prefill_blocks(down_q: Tensor, gate_up_s: Tensor, down_s: Tensor,
                                    x_dtype: torch.dtype) -> tuple[Int4Blocks, Int4Blocks] | None:
    """The (gate_up, down) blocks ``l4::moe_q_fused`` launches with at a step of more than ``INT4_PREFILL_ROWS``
    tokens of ``x_dtype`` (``layout.moe_int4_prefill_blocks``), or None where its decode blocks serve every step."""
    hidden, i_dim = down_q.shape[1], 2 * down_q.shape[2]
    return moe_int4_prefill_blocks(hidden, i_dim, hidden // gate_up_s.shape[2], i_dim // down_s.shape[2], x_dtype,
                                   down_s.dtype)


def default_moe_int4_blocks(down_q: Tensor, gate_up_s: Tensor, down_s: Tensor) -> tuple[Int4Blocks, Int4Blocks]:
    """(gate_up, down) blocks ``l4::moe_q_fused`` launches with on these weights (down_q [E, H, I/2], scales
    [E, 2I, H/Gh] and [E, H, I/Gi]): the active tuned table's, else ``layout.moe_int4_blocks``."""
    n_exp, hidden, i_dim = down_q.shape[0], down_q.shape[1], 2 * down_q.shape[2]
    group_h, group_i = hidden // gate_up_s.shape[2], i_dim // down_s.shape[2]
    return (tuned_blocks.lookup(moe_key(n_exp, hidden, i_dim, group_h, group_i, down_s.dtype))
            or moe_int4_blocks(hidden, i_dim, group_h, group_i))


@dataclass(frozen=True)
class KRope:
    """The q / k transform an Int4 qkv GEMM applies in its epilogue (``l4::int4_mm_rope``, ``k_rope.py``): RoPE at
    positions start + t (token t of each of the GEMM's sequences of ``tokens`` rows), then with ``qk_norm`` the RMS
    norm over each head, on output columns [k_col0, k_col0 + k_cols) (an engine's: q's and k's)."""
    start: Tensor          # [1] int64
    cos: Tensor            # [P, D/2] float32
    sin: Tensor
    tokens: int            # T (int or SymInt): the GEMM's rows are B sequences of T tokens
    k_col0: int
    k_cols: int
    head_dim: int
    qk_norm: bool
    eps: float


def int4_matmul(x: Tensor, w_packed: Tensor, w_scale: Tensor, blocks=None, lock: Tensor | None = None,
                next_lock: Tensor | None = None, rope: KRope | None = None, prefill=None):
    """The body of ``l4::int4_mm`` (x [M, Kin] -> [M, N]); ``blocks`` (an ``Int4Blocks``) overrides (tests). With
    ``split_k`` > 1, up to that many programs share an output tile (``split_k.py``, ``layout.split_k_plan``).
    ``lock`` (the body of ``l4::int4_mm_chained``): [SPLIT_K_LOCK_WORDS] int32 zeros, the tile counters, left zeros;
    the launch then also zeroes a fresh block (``next_lock``, given or allocated) and returns (y, that block).
    ``rope`` (``l4::int4_mm_rope``): the epilogue transforms the keys' columns, with the blocks made to fit heads
    (``layout.rope_int4_blocks``; ValueError where none do: ``default_rope_blocks`` is None).
    ``prefill``: the blocks of steps of more than ``INT4_PREFILL_ROWS`` rows, launched beside the decode blocks'
    (each with an empty grid where the other runs); by default ``default_int4_prefill_blocks``, none (one launch for
    every M) where only ``blocks`` is given."""
    n_out, k_in = w_packed.shape[0], 2 * w_packed.shape[1]
    group = k_in // w_scale.shape[1]
    b = blocks or default_int4_blocks(w_packed, w_scale)
    if prefill is None and blocks is None:
        prefill = default_int4_prefill_blocks(w_packed, w_scale, x.dtype)
    if rope is not None:
        b = rope_int4_blocks(b, n_out, rope.head_dim, rope.k_col0, rope.k_cols)
        if b is None:
            raise ValueError(f"int4_mm_rope: no tile width fits heads of {rope.head_dim} at columns "
                             f"[{rope.k_col0}, {rope.k_col0 + rope.k_cols})")
        if prefill is not None:
            prefill = rope_int4_blocks(prefill, n_out, rope.head_dim, rope.k_col0, rope.k_cols)
    chain = lock is not None
    if chain:
        _check_lock("int4_mm_chained", lock, x.device)
        if next_lock is None:
            next_lock = torch.empty(SPLIT_K_LOCK_WORDS, device=x.device, dtype=torch.int32)
    y = torch.empty((x.shape[0], n_out), device=x.device, dtype=x.dtype)
    launch = (x, w_packed, w_scale, y, group, lock, next_lock, rope)
    if prefill is None:
        _int4_launch(*launch, b, 1)
    else:                  # 1 iff M <= INT4_PREFILL_ROWS, guard-free in a symbolic M: one of the two grids is empty
        short = _short_step(x.shape[0])
        _int4_launch(*launch, b, short)
        _int4_launch(*launch, prefill, 1 - short)
    return (y, next_lock) if chain else y


def _int4_launch(x: Tensor, w_packed: Tensor, w_scale: Tensor, y: Tensor, group: int, lock: Tensor | None,
                 next_lock: Tensor | None, rope: KRope | None, b: Int4Blocks, on) -> None:
    """One launch of ``int4_matmul``'s kernel with blocks ``b`` into y, its row tiles times ``on`` (0 or 1, an int or
    a SymInt); none at all where ``on`` is a constant 0. A chained launch (``lock``) zeroes ``next_lock``."""
    if _never(on):
        return
    n_out, k_in = y.shape[1], x.shape[1]
    if b.bf16x2:
        _check_bf16x2(x, n_out, k_in, w_scale, b)
    chain = lock is not None
    grid_m, grid_n = triton.cdiv(x.shape[0], b.block_m) * on, triton.cdiv(n_out, b.block_n)
    words, step = _k_step(b, group, w_scale)
    part, part_strides, lock, k_split, splits = _split_k_buffers(x.shape[0], n_out, k_in, b, x, grid_m * grid_n, step,
                                                                 lock=lock)
    nxt = next_lock if chain else lock                                          # unused pointer when not chained
    args = (x, w_packed, w_scale, y, part, lock, x.shape[0], n_out, k_in, group, k_split, splits, x.stride(0),
            x.stride(1), w_packed.stride(0), w_packed.stride(1), w_scale.stride(0), w_scale.stride(1), y.stride(0),
            y.stride(1), *part_strides, nxt, nxt.numel() if chain else 0, *_rope_args(rope, y))
    epilogue = dict(K_ROPE=rope is not None, QK_NORM=rope is not None and rope.qk_norm,
                    HEAD_D=rope.head_dim if rope is not None else 16)
    if b.bf16x2:
        wrap_triton(int4_mm_bf16x2_kernel)[(grid_m, grid_n, splits)](
            *args, BLOCK_M=b.block_m, BLOCK_N=b.block_n, BLOCK_K=b.block_k, SCALE_WORDS=words, CHAIN=chain,
            **epilogue, **_launch(b))
    else:
        wrap_triton(int4_mm_kernel)[(grid_m, grid_n, splits)](
            *args, BLOCK_M=b.block_m, BLOCK_N=b.block_n, BLOCK_K=b.block_k, SCALE_PER_BLOCK=b.scale_per_block,
            SCALE_WORDS=words, CHAIN=chain, FMA_UNPACK=fma_unpack(b, (w_packed,), (w_scale,)), **_dot_mode(x.dtype),
            **epilogue, **_launch(b))


def _rope_args(rope: KRope | None, y: Tensor) -> tuple:
    """The Int4 GEMM kernels' epilogue arguments (start, cos, sin, T, k_col0, k_cols, eps and the tables' strides);
    unused placeholders (y's pointer, zeros) without ``rope``."""
    if rope is None:
        return (y, y, y, 1, 0, 0, 0.0, 0, 0, 0, 0)
    return (rope.start, rope.cos, rope.sin, rope.tokens, rope.k_col0, rope.k_cols, rope.eps, rope.cos.stride(0),
            rope.cos.stride(1), rope.sin.stride(0), rope.sin.stride(1))


def default_rope_blocks(w_packed: Tensor, w_scale: Tensor, head_dim: int, k_col0: int,
                        k_cols: int) -> Int4Blocks | None:
    """The blocks ``l4::int4_mm_rope`` launches with on these weights (``default_int4_blocks`` widened to whole
    heads, ``layout.rope_int4_blocks``); None where no tile width holds whole heads."""
    return rope_int4_blocks(default_int4_blocks(w_packed, w_scale), w_packed.shape[0], head_dim, k_col0, k_cols)


def _int4_rope(x: Tensor, w_packed: Tensor, w_scale: Tensor, start_pos: Tensor, cos: Tensor, sin: Tensor,
               k_col0: int, k_cols: int, head_dim: int, qk_norm: bool, eps: float, lock: Tensor | None = None):
    """The bodies of ``l4::int4_mm_rope`` / ``_chained``: x [B, T, Kin] -> y [B, T, N] (and the next block)."""
    rope = KRope(start_pos.reshape(1), cos, sin, x.shape[1], k_col0, k_cols, head_dim, qk_norm, eps)
    out = int4_matmul(x.reshape(-1, x.shape[-1]), w_packed, w_scale, lock=lock, rope=rope)
    shape = (*x.shape[:-1], w_packed.shape[0])
    return out.view(shape) if lock is None else (out[0].view(shape), out[1])


def fused_attention(q: Tensor, k_new: Tensor, v_new: Tensor, k_cache: Tensor, v_cache: Tensor, start_pos: Tensor,
                    n_heads: int, n_kv_heads: int, chunk: int, scaling: float,
                    blocks: AttentionBlocks | None = None, n_split: int | None = None) -> Tensor:
    """The body of ``l4::attention_fused``; ``blocks`` and ``n_split`` override the static choices (tests)."""
    return _fused_attention(q, k_new, v_new, k_cache, v_cache, start_pos, n_heads, n_kv_heads, chunk, scaling, blocks,
                            n_split)


def fused_attention_inplace(q: Tensor, k_new: Tensor, v_new: Tensor, k_cache: Tensor, v_cache: Tensor,
                            start_pos: Tensor, cos: Tensor, sin: Tensor, n_heads: int, n_kv_heads: int, chunk: int,
                            scaling: float, use_rope: bool, qk_norm: bool, temp_tuning: bool, floor_scale: float,
                            attn_scale: float, eps: float, blocks: AttentionBlocks | None = None,
                            n_split: int | None = None, lock: Tensor | None = None,
                            next_lock: Tensor | None = None):
    """The body of ``l4::attention_fused_inplace``: q as projected (the partial kernel applies the layer's RoPE and
    qk-norm, or its temperature, as ``ops.attention._project`` does), k_new / v_new as cached; after the attention
    has read the caches, the T new keys / values are written into them in place. ``blocks`` and ``n_split``
    override the static choices (tests). ``lock`` (the body of ``l4::attention_fused_chained``):
    [SPLIT_K_LOCK_WORDS] int32 zeros, left zeros; with more than one key split the partial kernel then merges the
    splits and writes the caches itself, and the launch zeroes a fresh block (``next_lock``, given or allocated)
    -> (out, that block)."""
    if cos.shape != sin.shape or cos.dim() != 2 or cos.shape[1] * 2 != q.shape[-1]:
        raise ValueError(f"attention_fused_inplace: cos / sin must be [positions, {q.shape[-1] // 2}], "
                         f"got {list(cos.shape)} / {list(sin.shape)}")
    return _fused_attention(q, k_new, v_new, k_cache, v_cache, start_pos, n_heads, n_kv_heads, chunk, scaling, blocks,
                            n_split, write_caches=True,
                            q_transform=(cos, sin, use_rope, qk_norm, temp_tuning, floor_scale, attn_scale, eps),
                            lock=lock, next_lock=next_lock)


def _fused_attention(q: Tensor, k_new: Tensor, v_new: Tensor, k_cache: Tensor, v_cache: Tensor, start_pos: Tensor,
                     n_heads: int, n_kv_heads: int, chunk: int, scaling: float, blocks: AttentionBlocks | None,
                     n_split: int | None, write_caches: bool = False, q_transform: tuple | None = None,
                     lock: Tensor | None = None, next_lock: Tensor | None = None):
    """The bodies. ``write_caches``: the combine launch writes the new keys into the caches. ``q_transform``:
    (cos, sin, use_rope, qk_norm, temp_tuning, floor_scale, attn_scale, eps) for the partial kernel to apply to q;
    None: q comes transformed. ``lock`` / ``next_lock``: ``fused_attention_inplace``'s (MERGE)."""
    if not scaling > 0:                            # the kernel keeps row maxima of unscaled scores
        raise ValueError(f"attention_fused: scaling must be > 0, got {scaling}")
    batch, _, n_tok, head_dim = q.shape
    slots = k_cache.shape[2]
    rep = n_heads // n_kv_heads
    n_rows = rep * n_tok
    bl = blocks or attention_blocks(head_dim)
    row_blocks = triton.cdiv(n_rows, bl.block_m)
    splits = n_split or attention_splits(row_blocks, batch, n_kv_heads, slots, bl.block_n)
    mode = _dot_mode(q.dtype)
    merge = lock is not None
    if merge:
        _check_lock("attention_fused_chained", lock, q.device)
        bh = batch * n_kv_heads
        need = (row_blocks + 1) * bh
        if isinstance(need, int) and isinstance(splits, int) and splits > 1 and need > SPLIT_K_LOCK_WORDS:
            raise ValueError(f"attention_fused_chained: {row_blocks} row blocks x {bh} (batch, kv head) pairs and "
                             f"{splits} splits need {need} counters, more than {SPLIT_K_LOCK_WORDS}")
        if next_lock is None:
            next_lock = torch.empty(SPLIT_K_LOCK_WORDS, device=q.device, dtype=torch.int32)
    # partials only where there is more than one split (one split writes ``out`` itself): at an 8K-token prefill,
    # S = 1 and [S, B, Hkv, M, D] float32 would be 168 MB per layer for nothing; as a size, guard-free in T
    split = torch.sym_min(1, splits - 1)                                        # 1 iff S > 1, guard-free in T
    n_part = splits * split
    o_part = torch.empty((n_part, batch, n_kv_heads, n_rows, head_dim), device=q.device, dtype=torch.float32)
    lse = torch.empty((n_part, batch, n_kv_heads, n_rows), device=q.device, dtype=torch.float32)
    out = torch.empty((batch, n_tok, n_heads * head_dim), device=q.device, dtype=q.dtype)   # [B, T, Hq*D]
    out_strides = (out.stride(0), out.stride(1), head_dim, 1)                   # [B, T, Hq, D] view of out
    start = start_pos.reshape(1).to(torch.int64)
    decode_m = min(ATTENTION_DECODE_BLOCK_M, bl.block_m)
    # the merge loads a row's splits at once: a block of at least S (the most a step may get when S is a SymInt)
    block_s = triton.next_power_of_2(max(2, splits if isinstance(splits, int) else ATTENTION_MAX_SPLITS))
    if q_transform is None:                         # unused table pointers: q's own (never read)
        cos, sin, rope, qk_norm, temp, floor_scale, attn_scale, eps = q, q, False, False, False, 1.0, 0.0, 0.0
        table_strides = (0, 0, 0, 0)
    else:
        cos, sin, rope, qk_norm, temp, floor_scale, attn_scale, eps = q_transform
        table_strides = (*cos.stride(), *sin.stride())
    wrap_triton(attention_partial_kernel)[(row_blocks, batch * n_kv_heads, splits)](
        q, k_new, v_new, k_cache, v_cache, start, o_part, lse, out, cos, sin, n_tok, slots, head_dim, n_kv_heads,
        rep, chunk, splits, scaling, floor_scale, attn_scale, eps, *q.stride(), *k_new.stride(), *v_new.stride(),
        *k_cache.stride(), *v_cache.stride(), *o_part.stride(), *lse.stride(), *out_strides, *table_strides,
        lock if merge else start, next_lock if merge else start, next_lock.numel() if merge else 0,
        BLOCK_M=bl.block_m, BLOCK_N=bl.block_n, BLOCK_D=bl.block_d, DECODE_M=decode_m, ROPE=rope,
        QK_NORM=qk_norm, TEMP=temp, MERGE=merge, BLOCK_S=block_s, STAGES=ATTENTION_COMBINE_STAGES, **mode,
        **_launch(bl))
    # with S > 1 the merge, DECODE_M rows a program; with one split (the partial kernel wrote ``out``) no programs,
    # or, writing the caches, the T new tokens, DECODE_M a program (the merge's R*T rows cover them when S > 1);
    # with MERGE the partial kernel merged and wrote when S > 1, and the caches are written here when S = 1
    if merge:
        tiles = triton.cdiv(n_tok, decode_m) * (1 - split)
    elif write_caches:
        tiles = triton.cdiv(torch.sym_max(n_rows * split, n_tok), decode_m)
    else:
        tiles = triton.cdiv(n_rows, decode_m) * split
    wrap_triton(attention_combine_kernel)[(tiles, batch * n_kv_heads)](
        o_part, lse, out, k_new, v_new, k_cache, v_cache, start, n_tok, slots, head_dim, n_kv_heads, rep, splits,
        *o_part.stride(), *lse.stride(), *out_strides, *k_new.stride(), *v_new.stride(), *k_cache.stride(),
        *v_cache.stride(), BLOCK_M=decode_m, BLOCK_D=bl.block_d, BLOCK_S=block_s, STAGES=ATTENTION_COMBINE_STAGES,
        WRITE=write_caches)
    return (out, next_lock) if merge else out


@triton_op("l4::attention_fused", mutates_args=())
def attention_fused(q: Tensor, k_new: Tensor, v_new: Tensor, k_cache: Tensor, v_cache: Tensor, start_pos: Tensor,
                    n_heads: int, n_kv_heads: int, chunk: int, scaling: float) -> Tensor:
    return fused_attention(q, k_new, v_new, k_cache, v_cache, start_pos, n_heads, n_kv_heads, chunk, scaling)


@triton_op("l4::attention_fused_inplace", mutates_args=("k_cache", "v_cache"))
def attention_fused_inplace(q: Tensor, k_new: Tensor, v_new: Tensor, k_cache: Tensor, v_cache: Tensor,
                            start_pos: Tensor, cos: Tensor, sin: Tensor, n_heads: int, n_kv_heads: int, chunk: int,
                            scaling: float, use_rope: bool, qk_norm: bool, temp_tuning: bool, floor_scale: float,
                            attn_scale: float, eps: float) -> Tensor:
    return fused_attention_inplace(q, k_new, v_new, k_cache, v_cache, start_pos, cos, sin, n_heads, n_kv_heads,
                                   chunk, scaling, use_rope, qk_norm, temp_tuning, floor_scale, attn_scale, eps)


@triton_op("l4::attention_fused_chained", mutates_args=("k_cache", "v_cache"))
def attention_fused_chained(q: Tensor, k_new: Tensor, v_new: Tensor, k_cache: Tensor, v_cache: Tensor,
                            start_pos: Tensor, cos: Tensor, sin: Tensor, n_heads: int, n_kv_heads: int, chunk: int,
                            scaling: float, use_rope: bool, qk_norm: bool, temp_tuning: bool, floor_scale: float,
                            attn_scale: float, eps: float, lock: Tensor) -> tuple[Tensor, Tensor]:
    return fused_attention_inplace(q, k_new, v_new, k_cache, v_cache, start_pos, cos, sin, n_heads, n_kv_heads,
                                   chunk, scaling, use_rope, qk_norm, temp_tuning, floor_scale, attn_scale, eps,
                                   lock=lock)


@triton_op("l4::moe_fused", mutates_args=())
def moe_fused(x: Tensor, router_w: Tensor, gate_up: Tensor, down: Tensor, shared_gate: Tensor, shared_up: Tensor,
              shared_down: Tensor, top_k: int, logits: Tensor | None = None) -> Tensor:
    return fused_moe(x, router_w, gate_up, down, shared_gate, shared_up, shared_down, top_k, logits=logits)


@triton_op("l4::moe_q_fused", mutates_args=())
def moe_q_fused(x: Tensor, router_w: Tensor, gate_up_q: Tensor, gate_up_s: Tensor, down_q: Tensor, down_s: Tensor,
                shared_gate_q: Tensor, shared_gate_s: Tensor, shared_up_q: Tensor, shared_up_s: Tensor,
                shared_down_q: Tensor, shared_down_s: Tensor, top_k: int, logits: Tensor | None = None) -> Tensor:
    return fused_moe_int4(x, router_w, gate_up_q, gate_up_s, down_q, down_s, shared_gate_q, shared_gate_s,
                          shared_up_q, shared_up_s, shared_down_q, shared_down_s, top_k, logits=logits)


@triton_op("l4::moe_fp8_fused", mutates_args=())
def moe_fp8_fused(x: Tensor, router_w: Tensor, gate_up_q: Tensor, gate_up_s: Tensor, down_q: Tensor, down_s: Tensor,
                  shared_gate_q: Tensor, shared_gate_s: Tensor, shared_up_q: Tensor, shared_up_s: Tensor,
                  shared_down_q: Tensor, shared_down_s: Tensor, top_k: int, logits: Tensor | None = None) -> Tensor:
    return fused_moe_fp8(x, router_w, gate_up_q, gate_up_s, down_q, down_s, shared_gate_q, shared_gate_s,
                         shared_up_q, shared_up_s, shared_down_q, shared_down_s, top_k, logits=logits)


@triton_op("l4::moe_fused_norm", mutates_args=())
def moe_fused_norm(x: Tensor, router_w: Tensor, gate_up: Tensor, down: Tensor, shared_gate: Tensor, shared_up: Tensor,
                   shared_down: Tensor, top_k: int, logits: Tensor, residual: Tensor, norm_w: Tensor,
                   eps: float) -> tuple[Tensor, Tensor]:
    return fused_moe(x, router_w, gate_up, down, shared_gate, shared_up, shared_down, top_k, logits=logits,
                     norm=(residual, norm_w, eps))


@triton_op("l4::moe_q_fused_norm", mutates_args=())
def moe_q_fused_norm(x: Tensor, router_w: Tensor, gate_up_q: Tensor, gate_up_s: Tensor, down_q: Tensor,
                     down_s: Tensor, shared_gate_q: Tensor, shared_gate_s: Tensor, shared_up_q: Tensor,
                     shared_up_s: Tensor, shared_down_q: Tensor, shared_down_s: Tensor, top_k: int, logits: Tensor,
                     residual: Tensor, norm_w: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    return fused_moe_int4(x, router_w, gate_up_q, gate_up_s, down_q, down_s, shared_gate_q, shared_gate_s,
                          shared_up_q, shared_up_s, shared_down_q, shared_down_s, top_k, logits=logits,
                          norm=(residual, norm_w, eps))


@triton_op("l4::moe_fp8_fused_norm", mutates_args=())
def moe_fp8_fused_norm(x: Tensor, router_w: Tensor, gate_up_q: Tensor, gate_up_s: Tensor, down_q: Tensor,
                       down_s: Tensor, shared_gate_q: Tensor, shared_gate_s: Tensor, shared_up_q: Tensor,
                       shared_up_s: Tensor, shared_down_q: Tensor, shared_down_s: Tensor, top_k: int, logits: Tensor,
                       residual: Tensor, norm_w: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    return fused_moe_fp8(x, router_w, gate_up_q, gate_up_s, down_q, down_s, shared_gate_q, shared_gate_s,
                         shared_up_q, shared_up_s, shared_down_q, shared_down_s, top_k, logits=logits,
                         norm=(residual, norm_w, eps))


def add_rms_norm_router(a: Tensor, b: Tensor, norm_w: Tensor, router_w: Tensor, eps: float
                        ) -> tuple[Tensor, Tensor, Tensor]:
    """The body of ``l4::add_rms_norm_router``: a, b [N, H], norm_w [H], router_w [E, H], all of one dtype ->
    (h = a + b, x = RMSNorm(h) * norm_w, logits = x @ router_w^T), one launch (``norm_router.py``). Steps of up to
    NORM_ROUTER_DECODE_TOKENS tokens take the kernel's row path (N x cdiv(E, NORM_ROUTER_EXPERTS) programs), longer
    ones its block path (cdiv(N, NORM_ROUTER_BLOCK_T) programs): one grid expression, guard-free in a symbolic N."""
    n_tok, hidden = a.shape
    n_exp = router_w.shape[0]
    if b.shape != a.shape or norm_w.shape != (hidden,) or router_w.shape[1] != hidden:
        raise ValueError(f"add_rms_norm_router: shapes {tuple(a.shape)}, {tuple(b.shape)}, {tuple(norm_w.shape)}, "
                         f"{tuple(router_w.shape)} are not [N, H], [N, H], [H], [E, H]")
    if not a.dtype == b.dtype == norm_w.dtype == router_w.dtype or norm_w.stride(0) != 1:
        raise ValueError("add_rms_norm_router: a, b, norm_w and router_w must share one dtype; norm_w contiguous")
    h = torch.empty((n_tok, hidden), device=a.device, dtype=a.dtype)
    x = torch.empty_like(h)
    logits = torch.empty((n_tok, n_exp), device=a.device, dtype=a.dtype)
    rowwise = torch.sym_max(0, torch.sym_min(1, NORM_ROUTER_DECODE_TOKENS + 1 - n_tok))      # 1 iff N <= DECODE_T
    grid = (n_tok * rowwise + triton.cdiv(n_tok, NORM_ROUTER_BLOCK_T) * (1 - rowwise),
            triton.cdiv(n_exp, NORM_ROUTER_EXPERTS) * rowwise + (1 - rowwise))
    wrap_triton(add_rms_norm_router_kernel)[grid](
        a, b, norm_w, router_w, h, x, logits, n_tok, n_exp, eps, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        router_w.stride(0), router_w.stride(1), h.stride(0), x.stride(0), logits.stride(0),
        H=hidden, BLOCK_H=min(NORM_ROUTER_BLOCK_H, triton.next_power_of_2(hidden)), BLOCK_E=NORM_ROUTER_EXPERTS,
        BLOCK_T=NORM_ROUTER_BLOCK_T, BLOCK_EA=max(16, triton.next_power_of_2(n_exp)),
        BLOCK_HB=NORM_ROUTER_BLOCK_HB, DECODE_T=NORM_ROUTER_DECODE_TOKENS, **_dot_mode(a.dtype))
    return h, x, logits


@triton_op("l4::add_rms_norm_router", mutates_args=())
def add_rms_norm_router_op(a: Tensor, b: Tensor, norm_w: Tensor, router_w: Tensor, eps: float
                           ) -> tuple[Tensor, Tensor, Tensor]:
    return add_rms_norm_router(a, b, norm_w, router_w, eps)


@triton_op("l4::int4_mm", mutates_args=())
def int4_mm(x: Tensor, w_packed: Tensor, w_scale: Tensor) -> Tensor:
    return int4_matmul(x, w_packed, w_scale)


@triton_op("l4::int4_mm_chained", mutates_args=())
def int4_mm_chained(x: Tensor, w_packed: Tensor, w_scale: Tensor, lock: Tensor) -> tuple[Tensor, Tensor]:
    return int4_matmul(x, w_packed, w_scale, lock=lock)


@triton_op("l4::int4_mm_rope", mutates_args=())
def int4_mm_rope(x: Tensor, w_packed: Tensor, w_scale: Tensor, start_pos: Tensor, cos: Tensor, sin: Tensor,
                 k_col0: int, k_cols: int, head_dim: int, qk_norm: bool, eps: float) -> Tensor:
    return _int4_rope(x, w_packed, w_scale, start_pos, cos, sin, k_col0, k_cols, head_dim, qk_norm, eps)


@triton_op("l4::int4_mm_rope_chained", mutates_args=())
def int4_mm_rope_chained(x: Tensor, w_packed: Tensor, w_scale: Tensor, start_pos: Tensor, cos: Tensor, sin: Tensor,
                         k_col0: int, k_cols: int, head_dim: int, qk_norm: bool, eps: float, lock: Tensor
                         ) -> tuple[Tensor, Tensor]:
    return _int4_rope(x, w_packed, w_scale, start_pos, cos, sin, k_col0, k_cols, head_dim, qk_norm, eps, lock)
