"""The Triton kernels of issue 10 at Scout dimensions on one GPU: correctness against torch on dequantized weights,
then time per block configuration as a fraction of the HBM copy bandwidth measured in the same run.

    python benchmarks/bench_kernels.py [--tokens 1,8,32] [--prefill 2048,8192] [--quick] [--out FILE.json]
    python benchmarks/bench_kernels.py --tiny ...      # CI-sized dimensions (runs under TRITON_INTERPRET=1 on a CPU)

Kernels (bf16 activations; Int4 weights packed as the quantize pass packs them, group 128, bf16 scales):

    int4_mm       x [T, H] @ W^T for the attention projections: q/o [5120, 5120], k/v [1024, 5120]; a split-K
                  row (SK) as a CUDA engine's step runs it, l4::int4_mm_chained: counters handed over zeroed,
                  no memset launch of their own, the next GEMM's block zeroed by the same launch; a "bytes" row
                  with the byte unpack the default FFMA unpack replaced (``Int4Blocks.fma_unpack``)
    moe_q_fused   the Scout MoE block: 16 experts of width 8192, top-1, plus the shared expert (rows as int4_mm's),
                  given its router logits as a CUDA engine's step gives them (add_rms_norm_router makes them): no
                  router matmul in the time (the 2026-12-04 rows had one); the same for the FP8 and bf16 MoEs
    moe_fp8_fused the same MoE on FP8 weights (per-channel scales; activations quantized per row in-kernel)
    moe_fused     the same MoE in bf16
    moe_q_fused + add + norm  the Int4 MoE with what follows it in a CUDA engine's step: the combine of each token's
                  rows, the residual add and the next layer's input RMSNorm, as l4::moe_q_fused_norm (as engines run
                  it: in the MoE's down launch at one token, a launch of its own past that) and as the MoE then one
                  Inductor kernel (as they did)
    int4_mm qkv + q/k rope  a RoPE layer's fused qkv (56 heads x 128) at a decode step, its queries and keys
                  RoPE-rotated and RMS-normed: as l4::int4_mm_rope runs it (in the GEMM's epilogue, tiles of one
                  head: BN 128, split 2, chained as engines run it) and as the GEMM at its own blocks then one
                  Inductor kernel
    torch.mm      cuBLAS on the bf16 weight, the baseline the Int4 GEMV must beat (it streams 4x the bytes)
    prefill       ``--prefill T,..``: q_proj and the Int4 MoE at T tokens in TFLOP/s, with the decode blocks (BM 16:
                  each weight unpacked once per 16 rows) against the prefill blocks steps of more than
                  ``layout.INT4_PREFILL_ROWS`` rows launch (``int4_prefill_blocks``: BM 128; the MoE's
                  ``moe_int4_prefill_blocks``: BM 64), other tall tiles, and bf16 (cuBLAS; ``moe_fused``, BM 64);
                  and a global layer's causal attention over the T tokens (40/8 heads x 128), at its blocks and at
                  BM 128 on 8 warps, against torch's SDPA (FlashAttention on a GPU, K/V expanded per query head)
    attention_fused  one decode step of a global layer's attention (40/8 heads x 128) in an 8192-slot bf16 cache,
                  at positions 511 and 8191, batch = tokens: it must read only the visible keys (timed as engines
                  run it, l4::attention_fused_chained: the new key and value written into the caches too, the key
                  splits merged in the same launch); "+ combine launch" is l4::attention_fused_inplace, which
                  merges in a second launch, as engines did before
    sdpa aten     the reference it replaces (cat of cache and new key, SDPA under a mask over every slot)
    add_rms_norm_router  a MoE layer's residual add, post-attention RMSNorm and router (16 experts) in one launch, as
                  CUDA engines run it; "norm + router" is what they ran before: the add and norm as one Inductor
                  kernel (torch.compile of the reference; aten on a CPU), then the router's cuBLAS matmul

Bytes a call must move: every weight byte it reads (packed Int4 + scales, or bf16; for the MoE only the experts the
routing touches, plus the shared expert; its router logits come given) and the activations in and out. Time: device
time per call replayed from a CUDA graph, L2 flushed before every call (``graph_timer``; eager ``do_bench``, marked
"(eager)", where a call cannot be captured). Timed eagerly, every small kernel here cost 100-200 us on an H200 whatever its block
configuration: the Python launch path, not the kernel (2026-12-04). The ceiling is a 1 GiB device-to-device
copy timed eagerly (bytes read + written; see ``copy_bandwidth``), so "of copy" is the achieved fraction of the
bandwidth this GPU reaches at all. Every configuration is checked (max |out - ref| / max |ref|) before it is timed; one that is
wrong is reported and not timed. The block configuration the code chooses today (``kernels.layout``) is marked *.
"""
# T tokens, H hidden, I expert width, E experts, N output features
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from l4compile.ops.attention import _rms  # noqa: E402  (the weightless RMS norm the reference ops use)

SCOUT = {"H": 5120, "I": 8192, "E": 16, "heads": 40, "kv_heads": 8, "head_dim": 128}
TINY = {"H": 64, "I": 96, "E": 4, "heads": 4, "kv_heads": 2, "head_dim": 16}
GROUP = 128
BF16_TOL = 3e-2            # bf16 operands: rounding differs between tensor-core and cuBLAS accumulation orders


def timer(device: torch.device, repeats: int = 3, graph: bool = True):
    """fn -> median milliseconds (``l4compile.kernels.timing``). On a GPU: device time of ``fn`` replayed from a CUDA
    graph, as engines run it (their kernels are launched from C++ or from a captured decode step, so the Python
    wrappers' launch cost, which eager timing adds to every small kernel, is left out), L2 flushed before every
    call; a function that cannot be captured, or ``graph=False``, is timed eagerly. Wall clock over ``repeats``
    runs elsewhere."""
    from l4compile.kernels.timing import eager_ms, graph_timer, wall_timer

    if device.type == "cuda":
        return graph_timer() if graph else eager_ms
    return wall_timer(repeats)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30))


def nbytes(*ts: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def copy_bandwidth(device: torch.device, time_ms, size: int) -> float:
    """Bytes/s of a device-to-device copy of ``size`` bytes (read + write counted), timed by ``time_ms``: on a GPU an
    eager timer (1 GiB makes the launch negligible), since captured in a CUDA graph the copy becomes a memcpy node
    that moved 2761 GB/s on an H200 where the eager copy moved 4222 (2026-12-04), which is not the ceiling."""
    src = torch.empty(size, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    return 2 * size / (time_ms(lambda: dst.copy_(src)) / 1e3)


def int4_cases(dims: dict, tokens: list[int], device, g: torch.Generator):
    """(name, T, x, w_packed, w_scale, w_bf16): the attention projections of one layer."""
    from l4compile.ops.quant import dequant_int4
    from l4compile.quant import quantize_int4

    h, hd = dims["H"], dims["head_dim"]
    shapes = {"q_proj": (dims["heads"] * hd, h), "kv_proj": (dims["kv_heads"] * hd, h),
              "o_proj": (h, dims["heads"] * hd)}
    for name, (n, k) in shapes.items():
        wp, ws = quantize_int4(torch.randn(n, k, generator=g, device=device) * 0.02, GROUP)
        w_bf16 = dequant_int4(wp, ws).to(torch.bfloat16)
        for t in tokens:
            yield name, t, torch.randn(t, k, generator=g, device=device).to(torch.bfloat16), wp, ws, w_bf16


def qkv_weight(dims: dict, device, g: torch.Generator):
    """(w_packed, w_scale, w_bf16) of one layer's fused qkv projection [(Hq + 2 Hkv) * D, H]."""
    from l4compile.ops.quant import dequant_int4
    from l4compile.quant import quantize_int4

    n = (dims["heads"] + 2 * dims["kv_heads"]) * dims["head_dim"]
    wp, ws = quantize_int4(torch.randn(n, dims["H"], generator=g, device=device) * 0.02, GROUP)
    return wp, ws, dequant_int4(wp, ws).to(torch.bfloat16)


def moe_weights(dims: dict, device, g: torch.Generator):
    """Int4 MoE weights as l4::moe_q takes them (router bf16, then (q, scale) for gate_up, down, shared gate, up,
    down), and the dequantized bf16 weights in l4::moe's layout (router, gate_up [E, H, 2I], down [E, I, H], shared)."""
    from l4compile.ops.quant import dequant_int4
    from l4compile.quant import quantize_int4

    h, i, e = dims["H"], dims["I"], dims["E"]
    router = (torch.randn(e, h, generator=g, device=device) * 0.5).to(torch.bfloat16)
    packed = []
    for shape in ((e, 2 * i, h), (e, h, i), (i, h), (i, h), (h, i)):     # nn.Linear orientation, as quantize makes
        packed += quantize_int4(torch.randn(*shape, generator=g, device=device) * 0.02, GROUP)
    deq = [dequant_int4(packed[j], packed[j + 1]).to(torch.bfloat16) for j in range(0, 10, 2)]
    # contiguous in transformers' layout, as bf16 engines hold them (fuse_moe keeps experts.gate_up_proj / down_proj)
    return (router, *packed), (router, deq[0].transpose(1, 2).contiguous(), deq[1].transpose(1, 2).contiguous(),
                               deq[2], deq[3], deq[4])


def moe_fp8_weights(dims: dict, device, g: torch.Generator) -> tuple:
    """FP8 MoE weights as l4::moe_q takes them: router bf16, then (float8 q, float32 per-channel scale) for gate_up,
    down, shared gate, up, down in nn.Linear orientation, as the quantize pass makes them."""
    from l4compile.quant import quantize_fp8

    h, i, e = dims["H"], dims["I"], dims["E"]
    router = (torch.randn(e, h, generator=g, device=device) * 0.5).to(torch.bfloat16)
    return (router, *(t for shape in ((e, 2 * i, h), (e, h, i), (i, h), (i, h), (h, i))
                      for t in quantize_fp8(torch.randn(*shape, generator=g, device=device) * 0.02)))


def fp8_configs(quick: bool, tiny: bool) -> list[tuple[int, int, int]]:
    """(BM, BN, BK) for moe_fp8_fused: BM 16 (decode; Triton's MMAs take float8 as f16 there) and 64 (FP8 wgmma)."""
    if tiny:
        return [(16, 16, 32)]
    if quick:
        return [(16, 64, 128), (64, 64, 128)]
    return list(itertools.product((16, 64), (32, 64, 128), (128,)))


def moe_bytes(x, qweights, fweights, touched: int, quant: bool, logits) -> int:
    """Weights of the touched experts + the shared expert, activations in and out, and the router ``logits`` the MoE
    is given (a CUDA engine's step makes them in add_rms_norm_router, so the MoE reads no router weight)."""
    e = qweights[0].shape[0]
    if quant:
        expert, shared = nbytes(*qweights[1:5]) // e, nbytes(*qweights[5:])
    else:
        expert, shared = nbytes(*fweights[1:3]) // e, nbytes(*fweights[3:])
    return touched * expert + shared + nbytes(logits) + 2 * nbytes(x)


def attention_cases(dims: dict, batches: list[int], device, g: torch.Generator):
    """(batch, position, l4::attention_cached args): NoPE decode steps (no RoPE, no temperature), so the projection
    is views only and ``attention_fused_inplace`` on those views is the whole step, the cache write included (since
    2026-12-06; the 2026-12-04 rows timed ``attention_fused``, without it). The write lands on slot ``pos``,
    which a query at ``pos`` never reads from the cache, so repeated calls at one position compute the same output
    (each position's reference is taken after the earlier positions' writes)."""
    slots, positions = (32, (7, 31)) if dims is TINY else (8192, (511, 8191))
    hq, hkv, d = dims["heads"], dims["kv_heads"], dims["head_dim"]
    table = torch.zeros(1, d // 2, device=device)
    for b in batches:
        kc, vc = (torch.randn(b, hkv, slots, d, generator=g, device=device).to(torch.bfloat16) for _ in "kv")
        q = torch.randn(b, 1, hq * d, generator=g, device=device).to(torch.bfloat16)
        k, v = (torch.randn(b, 1, hkv * d, generator=g, device=device).to(torch.bfloat16) for _ in "kv")
        for pos in positions:
            start = torch.tensor([pos], device=device)
            yield b, pos, (q, k, v, kc, vc, start, table, table, hq, hkv, d, False, False, 0, False, 8192.0, 0.1,
                           d ** -0.5, 1e-5)


def attention_configs(quick: bool, tiny: bool) -> list[tuple[int, int]]:
    """(BM, BN) pairs for attention_fused (BM 16 fits a decode step's 5 rows per kv head, 64 is the static choice).
    Since 2026-12-06 a BM 64 kernel runs a decode step's rows as one 16-row tile (``ATTENTION_DECODE_BLOCK_M``), so
    at these decode rows BM 64 should time as BM 16 did, plus its launch of a larger kernel: the rows say if so."""
    if tiny:
        return [(16, 16)]
    if quick:
        return [(64, 64), (16, 64)]
    return list(itertools.product((16, 64), (32, 64, 128)))


def configs(quick: bool, tiny: bool) -> list[tuple[int, int]]:
    """(BN, BK) pairs to sweep for the fused Int4 MoE (BM stays 16: one MMA tile of rows for decode). BN 16 is there
    for k/v_proj (N = 1024): at BN 64 a decode GEMV launches 16 programs on 132 SMs, at BN 16 it launches 64."""
    if tiny:
        return [(32, 32)]
    if quick:
        return [(64, 128), (128, 128)]
    return list(itertools.product((16, 32, 64, 128, 256), (64, 128)))


# K-loop pipeline depths to try besides Triton's default 3 (``Int4Blocks.num_stages``): 4 and 5 hold more loads in
# flight per program, the other lever (with split-K) on a decode GEMV whose time follows its serial K loop; 2 needs
# half the shared memory (the MoE gate_up: 50 KB, not 100), more programs an SM where registers allow (sm_90a,
# Triton 3.7.1, FFMA unpack: gate_up's 150 registers a thread allow 3, where 3 stages' shared memory allows 2)
STAGES = (2, 4, 5)


def _int4(bn: int, bk: int, sk: int = 1, asm: bool = False, ns: int | None = None, nw: int | None = None,
          fma: bool = True):
    """``Int4Blocks`` of BM 16 with one scale a K block: the blocks every Int4 row here times."""
    from l4compile.kernels.layout import Int4Blocks

    return Int4Blocks(16, bn, bk, True, sk, asm, ns, nw, fma)


def int4_label(b, down=None) -> str:
    """A row's configuration (``tuned_blocks.label``): "BN64 BK128" plus what differs from the static choice."""
    from l4compile.kernels.tuned_blocks import label

    return label(b, down)


def int4_configs(quick: bool, tiny: bool) -> list:
    """``Int4Blocks`` for int4_mm: the MoE's (BN, BK) pairs unsplit and split 2/4/8 ways (more programs for a decode
    GEMV, latency-bound on an H200 at S = 1: ~30 us for any N), the byte unpack the FFMA unpack replaced (``bytes``:
    ``Int4Blocks.fma_unpack``), the inline-PTX unpack (``int4_mm_bf16x2_kernel``) at BN 64/128, BK 128, 8 warps a
    program (twice the warps an SM to hide the unpack's latency with), and the static BN 64 / BK 128 with other
    pipeline depths (``STAGES``), unsplit and split 4 ways (sweep only)."""
    if tiny:
        return [_int4(32, 32), _int4(32, 32, 2), _int4(32, 32, ns=4), _int4(32, 32, nw=8)]
    # --quick: BN 64 (BN 128 took twice as long at every N on 2026-12-04's H200) and BN 32 unsplit (twice the programs
    # without split-K's partials: o_proj's 80 programs at BN 64 leave 52 of 132 SMs idle), within gpu_session's box
    pairs = [_int4(64, 128, sk) for sk in (1, 4, 8)] + [_int4(32, 128)] if quick else \
        [_int4(bn, bk, sk) for bn, bk in configs(False, False) for sk in (1, 2, 4, 8)]
    byte_unpack = [_int4(64, 128, sk, fma=False) for sk in ((1,) if quick else (1, 4))]
    asm = [_int4(bn, 128, sk, True) for bn in ((64,) if quick else (64, 128)) for sk in ((1, 4, 8) if quick else
                                                                                         (1, 2, 4, 8))]
    warps = [_int4(64, 128, sk, a, nw=8) for sk, a in (((1, False), (4, True)) if quick else
                                                       ((1, False), (4, False), (1, True), (4, True)))]
    deep = [] if quick else [_int4(64, 128, sk, ns=ns) for sk in (1, 4) for ns in STAGES]
    return pairs[:1] + byte_unpack + pairs[1:] + asm + warps + deep


def moe_int4_configs(quick: bool, tiny: bool) -> list[tuple]:
    """(gate_up, down) ``Int4Blocks`` for moe_q_fused: the (BN, BK) pairs unsplit; the byte unpack the FFMA unpack
    replaced; the static BN 64 / BK 128 with its GEMMs split (gate_up: H = 5120, 40 K blocks; down: I = 8192, 64 K
    blocks; the tile's last program adds the partials, and for gate_up runs the SwiGLU); the inline-PTX unpack in
    both GEMMs, unsplit and split; 8 warps a program (a decode step's gate_up fits 2 programs an SM, by shared
    memory: 8 warps an SM at 4 a program); 2 pipeline stages (half of gate_up's shared memory: 3 programs an SM on
    sm_90a, by its 150 registers) and the other depths (``STAGES``) unsplit and split 4 ways (sweep only).
    At a decode step gate_up has 2 tiles x I / BN = 256 programs of 40 K blocks each unsplit."""
    both = lambda *a, **kw: (_int4(*a, **kw), _int4(*a, **kw))            # noqa: E731
    if tiny:
        return [both(32, 32), both(32, 32, 2), both(32, 32, ns=4), both(32, 32, nw=8)]
    pairs = [both(bn, bk) for bn, bk in configs(quick, tiny)]
    byte_unpack = [both(64, 128, fma=False)] + ([] if quick else [both(64, 128, 4, fma=False)])
    # --quick splits down alone too: at a decode step its 160 programs (2 tiles x H / BN) leave 28 of 132 SMs with two
    # and the rest with one, where gate_up's 256 fill 2 an SM (its shared memory's limit) on nearly every SM
    splits = [(_int4(64, 128, sg), _int4(64, 128, sd)) for sg, sd in
              ([(1, 2), (1, 4), (4, 4), (8, 8)] if quick else [(1, 2), (1, 4), (1, 8), (2, 2), (4, 4), (8, 8), (4, 8)])]
    asm = [both(64, 128, sk, True) for sk in (1, 4, 8)] + ([] if quick else [both(128, 128, sk, True) for sk in (1, 4)])
    warps = [both(64, 128, sk, a, nw=8) for sk, a in (((1, False), (1, True), (4, True)) if quick else
                                                      ((1, False), (4, False), (1, True), (4, True)))]
    deep = [both(64, 128, ns=2)] if quick else [both(64, 128, sk, ns=ns) for sk in (1, 4) for ns in STAGES]
    return pairs[:1] + byte_unpack + deep[:1] + pairs[1:] + splits + asm + warps + deep[1:]


def _add_norm(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor, eps: float = 1e-5):
    """The residual add and Llama4TextRMSNorm as a step graph has them -> (h, x)."""
    h = a + b
    return h, _rms(h, eps) * w


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="1,8,32",
                    help="token counts (decode batch sizes), comma-separated; empty: the --prefill rows alone")
    ap.add_argument("--prefill", default="", help="prefill token counts for the Int4 GEMMs' prefill rows "
                                                  "(TFLOP/s), comma-separated; none by default")
    ap.add_argument("--quick", action="store_true", help="two block configurations instead of the sweep")
    ap.add_argument("--tiny", action="store_true", help="CI-sized dimensions (CPU interpreter smoke run)")
    ap.add_argument("--out", default=None, metavar="FILE.json")
    a = ap.parse_args(argv)
    from l4compile.kernels import interpreting, why_unavailable

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if why_unavailable() or (device.type == "cpu" and not (interpreting() and a.tiny)):
        print("error: bench_kernels.py needs a CUDA GPU with triton (or --tiny under TRITON_INTERPRET=1 on a CPU): "
              + (why_unavailable() or "no CUDA device here"), file=sys.stderr)
        return 2
    try:
        tokens, prefill = ([int(t) for t in v.split(",")] if v else [] for v in (a.tokens, a.prefill))
        if not (tokens or prefill) or min(tokens + prefill) < 1:
            raise ValueError
    except ValueError:
        print(f"error: --tokens '{a.tokens}' / --prefill '{a.prefill}' must be comma-separated lists of positive "
              "integers, not both empty", file=sys.stderr)
        return 2
    from l4compile.kernels.dispatch import k_rope_reference, load_triton_ops
    from l4compile.kernels.layout import (SPLIT_K_LOCK_WORDS, AttentionBlocks, attention_blocks, int4_blocks,
                                          Int4Blocks, int4_prefill_blocks, moe_fp8_blocks, moe_int4_blocks,
                                          moe_int4_prefill_blocks)
    from l4compile.kernels.ops import (add_rms_norm_router, fused_attention_inplace, fused_moe, fused_moe_fp8,
                                       fused_moe_int4, int4_matmul, int4_mm_rope_chained)
    from l4compile.ops.attention import attention_cached_impl, plain_rope_tables
    from l4compile.ops.moe import _moe_impl, _route
    from l4compile.ops.quant import _moe_q_impl

    load_triton_ops()
    dims = TINY if a.tiny else SCOUT
    time_ms = timer(device)
    g = torch.Generator(device=device).manual_seed(0)
    peak = copy_bandwidth(device, timer(device, graph=False), (1 << 30) if device.type == "cuda" else (1 << 20))
    rows: list[dict] = []

    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (interpreter)"
    print(f"{device_name}; torch {torch.__version__}; copy bandwidth {peak / 1e9:.0f} GB/s (read + write); "
          f"bf16 activations, Int4 group {GROUP}; * = the block configuration kernels.layout picks")
    print("| kernel | tokens | config | us | GB/s | of copy | rel err |")
    print("|---|---|---|---|---|---|---|", flush=True)

    def show(r):
        head = f"| {r['kernel']} | {r['tokens']} | {r['config']}{'*' if r['chosen'] else ''} | "
        err = "-" if r["rel_err"] is None else f"{r['rel_err']:.1e}"
        if r["ms"] is None:
            print(head + f"{r['error']} | - | - | {err} |", flush=True)
        elif r.get("flops"):                        # a prefill row: compute-bound, in TFLOP/s
            print(head + f"{r['ms'] * 1e3:.1f} | {r['flops'] / (r['ms'] / 1e3) / 1e12:.0f} TFLOP/s | - | {err} |",
                  flush=True)
        else:
            eager = " (eager)" if r.get("eager") else ""
            print(head + f"{r['ms'] * 1e3:.1f}{eager} | {r['bytes_per_s'] / 1e9:.0f} | {100 * r['of_copy']:.1f}% | "
                  f"{err} |", flush=True)

    def record(kernel, t, config, chosen, run, ref, moved, flops=None):
        row = {"kernel": kernel, "tokens": t, "config": config, "chosen": chosen, "rel_err": None, "bytes": moved,
               "ms": None, "bytes_per_s": None, "of_copy": None, "error": None, **({"flops": flops} if flops else {})}
        try:
            row["rel_err"] = rel_err(run(), ref)
            if row["rel_err"] < (5e-2 if interpreting() else BF16_TOL):   # the interpreter truncates to bf16
                row["ms"] = time_ms(run)
                row["eager"] = bool(getattr(time_ms, "eager", False))
                row["bytes_per_s"] = moved / (row["ms"] / 1e3)
                row["of_copy"] = row["bytes_per_s"] / peak
            else:
                row["error"] = "wrong result"
        except Exception as e:     # a configuration the compiler refuses (registers, shared memory) is reported
            row["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
        rows.append(row)
        show(row)

    # attention first: few rows, and a cut-off run (gpu_session's box) still has them
    for b, pos, args in attention_cases(dims, tokens, device, g):
        q, k, v, kc, vc, start, *_ = args
        hq, hkv, d = args[8:11]
        ref = attention_cached_impl(*args)[0]
        heads = [x.view(b, 1, n, d).transpose(1, 2) for x, n in ((q, hq), (k, hkv), (v, hkv))]
        visible = 2 * b * hkv * (pos + 1) * d * kc.element_size()         # k and v of positions 0..pos
        moved = visible + 2 * nbytes(q)
        default = attention_blocks(d)
        cos, sin, rope, qk_norm, chunk, temp, floor_scale, attn_scale, scaling, eps = args[6:8] + args[11:]
        q_args = (cos, sin, hq, hkv, chunk, scaling, rope, qk_norm, temp, floor_scale, attn_scale, eps)
        lock = torch.zeros(SPLIT_K_LOCK_WORDS, dtype=torch.int32, device=device)     # left zeros by every call
        for bm, bn in attention_configs(a.quick, a.tiny):
            blocks = AttentionBlocks(bm, bn, default.block_d)
            record(f"attention_fused pos {pos}", b, f"BM{bm} BN{bn}", blocks == default,
                   lambda blocks=blocks: fused_attention_inplace(*heads, kc, vc, start, *q_args, blocks=blocks,
                                                                 lock=lock)[0], ref, moved)
        record(f"attention_fused pos {pos}", b, "+ combine launch", False,
               lambda: fused_attention_inplace(*heads, kc, vc, start, *q_args), ref, moved)
        record(f"sdpa aten pos {pos}", b, "cat + mask", False, lambda: attention_cached_impl(*args)[0], ref, moved)
    # then the Int4 MoE, most of a decode layer's time (289 of ~430 us on 2026-12-04's H200)
    qweights, fweights = moe_weights(dims, device, g)
    gu_s, dn_s = qweights[2], qweights[4]
    default = moe_int4_blocks(dims["H"], dims["I"], dims["H"] // gu_s.shape[-1], dims["I"] // dn_s.shape[-1])
    # the residual add and the norm as engines ran them: one Inductor kernel (after the MoE, and before the router)
    norm = torch.compile(_add_norm, dynamic=False) if device.type == "cuda" else _add_norm
    for t in tokens:
        x = torch.randn(t, dims["H"], generator=g, device=device).to(torch.bfloat16)
        ref = _moe_impl(x, *fweights, 1)
        logits = F.linear(x, qweights[0])                  # given, as an engine's step gives them: no router matmul
        touched = int(torch.unique(_route(x, qweights[0], 1)[0]).numel())
        moved = moe_bytes(x, qweights, fweights, touched, True, logits)
        for blocks in moe_int4_configs(a.quick, a.tiny):
            record("moe_q_fused", t, int4_label(*blocks), blocks == default,
                   lambda blocks=blocks: fused_moe_int4(x, *qweights, 1, blocks=blocks, logits=logits), ref, moved)
        record("moe_fused bf16", t, "default", True, lambda: fused_moe(x, *fweights, 1, logits=logits), ref,
               moe_bytes(x, qweights, fweights, touched, False, logits))
        # and what follows it in an engine's step: the combine, the residual add and the next layer's input norm, as
        # l4::moe_q_fused_norm runs them against the MoE then one Inductor kernel (as engines did)
        res = torch.randn(t, dims["H"], generator=g, device=device).to(torch.bfloat16)
        norm_w = (1 + 0.1 * torch.randn(dims["H"], generator=g, device=device)).to(torch.bfloat16)
        x_ref = _add_norm(res, ref, norm_w)[1]
        moved_norm = moved + nbytes(res, norm_w, res, x_ref)              # + h' and x' out
        record("moe_q_fused + add + norm", t, "l4::moe_q_fused_norm", True,
               lambda: fused_moe_int4(x, *qweights, 1, logits=logits, norm=(res, norm_w, 1e-5))[1], x_ref, moved_norm)
        record("moe_q_fused + add + norm", t, "+ Inductor launch" if device.type == "cuda" else "+ aten", False,
               lambda: norm(res, fused_moe_int4(x, *qweights, 1, logits=logits), norm_w)[1], x_ref, moved_norm)
    # a MoE layer's residual add + norm + router: one launch against the two an engine made before
    for t in tokens:
        a_in, b_in = (torch.randn(t, dims["H"], generator=g, device=device).to(torch.bfloat16) for _ in "ab")
        norm_w = (1 + 0.1 * torch.randn(dims["H"], generator=g, device=device)).to(torch.bfloat16)
        router_w = qweights[0]
        # checked on the logits (h and x: tests/kernels/test_norm_router_kernel.py), so no copy kernel is timed too
        h_ref, x_ref = _add_norm(a_in, b_in, norm_w)
        ref = F.linear(x_ref, router_w)
        moved = nbytes(a_in, b_in, norm_w, router_w, h_ref, x_ref, ref)
        record("add_rms_norm_router", t, "one launch", True,
               lambda: add_rms_norm_router(a_in, b_in, norm_w, router_w, 1e-5)[2], ref, moved)
        record("norm + router", t, "Inductor + cuBLAS" if device.type == "cuda" else "aten", False,
               lambda: F.linear(norm(a_in, b_in, norm_w)[1], router_w), ref, moved)
    lock = torch.zeros(SPLIT_K_LOCK_WORDS, device=device, dtype=torch.int32)   # every chained call leaves it zeros
    # a RoPE layer's qkv with its queries' and keys' RoPE + qk-norm: in the GEMM's epilogue (as engines run it)
    # against the GEMM then one Inductor kernel, at a decode step of `tokens` sequences at position 4000
    wp, ws, w_bf16 = qkv_weight(dims, device, g)
    hq, hkv, d = dims["heads"], dims["kv_heads"], dims["head_dim"]
    cos, sin = plain_rope_tables(d, 4096, device)
    start = torch.tensor([4000 if device.type == "cuda" else 7], device=device)
    k_args = (start, cos, sin, 0, (hq + hkv) * d, d, True, 1e-5)                  # columns of q and k
    k_rope = torch.compile(k_rope_reference, dynamic=False) if device.type == "cuda" else k_rope_reference
    for t in tokens:
        x = torch.randn(t, 1, dims["H"], generator=g, device=device).to(torch.bfloat16)
        ref = k_rope_reference(F.linear(x, w_bf16), *k_args)
        moved = nbytes(wp, ws, x, ref)
        record("int4_mm qkv + q/k rope", t, "l4::int4_mm_rope", True,
               lambda: int4_mm_rope_chained(x, wp, ws, *k_args, lock)[0], ref, moved)
        record("int4_mm qkv + q/k rope", t, "+ Inductor launch" if device.type == "cuda" else "+ aten", False,
               lambda: k_rope(int4_matmul(x.view(t, -1), wp, ws).view(t, 1, -1), *k_args), ref, moved)
    for name, t, x, wp, ws, w_bf16 in int4_cases(dims, tokens, device, g):
        ref = F.linear(x, w_bf16)
        n, k = wp.shape[0], 2 * wp.shape[1]
        default = int4_blocks(n, k, k // ws.shape[1])
        for b in int4_configs(a.quick, a.tiny):
            run = (lambda b=b: int4_matmul(x, wp, ws, blocks=b, lock=lock)[0]) if b.split_k > 1 else \
                (lambda b=b: int4_matmul(x, wp, ws, blocks=b))              # split: chained, as engines run it
            record(f"int4_mm {name}", t, int4_label(b), b == default, run, ref, nbytes(wp, ws, x, ref))
        record(f"torch.mm bf16 {name}", t, "cuBLAS", False, lambda: x @ w_bf16.t(), ref, nbytes(w_bf16, x, ref))
    f8weights = moe_fp8_weights(dims, device, g)
    default_fp8 = moe_fp8_blocks(dims["H"], dims["I"])
    for t in tokens:
        x = torch.randn(t, dims["H"], generator=g, device=device).to(torch.bfloat16)
        ref = _moe_q_impl(x, *f8weights, 1)               # its matmuls: l4::linear_fp8 (torch._scaled_mm on a GPU)
        logits = F.linear(x, f8weights[0])
        touched = int(torch.unique(_route(x, f8weights[0], 1)[0]).numel())
        moved = moe_bytes(x, f8weights, None, touched, True, logits)
        for bm, bn, bk in fp8_configs(a.quick, a.tiny):
            blocks = ((bm, bn, bk), (bm, bn, bk))
            record("moe_fp8_fused", t, f"BM{bm} BN{bn} BK{bk}", blocks == default_fp8,
                   lambda blocks=blocks: fused_moe_fp8(x, *f8weights, 1, blocks=blocks, logits=logits), ref, moved)
        record("moe_q reference fp8", t, "per expert", False, lambda: _moe_q_impl(x, *f8weights, 1), ref, moved)
    # prefill: the Int4 GEMMs at T tokens, decode blocks against the prefill blocks engines launch past
    # INT4_PREFILL_ROWS rows (given as blocks here: one launch for every T, the kernel an engine's prefill runs)
    wp, ws, w_bf16 = next((wp, ws, w) for name, _, _, wp, ws, w in int4_cases(dims, [1], device, g) if name == "q_proj")
    n, k = wp.shape[0], 2 * wp.shape[1]
    group = k // ws.shape[1]
    tall = [Int4Blocks(bm, bn, 128, True, num_stages=2, num_warps=nw) for bm, bn, nw in
            ((128, 128, 8), (64, 64, 4), (128, 64, 8), (64, 128, 8))] if not a.tiny else [Int4Blocks(32, 32, 32, True)]
    for t in prefill:
        x = torch.randn(t, k, generator=g, device=device).to(torch.bfloat16)
        ref, flops = F.linear(x, w_bf16), 2 * t * n * k
        default = int4_prefill_blocks(n, k, group, x.dtype, ws.dtype)
        record("int4_mm q_proj prefill", t, "decode blocks " + int4_label(int4_blocks(n, k, group)), False,
               lambda: int4_matmul(x, wp, ws, blocks=int4_blocks(n, k, group)), ref, nbytes(wp, ws, x, ref), flops)
        for b in tall:
            record("int4_mm q_proj prefill", t, f"BM{b.block_m} " + int4_label(b), b == default,
                   lambda b=b: int4_matmul(x, wp, ws, blocks=b), ref, nbytes(wp, ws, x, ref), flops)
        record("torch.mm bf16 q_proj prefill", t, "cuBLAS", False, lambda: x @ w_bf16.t(), ref,
               nbytes(w_bf16, x, ref), flops)
    gh, gi = dims["H"] // qweights[2].shape[-1], dims["I"] // qweights[4].shape[-1]
    both = [(b, b) for b in tall if b.block_m * b.block_n <= 128 * 64] if not a.tiny else [(tall[0], tall[0])]
    for t in prefill:
        x = torch.randn(t, dims["H"], generator=g, device=device).to(torch.bfloat16)
        ref, logits = _moe_impl(x, *fweights, 1), F.linear(x, qweights[0])
        flops = 2 * 2 * t * 3 * dims["H"] * dims["I"]          # routed + shared row a token: gate, up, down
        moved = moe_bytes(x, qweights, fweights, dims["E"], True, logits)
        default = moe_int4_prefill_blocks(dims["H"], dims["I"], gh, gi, x.dtype, qweights[4].dtype)
        decode = moe_int4_blocks(dims["H"], dims["I"], gh, gi)
        record("moe_q_fused prefill", t, "decode blocks " + int4_label(*decode), False,
               lambda: fused_moe_int4(x, *qweights, 1, blocks=decode, logits=logits), ref, moved, flops)
        for blocks in both:
            record("moe_q_fused prefill", t, f"BM{blocks[0].block_m} " + int4_label(*blocks), blocks == default,
                   lambda blocks=blocks: fused_moe_int4(x, *qweights, 1, blocks=blocks, logits=logits), ref, moved,
                   flops)
        record("moe_fused bf16 prefill", t, "BM64", False, lambda: fused_moe(x, *fweights, 1, logits=logits), ref,
               moe_bytes(x, qweights, fweights, dims["E"], False, logits), flops)
    # a global layer's causal attention over T new tokens at position 0 (the chunked layers' too, for T <= 8192), as
    # engines run it (the caches written by the same launches), against torch's SDPA (FlashAttention on an H100) on
    # K/V expanded per query head; q, k, v are the [B, T, heads * D] projections' views, as in an engine
    hq, hkv, d = dims["heads"], dims["kv_heads"], dims["head_dim"]
    for t in prefill:
        q, k, v = (torch.randn(1, t, n * d, generator=g, device=device).to(torch.bfloat16).view(1, t, n, d)
                   .transpose(1, 2) for n in (hq, hkv, hkv))
        kc, vc = (torch.zeros(1, hkv, t, d, device=device, dtype=torch.bfloat16) for _ in "kv")
        kx, vx = (x.repeat_interleave(hq // hkv, dim=1) for x in (k, v))
        start, table = torch.zeros(1, dtype=torch.int64, device=device), torch.zeros(1, d // 2, device=device)
        q_args = (table, table, hq, hkv, 0, d ** -0.5, False, False, False, 8192.0, 0.1, 1e-5)
        sdpa = lambda q=q, kx=kx, vx=vx, t=t: F.scaled_dot_product_attention(  # noqa: E731
            q, kx, vx, is_causal=True).transpose(1, 2).reshape(1, t, hq * d)
        ref, flops = sdpa(), 4 * d * hq * t * (t + 1) // 2                    # QK^T and PV over the causal half
        moved = nbytes(q, k, v, ref)
        default = attention_blocks(d)
        for b in (default, AttentionBlocks(128, 64, default.block_d, 8)) if not a.tiny else (default,):
            record("attention_fused prefill", t, f"BM{b.block_m} BN{b.block_n}"
                   + (f" NW{b.num_warps}" if b.num_warps else ""), b == default,
                   lambda b=b: fused_attention_inplace(q, k, v, kc, vc, start, *q_args, blocks=b, lock=lock)[0],
                   ref, moved, flops)
        record("sdpa prefill", t, "K/V expanded", False, sdpa, ref, moved, flops)
    if a.out:
        Path(a.out).write_text(json.dumps({"device": device_name, "torch": torch.__version__, "copy_bytes_per_s": peak,
                                           "dims": dims, "rows": rows}, indent=2))
    return 0 if all(r["ms"] is not None for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
