# T tokens, E experts, K top-k, A = T*K routed rows, R = A + T rows (routed + shared), G = E + 1 groups,
# BM rows per tile, NT tiles (static bound), N output features, Kin input features, Gq int4 group size
"""Pure-PyTorch layout helpers for the Triton kernels: the MoE row/tile maps and block-size choices.

The fused MoE runs every (token, expert) assignment and the shared expert as ONE grouped problem of R rows:

    rows 0 .. A-1      routed assignments sorted by expert (stable), row r reads token ``row_tok[r]`` scaled by
                       ``row_scale[r]`` = sigmoid(router top logit), group = its expert
    rows A .. A+T-1    the shared expert: token t, scale 1, group E

Rows are cut into tiles of BM rows that never straddle a group; tile i handles rows
``[tile_row0[i], min(tile_row0[i] + BM, tile_row_end[i]))`` of group ``tile_group[i]``. The number of tiles
depends on the routing, so the map has a STATIC length ``NT = floor((R + min(G, R) * (BM - 1)) / BM)`` (each group
that holds a row wastes less than one tile; see ``num_tiles``) and unused tiles carry group G (the kernels skip
them). Nothing here syncs with the host or has a data-dependent shape, so the whole map traces under torch.export
with a symbolic T and compiles into AOTI.
``moe_rows`` is the aten form (any top-k; ~14 small launches in a CUDA engine); for top-1 routing the fused MoE ops
build the same map with one kernel (``kernels/moe_route.py``), which the tests hold equal to ``moe_rows``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor


@dataclass(frozen=True)
class MoeRows:
    """The grouped problem (on x's device). ``moe_rows`` builds it from aten ops (any top-k); for top-1 the
    ``moe_route`` kernel builds the same in one launch (``kernels.ops.moe_route``)."""

    row_tok: Tensor        # [R] int32: token each row reads
    row_scale: Tensor      # [R] float32: input scale (routed: sigmoid score in x.dtype, widened; shared: 1)
    routed_row: Tensor     # [A] int64: routed row of assignment a = t*K + k (token t's k-th expert): the combine
                           # gathers y[routed_row] (no scatter: index_add has no AOTI c-shim, it would go opaque)
    tile_group: Tensor     # [NT] int32: group of the tile, G for an unused tile
    tile_row0: Tensor      # [NT] int32: first row of the tile
    tile_row_end: Tensor   # [NT] int32: end (exclusive) of the tile's group rows


# add_rms_norm_router_kernel (norm_router.py): steps of at most this many tokens take its row path, one program a
# (token, NORM_ROUTER_EXPERTS experts) over BLOCK_H-wide chunks; longer steps its block path, NORM_ROUTER_BLOCK_T
# tokens a program over NORM_ROUTER_BLOCK_HB-wide chunks with the router as one dot
NORM_ROUTER_DECODE_TOKENS = 16
NORM_ROUTER_EXPERTS = 4
NORM_ROUTER_BLOCK_H = 1024
NORM_ROUTER_BLOCK_T = 32
NORM_ROUTER_BLOCK_HB = 128


# moe_route_kernel: steps of at most this many tokens (decode) work in blocks of this many tokens and tiles
MOE_ROUTE_DECODE_TOKENS = 16
# moe_norm.py: steps of at most this many tokens combine and norm in the MoE's down launch (its token counters: this
# many int32); longer ones in a launch of their own, one program a token. 1: batch-1 decode. The kernels take any
# count, but the program that completes a tile's tokens finishes them one after another (~1.5 us each, a few L2
# round trips), so a 16-row shared tile finishing last at batch 16 would add ~24 us to the down launch, where the
# launch of their own runs them side by side; raise it once a GPU has timed both (gpu_session.sh moenorm)
MOE_NORM_DECODE_TOKENS = 1
MOE_NORM_BLOCK_H = 1024                  # columns a step of a token's row


def num_tiles(rows, groups: int, block_m: int):
    """Static bound NT on the tiles of ``rows`` rows (an int or a SymInt) in ``groups`` groups. A group of c rows
    takes ceil(c / BM) <= (c + BM - 1) / BM tiles, and at most min(G, R) groups hold a row, so the tiles number at
    most floor((R + min(G, R) * (BM - 1)) / BM). A top-1 decode step (R = 2) gets exactly its 2 tiles, not the
    ceil(R / BM) + G = 18 of the looser bound, whose 16 empty tiles each launched a row of programs that exit at once
    (2048 of gate_up's 2304 at Scout width); prefill loses nothing. Guard-free in a symbolic R."""
    return (rows + torch.sym_min(groups, rows) * (block_m - 1)) // block_m


def moe_rows(idx: Tensor, score: Tensor, n_experts: int, block_m: int) -> MoeRows:
    """idx [T, K] expert ids, score [T, K] input scales -> the grouped-row layout described above."""
    n_tok, top_k = idx.shape
    dev = idx.device
    flat_e = idx.reshape(-1)                                                     # [A]
    order = torch.argsort(flat_e, stable=True)                                  # [A]
    routed_tok = order // top_k                                                  # [A]
    routed_row = torch.zeros_like(order).scatter(0, order, torch.arange(order.shape[0], device=dev))  # [A] order^-1
    tok_ids = torch.arange(n_tok, device=dev)                                    # [T]
    row_tok = torch.cat((routed_tok, tok_ids)).to(torch.int32)                  # [R]
    row_scale = torch.cat((score.reshape(-1).index_select(0, order).float(),
                           torch.ones(n_tok, device=dev, dtype=torch.float32)))  # [R]
    groups = n_experts + 1
    row_group = torch.cat((flat_e.long(), torch.full_like(tok_ids, n_experts)))  # [R]; functional (no in-place):
    counts = torch.zeros(groups, device=dev, dtype=torch.int64).scatter_add(     # it runs inside triton_op bodies
        0, row_group, torch.ones_like(row_group))                               # [G] rows per group
    group_end = torch.cumsum(counts, 0)                                         # [G]
    tiles = (counts + block_m - 1) // block_m                                   # [G]
    tile_end = torch.cumsum(tiles, 0)                                           # [G]
    n_tiles = num_tiles(n_tok * (top_k + 1), groups, block_m)
    t = torch.arange(n_tiles, device=dev)                                       # [NT]
    tile_group = torch.searchsorted(tile_end, t, right=True)                    # [NT] in [0, G]
    g = tile_group.clamp(max=groups - 1)
    first_tile = tile_end.index_select(0, g) - tiles.index_select(0, g)         # [NT]
    group_start = group_end.index_select(0, g) - counts.index_select(0, g)
    tile_row0 = group_start + (t - first_tile) * block_m                        # [NT]
    return MoeRows(row_tok, row_scale, routed_row, tile_group.to(torch.int32), tile_row0.to(torch.int32),
                   group_end.index_select(0, g).to(torch.int32))


# ---- block sizes (static: chosen from weight shapes only, never from the token count, which is symbolic) -----

def _pow2_floor(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def _pow2_ceil(n: int) -> int:
    return 1 << (max(1, n) - 1).bit_length()


def moe_blocks(hidden: int, inter: int) -> tuple[int, int, int]:
    """(BM, BN, BK) for the grouped MoE GEMMs. BM = 64 rows: even at decode (1 row per tile) a 64-row tile
    keeps the GEMM memory-bound on H100 (64 FLOP/byte in bf16, ridge ~295), so one shape serves both
    prefill and decode; BN/BK shrink for tiny test dimensions (tl.dot needs every block >= 16)."""
    return 64, max(16, min(64, _pow2_ceil(min(hidden, inter)))), max(16, min(64, _pow2_ceil(hidden)))


@dataclass(frozen=True)
class Int4Blocks:
    block_m: int
    block_n: int
    block_k: int
    scale_per_block: bool   # True: a K block lies inside one scale group (one scale per row per block)
    split_k: int = 1        # the most programs per output tile, each reducing a K slice (``split_k_plan``)
    bf16x2: bool = False    # the inline-PTX unpack (int4_mm.int4_pairs_bf16; bf16 on sm_90): a sweep candidate
    num_stages: int | None = None   # the K loop's software-pipeline depth (Triton's launch option; None: its
                                    # default, 3: with a K step of two blocks, 4 blocks in flight): a sweep
                                    # candidate, and 2 in the prefill blocks (what lets their tiles fit)
    num_warps: int | None = None    # warps a program (Triton's launch option; None: its default, 4): a sweep
                                    # candidate. A decode step keeps few programs an SM (the MoE's gate_up: 2, by
                                    # shared memory), so its unpack work has 8 warps an SM to hide latency with
    fma_unpack: bool = True         # word loads and one FFMA a weight where ``fma_unpack`` allows (False: the byte
                                    # unpack, ``int4_mm.int4_tile``: a sweep row that compares the two)


def int4_blocks(n_out: int, k_in: int, group: int) -> Int4Blocks:
    """Blocks for ``int4_mm`` with K inputs in groups of ``group`` (any even divisor of K, as
    ``l4compile.quant.group_for`` makes it). BK is the largest power of two <= 128 dividing the group when that
    is >= 16 (then each K block sits in one group); otherwise (groups like 6 or 8) BK = 32 and scales are
    gathered per element. BM = 16: the decode GEMV/small-batch GEMM this kernel is for."""
    if k_in % 2 or group % 2 or k_in % group:
        raise ValueError(f"int4_mm: K={k_in} must be even and a multiple of the (even) group {group}")
    bk = min(128, group & -group)                   # largest power of two dividing the group
    per_block = bk >= 16
    if not per_block:
        bk = 32
    bn = max(16, min(64, _pow2_floor(n_out)))
    return Int4Blocks(16, bn, bk, per_block)


# Int4 GEMM steps of more rows than this (``int4_matmul``: M; ``fused_moe_int4``: T tokens) run the prefill blocks
# below, shorter ones the decode blocks. An engine's step holds both launches, the other's grid empty (a guard-free
# expression of its symbolic T). Above it the tall tiles fill an H100 (q_proj at BM 128: 2 x 40 programs at 256 rows)
INT4_PREFILL_ROWS = 256


def _prefill_applies(k_in: int, group: int, x_dtype: torch.dtype, scale_dtype: torch.dtype) -> bool:
    """Whether an Int4 GEMM over ``k_in`` inputs in groups of ``group`` has prefill blocks: bf16 activations and
    scales (the FMA unpack's, ``fma_unpack``; fp16 and float32 engines keep their decode blocks, not compiled for
    sm_90a at these tiles) and whole 128-input K blocks inside one group."""
    return x_dtype == scale_dtype == torch.bfloat16 and group % 128 == 0 and k_in % 128 == 0


def int4_prefill_blocks(n_out: int, k_in: int, group: int, x_dtype: torch.dtype,
                        scale_dtype: torch.dtype) -> Int4Blocks | None:
    """``int4_mm``'s blocks at a step of more than ``INT4_PREFILL_ROWS`` rows, or None where the decode blocks serve
    every step. BM 16 (``int4_blocks``) unpacks each weight once per 16 rows: at Scout's q_proj the K loop issues
    ~5.2 instructions a weight a 16-row tile, against ~0.25 of its MMAs, so a prefill is bound by the unpack
    (~190 TFLOP/s by issue rate). BM 128 x BN 128 (8 warps, 2 stages) unpacks once per 128 rows, ~0.9 instructions a
    weight per 16 rows, and its dots become wgmma m64n128k16 (``benchmarks/kernels_sm90.py --ops``: 215 registers,
    no spill, 84.5 KiB of shared memory). Unsplit: a prefill's output tiles fill the GPU."""
    if not _prefill_applies(k_in, group, x_dtype, scale_dtype) or n_out < 128:
        return None
    return Int4Blocks(128, 128, 128, True, num_stages=2, num_warps=8)


def moe_int4_prefill_blocks(hidden: int, inter: int, group_h: int, group_i: int, x_dtype: torch.dtype,
                            scale_dtype: torch.dtype) -> tuple[Int4Blocks, Int4Blocks] | None:
    """The fused Int4 MoE's (gate_up, down) blocks at a step of more than ``INT4_PREFILL_ROWS`` tokens (its own tile
    map at their BM), or None where the decode blocks serve every step. BM 64 x BN 64 (4 warps, 2 stages): gate_up
    issues ~1.6 instructions a weight per 16 rows against ~4.8 at BM 16, down ~1.8 against ~5.2, on wgmma
    m64n64k16, 2 programs an SM, no spill (<= 234 / 171 registers, 97 / 80.5 KiB). BM 128 (8 warps) would unpack less
    (~1.1 / 1.3) but holds one program an SM, and its 3-stage or BN 128 forms overflow shared memory or spill."""
    if not (_prefill_applies(hidden, group_h, x_dtype, scale_dtype)
            and _prefill_applies(inter, group_i, x_dtype, scale_dtype)):
        return None
    b = Int4Blocks(64, 64, 128, True, num_stages=2, num_warps=4)
    return b, b


def rope_int4_blocks(b: Int4Blocks, n_out: int, head_dim: int, k_col0: int, k_cols: int) -> Int4Blocks | None:
    """The blocks of a qkv GEMM whose epilogue transforms its keys (``l4::int4_mm_rope``, ``k_rope.py``), from the
    blocks ``b`` it would launch with: a k tile must hold whole heads, so BN becomes the largest power-of-two
    multiple of ``head_dim`` up to max(BN, head_dim) that divides the keys' first column ``k_col0`` and their width
    ``k_cols`` (Scout: BN 64 -> 128, one head a tile). Where BN grows, ``split_k`` grows by as much (``split_k_plan``
    then keeps the slices that hold K blocks), so that a decode step keeps its programs (Scout's qkv: 112
    tiles of 64 -> 56 tiles of 128, 2 splits each); the bf16x2 unpack stays only where BN still divides the
    ``n_out`` outputs. None where no BN fits (a head_dim that is not a power of two >= 16)."""
    if head_dim < 16 or head_dim & (head_dim - 1):
        return None
    bn = max(b.block_n, head_dim)
    bn = 1 << (bn.bit_length() - 1)                        # a power of two >= head_dim
    while bn > head_dim and (k_col0 % bn or k_cols % bn):
        bn //= 2
    if k_col0 % bn or k_cols % bn:
        return None
    split = b.split_k * bn // b.block_n if bn > b.block_n else b.split_k
    return replace(b, block_n=bn, split_k=split, bf16x2=b.bf16x2 and n_out % bn == 0)


# float32 partials a split-K GEMM may hold ([S, rows, cols]): they stay in L2 (50 MB on H100) and cost a small
# fraction of the weight bytes at decode; a prefill that would need more runs unsplit.
SPLIT_K_PARTIAL_BYTES = 16 << 20
# tile counters in a chained Int4 GEMM's block (l4::int4_mm_chained): a GEMM with more output tiles runs unsplit.
# Scout at decode: qkv 112, o_proj 80, an Int4 lm_head 3157 tiles
SPLIT_K_LOCK_WORDS = 4096


def split_k_plan(rows, n_out: int, k_in: int, block_k: int, split_k: int, tiles=None, max_tiles: int | None = None):
    """(S, K_SPLIT) for a GEMM of ``rows`` (int or SymInt) x ``n_out`` outputs over ``k_in`` inputs in K blocks of
    ``block_k`` (the kernel's K step: BK, or 2G where it loads scales as words, ``scale_words``): S <= ``split_k``
    programs per output tile (and at most one per K block), each reducing K_SPLIT inputs (whole K blocks, so scale
    groups stay aligned), and as many as the float32 partials [S, rows, n_out] allow within
    ``SPLIT_K_PARTIAL_BYTES``. Guard-free in a symbolic ``rows``: S = Max(1, Min(split_k, bytes // rows ..)) has a
    known range [1, split_k], so sizes built from it need no guard (S recomputed from K_SPLIT would divide by a
    symbol, and export then guards on T). ``split_k`` itself is first lowered to the fewest slices of the same
    length (8 blocks asked in 6 splits: 4 slices of 2, not 6 with two empty; Scout's 20 steps of 2G = 256 inputs
    at S = 8: 7 slices of 3 or 2, at 16: 10 of 2), so a decode split has no empty program; where the partials'
    bytes lower S further (a long prefill), trailing splits can still be empty and add zeros. One engine so splits
    a decode step and not an 8K-token prefill. ``max_tiles``: the counters there are (a chained GEMM's block):
    S = 1 where the ``tiles`` output tiles (int or SymInt) outnumber them."""
    k_blocks = (k_in + block_k - 1) // block_k
    if split_k <= 1 or k_blocks <= 1:
        return 1, k_blocks * block_k
    per = -(-k_blocks // split_k)                   # K blocks a slice at split_k (1 where split_k >= K blocks)
    cap = -(-k_blocks // per)                       # the fewest slices of that length: none empty
    if max_tiles is not None:                       # 0 where the tiles outnumber the counters, else cap
        cap = torch.sym_min(1, max_tiles // torch.sym_max(1, tiles)) * cap
    splits = torch.sym_max(1, torch.sym_min(cap, SPLIT_K_PARTIAL_BYTES // (4 * n_out * torch.sym_max(1, rows))))
    return splits, (k_blocks + splits - 1) // splits * block_k


def scale_words(*scales: Tensor) -> bool:
    """Whether the Int4 kernels may load these group scales [.., N, K/G] as aligned 32-bit words, a pair of groups
    each (``int4_mm.scale_pair``; their K loop then steps 2G inputs): 16-bit, an even number of groups, contiguous
    along groups, every other stride and the storage offset even (the storage itself is at least 4-byte aligned, as
    every PyTorch CUDA allocation and AOTInductor constant is). Why: Triton's software pipeliner stages (cp.async,
    iterations ahead) only loads of >= 32 bits a thread; a 16-bit scale load stays a synchronous load in the K loop
    and every iteration waits out a whole HBM round trip (``benchmarks/kernels_sm90.py``: ``loop_loads``)."""
    return all(s.element_size() == 2 and s.shape[-1] % 2 == 0 and s.stride(-1) == 1 and s.storage_offset() % 2 == 0
               and all(st % 2 == 0 for st in s.stride()[:-1]) for s in scales)


def fma_unpack(b: Int4Blocks, packed: tuple[Tensor, ...], scales: tuple[Tensor, ...]) -> bool:
    """Whether a float-path Int4 GEMM with blocks ``b`` dequantizes these packed weights [.., N, K/2] uint8 (scales
    [.., N, K/G]) through ``int4_mm.int4_fma_dot`` (32-bit word loads, one FFMA a weight): ``b.fma_unpack``, not
    the bf16x2 unpack, one scale a K block (``scale_per_block``; K blocks then never overhang K), BK >= 128 (a
    power of two: each of its 8 dots takes BK/8 >= 16 inputs, ``tl.dot``'s least), bf16 scales (what keeps every
    step of the unpack exact, fused or not: the CPU interpreter's ``tl.fma`` is a product and a sum) and rows of
    whole aligned words: bytes contiguous along K, every other stride and the storage offset a multiple of 4 (the
    storage itself is at least 4-byte aligned, as in ``scale_words``)."""
    return (b.fma_unpack and not b.bf16x2 and b.scale_per_block and b.block_k >= 128
            and b.block_k & (b.block_k - 1) == 0
            and all(s.dtype == torch.bfloat16 for s in scales)
            and all(w.dtype == torch.uint8 and w.stride(-1) == 1 and w.storage_offset() % 4 == 0
                    and all(st % 4 == 0 for st in w.stride()[:-1]) for w in packed))


def moe_int4_blocks(hidden: int, inter: int, group_h: int, group_i: int) -> tuple[Int4Blocks, Int4Blocks]:
    """(gate_up, down) blocks for the fused Int4 MoE (``moe_int4_gate_up`` reduces over H in groups of
    ``group_h``, ``moe_int4_down`` over I in groups of ``group_i``): ``int4_blocks`` of each GEMM.

    BM = 16 (the ``tl.dot`` minimum), not ``moe_blocks``' 64: at decode a tile holds ~1 row, so every MMA row
    past the first is padding, and Int4 streams only half a byte per weight. A BM-row tile issues 2*BM FLOP per
    weight = 4*BM FLOP per weight byte: 256 at BM = 64, close to the H100 bf16 ridge (~295 FLOP/B), so padding
    MMAs plus the per-weight unpack would cost as much as the weight stream; 64 at BM = 16 keeps decode clearly
    bound by weight bytes. Prefill re-reads an expert's weight block once per 16-row tile, mostly from L2 (the
    tiles of one group are adjacent on grid axis 0)."""
    return int4_blocks(inter, hidden, group_h), int4_blocks(hidden, inter, group_i)     # both BM = 16


def moe_fp8_blocks(hidden: int, inter: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(gate_up, down) (BM, BN, BK) for the fused FP8 MoE, which reduces over H, then over I. BM = 16 for the reason
    ``moe_int4_blocks`` gives (a decode tile holds ~1 row; at 1 byte a weight, 16 rows are 32 FLOP per weight byte,
    well inside the memory-bound regime); BK up to 128 (FP8 MMAs take K in steps of 32, so BK >= 32); BN up to 64
    (Scout decode: 128 gate_up and 80 down programs per tile)."""
    def one(n_out: int, k_in: int) -> tuple[int, int, int]:
        return 16, max(16, min(64, _pow2_floor(n_out))), max(32, min(128, _pow2_floor(k_in)))
    return one(inter, hidden), one(hidden, inter)

# ---- attention (kernels/attention.py): blocks from head_dim, splits from the (symbolic) row count --------------

@dataclass(frozen=True)
class AttentionBlocks:
    block_m: int   # query rows (R heads x T tokens folded) per program
    block_n: int   # keys per inner step
    block_d: int   # head_dim, padded to a power of two >= 16
    num_warps: int | None = None   # Triton's launch option; None: its default (4). A prefill candidate: BM 128 on
    #                                8 warps (two wgmma warpgroups, 233 registers, 128 KiB, no spill on sm_90a)


ATTENTION_MAX_HEAD_DIM = 256


# A step whose R*T rows per (batch, kv head) fit this many runs them as one tile of this height, whatever BM: at
# decode (5 rows for Scout) BM 16 took 4-26% less time than BM 64 in every row of the 2026-12-04 H200 run.
ATTENTION_DECODE_BLOCK_M = 16
# Rows the split merge keeps loading ahead (its loop's num_stages - 1 in flight), each row's [32 splits, D] partials at
# once: 51 KB of shared memory at D 128 in the combine kernel (56 registers, no spill, Triton 3.7, sm_90a); in the
# chained partial kernel the merge fits the 112 KiB its main loop has
ATTENTION_COMBINE_STAGES = 4


def attention_blocks(head_dim: int) -> AttentionBlocks:
    """BM = BN = 64 for every T (T is symbolic): prefill wants tall tiles. A decode step, whose rows fit
    ``ATTENTION_DECODE_BLOCK_M``, runs them as one tile of that height instead (the kernel branches on R*T), so the
    padded rows cost it neither MMA nor softmax work."""
    if head_dim > ATTENTION_MAX_HEAD_DIM:
        raise ValueError(f"attention kernel: head_dim {head_dim} > {ATTENTION_MAX_HEAD_DIM} is not supported")
    return AttentionBlocks(64, 64, max(16, _pow2_ceil(head_dim)))


# Programs a step should launch to keep an H100 (132 SMs) busy, and the most splits of one key range.
ATTENTION_TARGET_PROGRAMS = 264
ATTENTION_MAX_SPLITS = 32
# A chained attention launch (l4::attention_fused_chained) counts on (row blocks + 1) x B*Hkv words of its block when
# S > 1; S > 1 only where row blocks x B*Hkv <= TARGET // 2, so TARGET words always suffice.
assert ATTENTION_TARGET_PROGRAMS <= SPLIT_K_LOCK_WORDS


def attention_splits(row_blocks, batch: int, kv_heads: int, slots: int, block_n: int):
    """Key-range splits S for ``attention_partial_kernel``: enough (batch, kv head, row block, split) programs to
    fill the GPU, at most one per BN keys of the L cache slots and at most ``ATTENTION_MAX_SPLITS``. ``row_blocks``
    may be a SymInt (T symbolic); the result is then a guard-free Min/Max expression. Prefill (many row blocks)
    gets S = 1, a decode step at batch 1 gets up to 32."""
    cap = max(1, min(ATTENTION_MAX_SPLITS, slots // block_n))
    return torch.sym_max(1, torch.sym_min(cap, ATTENTION_TARGET_PROGRAMS // (row_blocks * batch * kv_heads)))
