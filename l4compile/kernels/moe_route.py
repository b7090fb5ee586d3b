# T tokens, E experts, G = E + 1 groups (the shared expert is group E), R = 2T rows, NT tiles, BM rows per tile,
# BT tokens / BNT tiles per step, BG >= G
"""Triton kernel: top-1 routing and the whole grouped-row map of the fused MoE in ONE launch.

``layout.moe_rows`` builds the map from aten ops: an argsort, a scatter-add histogram, cumsums, a searchsorted and
gathers, which a CUDA engine runs as ~14 small launches per MoE layer (~700 a Scout decode step). This kernel makes
the same map for top-1 routing (Llama 4's) from the router logits, in one program:

    pass 1   e[t] = argmax_e logits[t, e] (the first of equal maxima); counts[g] per group (group E: all T tokens)
             -> group_start / group_end (exclusive / inclusive cumsum), tiles per group, tile_end (cumsum)
    pass 2   token t's routed row: group_start[e] + its rank among the tokens of expert e (stable, by t);
             row_tok / row_scale / routed_row; rows T.. are the shared rows (token t, scale 1)
    tiles    tile i: group = #{g : tile_end[g] <= i} (searchsorted, right; G = unused), first row and group end

Scores are ``sigmoid(max logit)`` in float32, rounded to the logits' dtype and widened (as ``_route`` then
``moe_rows`` make them). Token blocks are [BT, BG] one-hot matrices (BT * BG <= 8192), so 8K-token prefill takes
a few dozen steps; the map itself is a few KB. Outputs and their layout are ``layout.MoeRows``'.

Shapes: logits [T, E]; row_tok [R] int32, row_scale [R] float32, routed_row [T] int64; tile_group, tile_row0,
tile_row_end [NT] int32; zero_a [N_ZERO_A], zero_b [N_ZERO_B] int32. Grid: (1,). Steps of <= DECODE_T
tokens use DECODE_T-wide blocks.
"""
import triton
import triton.language as tl


@triton.jit
def _argmax_block(logits_ptr, stride_t, stride_e, t0, T, E, BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr):
    """-> (tokens [BT], token mask, expert [BT] int32, max logit [BT] float32) of tokens t0 .. t0 + BT."""
    tt = t0 + tl.arange(0, BLOCK_T)
    tmask = tt < T
    gg = tl.arange(0, BLOCK_G)
    lg = tl.load(logits_ptr + tt[:, None] * stride_t + gg[None, :] * stride_e,
                 mask=tmask[:, None] & (gg < E)[None, :], other=float("-inf")).to(tl.float32)
    val = tl.max(lg, axis=1)
    e = tl.min(tl.where(lg == val[:, None], gg[None, :], BLOCK_G), axis=1)     # first maximum
    e = tl.minimum(e, E - 1)                     # a NaN row (no maximum) still lands in one group: the map holds
    return tt, tmask, e, val


@triton.jit
def _score(val, logits_ptr):
    """The input scale of a routed row from its max logit: sigmoid in float32, rounded to the logits' dtype (as
    ``_route`` then ``moe_rows`` make it), widened."""
    return (1.0 / (1.0 + tl.exp(-val))).to(logits_ptr.dtype.element_ty).to(tl.float32)


@triton.jit
def _pick(vals, g, BLOCK_G: tl.constexpr):
    """vals [BG] at indices g [N] -> [N] (a one-hot gather: registers cannot be indexed)."""
    gg = tl.arange(0, BLOCK_G)
    return tl.sum(tl.where(g[:, None] == gg[None, :], vals[None, :], 0), axis=1)


@triton.jit
def _zero(ptr, n, BLOCK: tl.constexpr):
    """ptr[0 .. n) = 0 (int32)."""
    for i0 in range(0, n, BLOCK):
        ii = i0 + tl.arange(0, BLOCK)
        tl.store(ptr + ii, tl.zeros((BLOCK,), dtype=tl.int32), mask=ii < n)


@triton.jit
def moe_route_kernel(logits_ptr, row_tok_ptr, row_scale_ptr, routed_row_ptr, tile_group_ptr, tile_row0_ptr,
                     tile_row_end_ptr, zero_a_ptr, zero_b_ptr, T, E, NT, N_ZERO_A, N_ZERO_B, stride_t, stride_e,
                     BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_NT: tl.constexpr,
                     DECODE_T: tl.constexpr):
    """The map in one program. A step of at most DECODE_T tokens (decode) runs the passes on DECODE_T-token blocks
    and DECODE_T-tile steps: Scout's BT = BNT = 256 would make a 1-token step work through [256, 32] one-hot tiles
    (an axis-0 cumsum among them) for 1 token and 2 tiles. T is symbolic in an engine, hence a branch on it.
    It also zeroes the N_ZERO_A and N_ZERO_B int32s at zero_a / zero_b: the split-K tile counters of the MoE GEMMs
    launched after it, which would otherwise each take a fill kernel of their own (0 and 0 when unsplit)."""
    _zero(zero_a_ptr, N_ZERO_A, 256)
    _zero(zero_b_ptr, N_ZERO_B, 256)
    if T <= DECODE_T:
        _route(logits_ptr, row_tok_ptr, row_scale_ptr, routed_row_ptr, tile_group_ptr, tile_row0_ptr,
               tile_row_end_ptr, T, E, NT, stride_t, stride_e, BLOCK_M, DECODE_T, BLOCK_G, DECODE_T)
    else:
        _route(logits_ptr, row_tok_ptr, row_scale_ptr, routed_row_ptr, tile_group_ptr, tile_row0_ptr,
               tile_row_end_ptr, T, E, NT, stride_t, stride_e, BLOCK_M, BLOCK_T, BLOCK_G, BLOCK_NT)


@triton.jit
def _route(logits_ptr, row_tok_ptr, row_scale_ptr, routed_row_ptr, tile_group_ptr, tile_row0_ptr,
           tile_row_end_ptr, T, E, NT, stride_t, stride_e,
           BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_NT: tl.constexpr):
    """``moe_route_kernel``'s passes with BT-token blocks and BNT-tile steps."""
    gg = tl.arange(0, BLOCK_G)
    G = E + 1
    counts = tl.zeros((BLOCK_G,), dtype=tl.int32)
    for t0 in range(0, T, BLOCK_T):
        tt, tmask, e, val = _argmax_block(logits_ptr, stride_t, stride_e, t0, T, E, BLOCK_T, BLOCK_G)
        counts += tl.sum(((e[:, None] == gg[None, :]) & tmask[:, None]).to(tl.int32), axis=0)
    counts = tl.where(gg == E, T, counts)                                        # the shared group: every token
    group_end = tl.cumsum(counts, axis=0)
    group_start = group_end - counts
    tiles = (counts + BLOCK_M - 1) // BLOCK_M
    tile_end = tl.cumsum(tiles, axis=0)
    first_tile = tile_end - tiles

    running = tl.zeros((BLOCK_G,), dtype=tl.int32)                               # rows placed so far per group
    for t0 in range(0, T, BLOCK_T):
        tt, tmask, e, val = _argmax_block(logits_ptr, stride_t, stride_e, t0, T, E, BLOCK_T, BLOCK_G)
        hit = ((e[:, None] == gg[None, :]) & tmask[:, None]).to(tl.int32)       # [BT, BG]
        rank = tl.cumsum(hit, axis=0) - 1                                        # stable rank inside the block
        pos = tl.sum(hit * (group_start + running)[None, :] + hit * rank, axis=1)   # [BT] routed row
        running += tl.sum(hit, axis=0)
        score = _score(val, logits_ptr)
        tl.store(row_tok_ptr + pos, tt.to(tl.int32), mask=tmask)
        tl.store(row_scale_ptr + pos, score, mask=tmask)
        tl.store(routed_row_ptr + tt, pos.to(tl.int64), mask=tmask)
        tl.store(row_tok_ptr + T + tt, tt.to(tl.int32), mask=tmask)             # shared rows
        tl.store(row_scale_ptr + T + tt, tl.full((BLOCK_T,), 1.0, tl.float32), mask=tmask)

    gmask = gg < G
    for i0 in range(0, NT, BLOCK_NT):
        ii = i0 + tl.arange(0, BLOCK_NT)
        imask = ii < NT
        group = tl.sum(((tile_end[None, :] <= ii[:, None]) & gmask[None, :]).to(tl.int32), axis=1)   # [0, G]
        gc = tl.minimum(group, G - 1)
        row0 = _pick(group_start, gc, BLOCK_G) + (ii - _pick(first_tile, gc, BLOCK_G)) * BLOCK_M
        tl.store(tile_group_ptr + ii, group, mask=imask)
        tl.store(tile_row0_ptr + ii, row0, mask=imask)
        tl.store(tile_row_end_ptr + ii, _pick(group_end, gc, BLOCK_G), mask=imask)


@triton.jit
def tile_span(tile, tile_group_ptr, tile_row0_ptr, tile_row_end_ptr, logits_ptr, T, E, stride_le,
              IN_KERNEL: tl.constexpr, BLOCK_G: tl.constexpr):
    """Tile ``tile`` of the grouped-row map, for a grouped GEMM program -> scalars (group, first row, end row,
    mapped, score): its rows are first row + arange(BM) below the end row; group E + 1 is an unused tile.

    From the map's arrays (``moe_route_kernel``'s), unless ``IN_KERNEL`` and the step has one token (mapped = 1):
    then from its router logits [1, E] (``stride_le``), as the route kernel maps a 1-token step: tile 0 is row 0 of
    the expert with the largest logit (the first of equal maxima; the last expert for a NaN row), whose input scale
    ``score`` is sigmoid(max logit) in the logits' dtype; tile 1 is row 1, the shared expert's (score 1). A batch-1
    decode step then needs no route launch (``ops.fused_moe_int4`` gives it an empty grid), whose one program's
    latency was on the path of every MoE layer. Only T = 1: the general map's passes (a cumsum over a block of
    tokens) cost the Int4 gate_up 8 bytes of stack under Triton 3.7.1 (sm_90a, T a run-time argument as in an
    engine), for one launch at batch 2-16. Scalars only: a vector that took either branch's layout would send the
    gate_up's scaled x through shared memory on its way to the tensor cores (``tile_tokens``)."""
    if IN_KERNEL and T == 1:
        _, _, e, val = _argmax_block(logits_ptr, 0, stride_le, 0, 1, E, 1, BLOCK_G)   # [1] each: token 0
        grp = tl.where(tile == 0, tl.sum(e, axis=0), tl.where(tile == 1, E, E + 1))
        row0 = tl.minimum(tile, 2)
        row_end = tl.minimum(tile + 1, 2)
        mapped = 1
        score = tl.where(tile == 0, tl.sum(_score(val, logits_ptr), axis=0), 1.0)
    else:
        grp = tl.load(tile_group_ptr + tile)
        row0 = tl.load(tile_row0_ptr + tile)
        row_end = tl.load(tile_row_end_ptr + tile)
        mapped = 0
        score = 0.0
    return grp, row0, row_end, mapped, score


@triton.jit
def tile_tokens(row_tok_ptr, row_scale_ptr, routed_row_ptr, rows, rmask, mapped, score):
    """Token and input scale [BM] of a tile's rows ``rows`` (valid where ``rmask``), from ``tile_span``: the map's
    arrays, or a mapped 1-token step's (token 0, ``score`` on the tile's one row), as the fallback values of the same
    masked loads, so both take the layout the dot needs. Program (0, 0, 0) of a mapped step writes ``routed_row``
    [1] = 0 (the combine's gather), as the route kernel would have."""
    load = rmask & (mapped == 0)
    tok = tl.load(row_tok_ptr + rows, mask=load, other=0)
    scale = tl.load(row_scale_ptr + rows, mask=load, other=tl.where(rmask & (mapped != 0), score, 0.0))
    if (mapped != 0) & (tl.program_id(0) == 0) & (tl.program_id(1) == 0) & (tl.program_id(2) == 0):
        tl.store(routed_row_ptr, tl.zeros((), dtype=tl.int64))
    return tok, scale
