"""Compile every Triton kernel l4compile launches for an H100 (sm_90a) on a machine without a GPU, and report what
ptxas made of it: registers per thread, spilled bytes (stack), shared memory, and the tensor-core instructions its
dots became (none: FMA units).

    python benchmarks/kernels_sm90.py [--dims scout|tiny] [--dtypes bfloat16,float32] [--sweep] [--tuning] [--json FILE]

How: each kernel's host code (``l4compile.kernels.ops``) runs on META tensors at the given dimensions with
``wrap_triton`` replaced by a recorder, so the launches it would make (kernel, arguments, constexprs) are captured
without memory or a device; each distinct launch is compiled by Triton's own NVIDIA backend (``triton.compile``
with ``GPUTarget("cuda", 90, 32)``, the ptxas shipped in the triton wheel) and the cubin's resource usage is read
with cuobjdump; from it, how many programs an H100 SM holds at once (``programs_per_sm``), and how the launch's own
grid sits on the 132 SMs (``fill``: a decode GEMV of 80 programs leaves 52 SMs without one). A kernel that spills
(stack > 0) loses its memory bandwidth to local-memory traffic; one that does not compile, or needs more shared
memory than a block may have (227 KiB), would fail the first GPU session. Arguments are specialised by Triton's own
binder, as on a GPU. Exit 1 if a kernel fails to compile, exceeds the shared memory, waits on a synchronous global
load inside a software-pipelined loop (``loop_loads``: a K loop that does runs at one HBM round trip an iteration),
or spills in a 16-bit engine (float32 engines, a parity mode whose IEEE dots run on FMA units, are reported, not
failed, when they spill).

Cases (at Scout dimensions: H 5120, I 8192, 16 experts, 40/8 heads x 128, Int4 group 128; bf16 and float32
engines, whose dots run IEEE fp32 on twice the shared memory):
    int4_mm          q_proj at 1 and 2048 tokens (bf16 at 2048: the prefill blocks, layout.int4_prefill_blocks)
    int4_mm_rope     a RoPE layer's qkv at 1 and 2048 tokens, chained, k's RoPE + qk-norm in its epilogue (k_rope.py)
    moe_q_fused      routing + gate_up + down kernels at 1 token (the GEMMs never specialise T, so they compile
                     as in an engine: both ways of mapping a tile, ``moe_route.tile_span``; the route kernel is
                     the 1-token one, an engine's serves any T)
    moe_fp8_fused    the same on float8 weights (float8 dot operands in bf16 engines; at BM 16 Triton 3.7 makes
                     them f16 MMAs, from BM 64 wgmma e4m3)
    moe_fused        the same in bf16
    moe_*_fused_norm the three as a CUDA engine's step runs them: on the router logits (no route launch at 1
                     token), the down kernel finishing each token's combine + residual add + next RMSNorm, and the
                     longer steps' moe_norm_kernel; the Int4 one also at 2048 tokens (bf16: the prefill blocks'
                     own route, gate_up and down launches, layout.moe_int4_prefill_blocks)
    attention_fused  partial + combine, decode (1 token, an 8192-slot cache; a RoPE + qk-norm layer and a NoPE
                     layer with temperature) and prefill (2048 tokens), as CUDA engines launch them
                     (l4::attention_fused_chained: the partial kernel transforms q and, with split keys, merges the
                     splits and writes the caches; the combine writes them with one split)
    add_rms_norm_router  a MoE layer's residual add + post-attention RMSNorm + router (one kernel for any T: its
                     decode row path and its prefill block path)
"""
# T tokens, H hidden, I expert width, E experts
from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"       # before triton is imported: compile, never interpret

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DIMS = {"scout": {"H": 5120, "I": 8192, "E": 16, "heads": 40, "kv_heads": 8, "head_dim": 128, "slots": 8192,
                  "vocab": 202048},
        "tiny": {"H": 64, "I": 96, "E": 4, "heads": 4, "kv_heads": 2, "head_dim": 16, "slots": 32, "vocab": 256}}
SHARED_LIMIT = 227 * 1024       # the most shared memory one block may opt into on sm_90
# an H100 SM (sm_90): what bounds the programs (CTAs) resident at once
SM_SHARED = 228 * 1024          # shared memory an SM has for blocks, each also holding 1 KB the system reserves
SM_REGISTERS = 65536            # 32-bit registers, allocated a warp at a time in units of 256
SM_WARPS, SM_CTAS = 64, 32
H100_SMS = 132                  # SXM (an H200 has as many)


def programs_per_sm(registers: int, num_warps: int, shared_bytes: int) -> int:
    """How many programs of a kernel an H100 SM holds at once (the CUDA occupancy rules for sm_90: registers per
    warp rounded up to 256, 1 KB of shared memory reserved per block, at most 64 warps and 32 blocks). A decode
    step with few programs an SM has few warps to hide each one's latency with."""
    per_warp = -(-registers * 32 // 256) * 256
    by_regs = SM_REGISTERS // (per_warp * num_warps) if registers else SM_CTAS
    by_shared = SM_SHARED // (shared_bytes + 1024)
    return max(0, min(by_regs, by_shared, SM_WARPS // num_warps, SM_CTAS))


def fill(programs: int | None, per_sm: int, sms: int = H100_SMS) -> str:
    """How a launch of ``programs`` programs sits on ``sms`` SMs that hold ``per_sm`` each: the waves it takes and,
    in one wave, how many SMs get the most programs and how many none ("-" when the grid was not concrete)."""
    if programs is None or not per_sm:
        return "-"
    if programs == 0:
        return "no programs (the launch is skipped)"
    waves = programs / (per_sm * sms)
    if waves > 1:
        return f"{programs} programs, {waves:.2f} waves"
    most = -(-programs // sms)                    # the block scheduler deals programs out one an SM at a time
    heavy = programs - (most - 1) * sms
    idle = max(0, sms - programs)
    return (f"{programs} program{'s' * (programs > 1)}: {heavy} SM{'s' * (heavy > 1)} run {most}"
            + (f", {idle} none" if idle else ""))


class Recorder:
    """Stands in for ``torch.library.wrap_triton``: ``wrap(kernel)[grid](*args, **kw)`` records the launch."""

    def __init__(self):
        self.launches: list[tuple] = []

    def __call__(self, kernel):
        def launch(grid):
            return lambda *args, **kw: self.launches.append((kernel, grid, args, kw))
        return type("Launch", (), {"__getitem__": lambda _, grid: launch(grid)})()


def grid_programs(grid) -> int | None:
    """The programs a recorded grid launches (None unless it is a tuple of concrete integers)."""
    try:
        return math.prod(int(g) for g in grid)
    except (TypeError, ValueError):
        return None


def specialize(kernel, args: tuple, kw: dict, backend) -> tuple[dict, dict, dict, dict, dict]:
    """(signature, constexprs, attributes, options, constexprs by name) of one launch, as ``JITFunction.run``
    derives them on a GPU: Triton's own binder, so integers divisible by 16 and aligned pointers get the same
    specialisation (``tt.divisibility``; meta tensors count as aligned, as the caching allocator's blocks are).
    Python float arguments are typed fp64, as Inductor types them in engines (``torch._inductor.codegen.triton_utils``,
    ``_use_fp64_for_unbacked_floats``); Triton's own launcher would say fp32 and hide a kernel that mixes the two."""
    from triton.runtime.jit import create_function_from_signature

    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kw)
    options, sig, constexprs, attrs = kernel._pack_args(backend, kw, bound, specialization, options)
    values = {**dict(zip(kernel.arg_names, args)), **kw}
    sig = {k: "fp64" if isinstance(values.get(k), float) else t for k, t in sig.items()}   # as Inductor types them
    consts = {kernel.arg_names[path[0]]: v for path, v in constexprs.items()}
    options = {k: v for k, v in options.__dict__.items() if k in ("num_warps", "num_stages")}
    return sig, constexprs, attrs, options, consts


def mma_kinds(ptx: str) -> list[str]:
    """The tensor-core instructions of a kernel's PTX, as shape.types ("wgmma m64n64k32 e4m3", "mma m16n8k16 bf16");
    empty for a kernel without dots or whose dots run on FMA units (IEEE float32)."""
    found = re.findall(r"\b(wgmma\.mma_async|mma)\.sync\.aligned\.(m\d+n\d+k\d+)\.\S*?(e4m3|e5m2|bf16|f16|tf32)", ptx)
    return sorted({f"{'wgmma' if op.startswith('wgmma') else 'mma'} {shape} {ty}" for op, shape, ty in found})


def resources(cubin: bytes, tool: Path) -> dict:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "k.cubin"
        path.write_bytes(cubin)
        out = subprocess.run([str(tool), "-res-usage", str(path)], capture_output=True, text=True).stdout
    m = {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", out)}
    return {"registers": m.get("REG"), "stack_bytes": m.get("STACK"), "static_shared_bytes": m.get("SHARED")}


OPS = ("I2F", "F2F", "F2FP", "PRMT", "LOP3", "SHF", "FMUL", "FADD", "FFMA", "HADD2", "HMUL2", "HMMA", "LDG", "LDS",
       "STS", "STSM", "LDL", "STL")


LOOP_MIN = 100          # loops shorter than this (a reduction's shuffle steps, a zeroing loop) are not listed


def sass_ops(cubin: bytes, tool: Path) -> dict[str, int]:
    """Opcode counts of the body of the kernel's longest loop in SASS (a backward branch and the instructions it
    jumps back over: the K loop of a GEMM, one iteration of it; software pipelining puts copies of the loads and
    MMAs before and after it, which are not counted), the conversions and ALU work a dequantizing loop spends per
    weight beside its loads and tensor-core MMAs. ``total``: the loop's instructions; ``kernel``: the whole
    kernel's; ``kernel_sync``: the whole kernel's global atomics, memory barriers and L1 invalidations (a split-K
    epilogue's counter: ``l4compile/kernels/split_k.py``); ``loops``: [instructions, on the path that takes the
    loop's longest forward branch] of each loop of at least ``LOOP_MIN``, in address order (the attention kernel's
    key loop at each tile height: a masked tile runs all of it, an unmasked one branches past the mask). A kernel
    without a loop counts as a whole."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "k.cubin"
        path.write_bytes(cubin)
        out = subprocess.run([str(tool), "-sass", str(path)], capture_output=True, text=True).stdout
    code = [(int(a, 16), op, rest) for a, op, rest in
            re.findall(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)([^;]*);", out)]
    loops = [(int(m.group(1), 16), a) for a, op, rest in code if op == "BRA"
             and (m := re.search(r"(0x[0-9a-f]+)", rest)) and int(m.group(1), 16) < a]
    lo, hi = max(loops, key=lambda r: r[1] - r[0]) if loops else (0, float("inf"))
    ops = [op for a, op, _ in code if lo <= a <= hi]
    every = [op for _, op, _ in code]
    sizes = []
    for a, b in sorted(loops):
        size = sum(a <= x <= b for x, _, _ in code)
        skips = [int(m.group(1), 16) - x for x, op, rest in code if a <= x < b and op == "BRA"
                 and (m := re.search(r"(0x[0-9a-f]+)", rest)) and x < int(m.group(1), 16) <= b]
        if size >= LOOP_MIN:                 # the path that takes the longest forward branch skips what it jumps
            sizes.append([size, size - (max(skips) // 16 - 1 if skips else 0)])
    return {**{k: ops.count(k) for k in OPS}, "total": len(ops), "kernel": len(code),
            "kernel_sync": {k: every.count(k) for k in ("ATOMG", "MEMBAR", "CCTL")}, "loops": sizes}


def loop_loads(ttgir: str) -> list[dict[str, int]]:
    """For each ``scf.for`` of a kernel's TTGIR (after Triton's software pipeliner), the global loads in its body:
    ``async``, copies into the loop's shared-memory stages (cp.async, issued iterations ahead of their use), and
    ``sync``, plain loads whose whole latency an iteration waits out. The pipeliner moves only loads of >= 32 bits a
    thread into stages, so a 16-bit per-row scale load in a K loop stays synchronous: one HBM round trip each
    iteration (a pipelined loop should hold none: ``l4compile.kernels.layout.scale_words``)."""
    lines, found = ttgir.splitlines(), []
    for i, line in enumerate(lines):
        if "scf.for" not in line:
            continue
        indent, body = len(line) - len(line.lstrip()), []
        for inner in lines[i + 1:]:
            if inner.strip().startswith("}") and len(inner) - len(inner.lstrip()) <= indent:
                break
            body.append(inner)
        found.append({"sync": sum(" tt.load " in b for b in body),
                      "async": sum("ttg.async_copy_global_to_local" in b for b in body)})
    return found


class MetaInputs:
    """Meta tensors shaped as the kernels' host code takes them at ``dims``, activations (and float weights) in
    ``dtype``; Int4 weights packed two to a byte with bfloat16 scales per group of 128, as the quantize pass makes
    them."""

    def __init__(self, dims: dict, dtype: torch.dtype):
        self.dims, self.dtype = dims, dtype
        self.group = min(128, dims["H"])

    def act(self, *shape: int) -> torch.Tensor:
        return torch.empty(*shape, dtype=self.dtype, device="meta")

    def int4(self, *shape: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(packed [.., K/2] uint8, scales [.., K/G] bf16) of a weight [.., K] (nn.Linear orientation)."""
        *lead, k = shape
        return (torch.empty(*lead, k // 2, dtype=torch.uint8, device="meta"),
                torch.empty(*lead, k // self.group, dtype=torch.bfloat16, device="meta"))

    def fp8(self, *shape: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(float8_e4m3fn [.., N, K], float32 scales [.., N]) of a weight [.., N, K] (nn.Linear orientation)."""
        return (torch.empty(*shape, dtype=torch.float8_e4m3fn, device="meta"),
                torch.empty(*shape[:-1], dtype=torch.float32, device="meta"))

    def moe_fp8(self) -> tuple:
        """l4::moe_q's weights after x on FP8: router, then (q, scale) of gate_up, down, shared gate, up, down."""
        h, i, e = self.dims["H"], self.dims["I"], self.dims["E"]
        return (self.act(e, h), *self.fp8(e, 2 * i, h), *self.fp8(e, h, i), *self.fp8(i, h), *self.fp8(i, h),
                *self.fp8(h, i))

    def moe_q(self) -> tuple:
        """l4::moe_q's weights after x: router, then (q, scale) of gate_up, down, shared gate, up, down."""
        h, i, e = self.dims["H"], self.dims["I"], self.dims["E"]
        return (self.act(e, h), *self.int4(e, 2 * i, h), *self.int4(e, h, i), *self.int4(i, h), *self.int4(i, h),
                *self.int4(h, i))

    def attention(self, t: int) -> tuple:
        """l4::attention_fused's tensors for T new tokens: q, k_new, v_new (transposed views), caches, start."""
        b, hq, hkv, d = 1, self.dims["heads"], self.dims["kv_heads"], self.dims["head_dim"]
        q = self.act(b, t, hq, d).transpose(1, 2)
        kv = [self.act(b, t, hkv, d).transpose(1, 2) for _ in "kv"]
        cache = [self.act(b, hkv, self.dims["slots"], d) for _ in "kv"]
        return (q, *kv, *cache, torch.empty(1, dtype=torch.int64, device="meta"))


def cases(dims: dict, dtype: torch.dtype):
    """(name, thunk) pairs; each thunk runs host glue on meta tensors (the recorder collects the launches)."""
    from l4compile.kernels import ops
    from l4compile.kernels.layout import SPLIT_K_LOCK_WORDS

    m = MetaInputs(dims, dtype)
    h, i, e, hq, hkv, d = (dims[k] for k in ("H", "I", "E", "heads", "kv_heads", "head_dim"))
    for t in (1, 2048):
        yield f"int4_mm q_proj T={t}", lambda t=t: ops.int4_matmul(m.act(t, h), *m.int4(hq * d, h))
    lock = torch.empty(SPLIT_K_LOCK_WORDS, dtype=torch.int32, device="meta")      # a chained step's counters
    tables = [torch.empty(dims["slots"], d // 2, device="meta") for _ in "cs"]        # cos, sin [P, D/2]
    start = torch.empty(1, dtype=torch.int64, device="meta")
    # a RoPE layer's qkv as a CUDA engine's step runs it: q's and k's RoPE + qk-norm in the epilogue (k_rope.py),
    # chained; at 2048 tokens (bf16) the prefill blocks' launch, BM 128 (layout.INT4_PREFILL_ROWS)
    for t in (1, 2048):
        yield f"int4_mm_rope qkv T={t}", lambda t=t: ops._int4_rope(
            m.act(1, t, h), *m.int4((hq + 2 * hkv) * d, h), start, *tables, 0, (hq + hkv) * d, d, True, 1e-5, lock)
    yield "moe_q_fused", lambda: ops.fused_moe_int4(m.act(1, h), *m.moe_q(), 1)
    yield "moe_fp8_fused", lambda: sm90_fp8(lambda: ops.fused_moe_fp8(m.act(1, h), *m.moe_fp8(), 1))
    yield "moe_fused", lambda: ops.fused_moe(m.act(1, h), m.act(e, h), m.act(e, h, 2 * i), m.act(e, i, h),
                                             m.act(i, h), m.act(i, h), m.act(h, i), 1)
    # as a CUDA engine's step runs them: on the router logits, with the combine + residual + next norm (moe_norm.py)
    step = lambda: {"logits": m.act(1, e), "norm": (m.act(1, h), m.act(h), 1e-5)}  # noqa: E731
    yield "moe_q_fused_norm", lambda: ops.fused_moe_int4(m.act(1, h), *m.moe_q(), 1, **step())
    # a 2048-token step: in bf16 the prefill blocks' route, gate_up and down launches (BM 64), then moe_norm_kernel
    prefill = lambda: {"logits": m.act(2048, e), "norm": (m.act(2048, h), m.act(h), 1e-5)}  # noqa: E731
    yield "moe_q_fused_norm T=2048", lambda: ops.fused_moe_int4(m.act(2048, h), *m.moe_q(), 1, **prefill())
    yield "moe_fp8_fused_norm", lambda: sm90_fp8(lambda: ops.fused_moe_fp8(m.act(1, h), *m.moe_fp8(), 1, **step()))
    yield "moe_fused_norm", lambda: ops.fused_moe(m.act(1, h), m.act(e, h), m.act(e, h, 2 * i), m.act(e, i, h),
                                                  m.act(i, h), m.act(i, h), m.act(h, i), 1, **step())
    # the engine's kernel serves any T (its row path and block path are one kernel); 2048 keeps both, as a symbolic T
    yield "add_rms_norm_router T=2048", lambda: ops.add_rms_norm_router(m.act(2048, h), m.act(2048, h), m.act(h),
                                                                        m.act(e, h), 1e-5)
    rope = (*tables, hq, hkv, 0, d ** -0.5, True, True, False, 8192.0, 0.1, 1e-5)   # RoPE + qk-norm (bf16, FP8)
    nope = (*tables, hq, hkv, 0, d ** -0.5, False, False, True, 8192.0, 0.1, 1e-5)  # NoPE + temperature
    ready = (*tables, hq, hkv, 0, d ** -0.5, False, False, False, 8192.0, 0.1, 1e-5)   # Int4 RoPE layers: q ready
    for t, label, layer in ((1, "decode", rope), (1, "decode nope", nope), (1, "decode q-ready", ready),
                            (2048, "prefill", rope)):
        yield f"attention_fused {label} T={t}", lambda t=t, layer=layer: ops.fused_attention_inplace(
            *m.attention(t), *layer, lock=lock)


def sm90_fp8(thunk):
    """Run ``thunk`` with the FP8 kernels' operand modes an H100 gets (``ops._fp8_mode`` asks the device, and meta
    tensors have none): float8 dot operands for 16-bit activations, bf16 (exact) operands in float32 engines."""
    from unittest import mock

    from l4compile.kernels import ops

    mode = lambda x: {"FP8_DOT": x.dtype != torch.float32, "DOT_F32": False, "EMULATE_FP8": False}  # noqa: E731
    with mock.patch.object(ops, "_fp8_mode", mode):
        return thunk()


def sweep_cases(dims: dict, dtype: torch.dtype):
    """The block configurations ``bench_kernels.py`` sweeps on a GPU, at decode (1 token): which of them compile, fit
    and do not spill, before any GPU time is spent on them."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_kernels import STAGES, attention_configs, configs

    from l4compile.kernels import ops
    from l4compile.kernels.layout import SPLIT_K_LOCK_WORDS, AttentionBlocks, Int4Blocks, attention_blocks

    m = MetaInputs(dims, dtype)
    h, hq, hkv, d = (dims[k] for k in ("H", "heads", "kv_heads", "head_dim"))
    lock = torch.zeros(SPLIT_K_LOCK_WORDS, dtype=torch.int32, device="meta")

    def int4_and_moe(tag: str, b, chained: bool = False):
        """The int4_mm (q_proj) and moe_q_fused cases of one block configuration; ``chained``: int4_mm as
        l4::int4_mm_chained, as engines launch a split GEMM."""
        yield f"sweep int4_mm {tag}", lambda: ops.int4_matmul(m.act(1, h), *m.int4(hq * d, h), blocks=b,
                                                              lock=lock if chained else None)
        yield f"sweep moe_q_fused {tag}", lambda: ops.fused_moe_int4(m.act(1, h), *m.moe_q(), 1, blocks=(b, b))

    for bn, bk in configs(quick=False, tiny=False):
        yield from int4_and_moe(f"BN{bn} BK{bk}", Int4Blocks(16, bn, bk, True))
    yield from int4_and_moe("bytes BN64 BK128", Int4Blocks(16, 64, 128, True, fma_unpack=False))   # the byte unpack
    for bn, bk in ((64, 128), (128, 128)):      # the inline-PTX unpack (bf16 engines only: sweeps skip float32)
        yield from int4_and_moe(f"bf16x2 BN{bn} BK{bk}", Int4Blocks(16, bn, bk, True, 1, True))
    for split, asm in ((4, False), (8, False), (4, True)):   # split-K: the tile's last program adds the partials
        yield from int4_and_moe(f"SK{split}" + (" bf16x2" if asm else "") + " BN64 BK128",
                                Int4Blocks(16, 64, 128, True, split, asm), chained=True)
    for nw, asm in ((8, False), (8, True)):   # more warps a program (Triton's launch option num_warps)
        yield from int4_and_moe(f"NW{nw}" + (" bf16x2" if asm else "") + " BN64 BK128",
                                Int4Blocks(16, 64, 128, True, 1, asm, None, nw))
    for ns in STAGES:                           # other K-loop pipeline depths (Triton's launch option num_stages)
        yield from int4_and_moe(f"NS{ns} BN64 BK128", Int4Blocks(16, 64, 128, True, 1, False, ns))
    block_d = attention_blocks(d).block_d
    tables = [torch.empty(dims["slots"], d // 2, device="meta") for _ in "cs"]    # bench_kernels' NoPE rows: unused
    for bm, bn in attention_configs(quick=False, tiny=False):
        blocks = AttentionBlocks(bm, bn, block_d)
        yield f"sweep attention_fused BM{bm} BN{bn}", lambda blocks=blocks: ops.fused_attention_inplace(
            *m.attention(1), *tables, hq, hkv, 0, d ** -0.5, False, False, False, 8192.0, 0.1, 1e-5, blocks=blocks)
    # bench_kernels' prefill candidate: 128 rows on two warpgroups (the prefill path; a decode step's 16-row tile
    # runs on 8 warps too)
    tall = AttentionBlocks(128, 64, block_d, 8)
    yield "sweep attention_fused prefill BM128 BN64 NW8", lambda: ops.fused_attention_inplace(
        *m.attention(2048), *tables, hq, hkv, 0, d ** -0.5, False, False, False, 8192.0, 0.1, 1e-5, blocks=tall)


def tuning_cases(dims: dict, dtype: torch.dtype):
    """Every candidate ``compile --tune-kernels`` times (``l4compile.kernels.autotune``), for each Int4 problem of an
    Int4 engine at ``dims`` (the fused qkv, plain and as RoPE layers run it, o_proj, the Int4 lm_head, the MoE), at a
    decode step: which of them compile, fit and do not spill before a GPU session spends its minutes on them, and how
    long their compiles take (a fresh GPU host compiles each once, in the tuning process)."""
    from l4compile.kernels import autotune, ops
    from l4compile.kernels.layout import SPLIT_K_LOCK_WORDS, rope_int4_blocks
    from l4compile.kernels.tuned_blocks import choice_label, int4_key, moe_key

    m = MetaInputs(dims, dtype)
    h, i, e, hq, hkv, d = (dims[k] for k in ("H", "I", "E", "heads", "kv_heads", "head_dim"))
    lock = torch.zeros(SPLIT_K_LOCK_WORDS, dtype=torch.int32, device="meta")
    for n_out, k_in in (((hq + 2 * hkv) * d, h), (h, hq * d), (dims["vocab"], h)):
        key = int4_key(n_out, k_in, m.group, torch.bfloat16)
        for b in autotune.candidates(autotune.Problem(key), dtype):
            yield (f"tune {autotune.problem_name(key)} {choice_label(b)}",
                   lambda n_out=n_out, k_in=k_in, b=b: ops.int4_matmul(m.act(1, k_in), *m.int4(n_out, k_in), blocks=b,
                                                                       lock=lock if b.split_k > 1 else None))
    # the qkv of RoPE layers as the tuning times it and engines run it: l4::int4_mm_rope, its blocks widened to heads
    key = int4_key((hq + 2 * hkv) * d, h, m.group, torch.bfloat16)
    qkv = autotune.Problem(key, 48, rope=(d, 0, (hq + hkv) * d, True), rope_count=36)     # q and k in the epilogue
    tables = [torch.empty(dims["slots"], d // 2, device="meta") for _ in "cs"]
    rope = ops.KRope(torch.empty(1, dtype=torch.int64, device="meta"), *tables, 1, 0, (hq + hkv) * d, d, True, 1e-5)
    n_qkv = key[1]
    for b in autotune.candidates(qkv, dtype):
        split = rope_int4_blocks(b, n_qkv, d, 0, (hq + hkv) * d).split_k > 1
        yield (f"tune {autotune.problem_name(key)} (rope) {choice_label(b)}",
               lambda b=b, split=split: ops.int4_matmul(m.act(1, h), *m.int4(n_qkv, h), blocks=b, rope=rope,
                                                        lock=lock if split else None))
    key = moe_key(e, h, i, m.group, m.group, torch.bfloat16)
    for pair in autotune.candidates(autotune.Problem(key), dtype):
        yield (f"tune {autotune.problem_name(key)} {choice_label(pair)}",
               lambda pair=pair: ops.fused_moe_int4(m.act(1, h), *m.moe_q(), 1, blocks=pair))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", choices=sorted(DIMS), default="scout")
    ap.add_argument("--dtypes", default="bfloat16,float32", help="engine dtypes (activations, float weights)")
    ap.add_argument("--sweep", action="store_true",
                    help="also the block configurations bench_kernels.py sweeps (reported; they do not set the exit "
                         "status, which stays about the configurations the code chooses)")
    ap.add_argument("--tuning", action="store_true",
                    help="also every candidate compile --tune-kernels times at Scout's Int4 problems (reported, as "
                         "--sweep's; a candidate that fails is one the tuning records and leaves out)")
    ap.add_argument("--ops", action="store_true",
                    help="also count the SASS opcodes of each kernel's K loop (conversions, ALU, MMAs, loads; "
                         "see OPS and sass_ops)")
    ap.add_argument("--cases", default=None, help="only the cases whose name contains one of these (comma-separated)")
    ap.add_argument("--json", default=None, metavar="FILE")
    a = ap.parse_args(argv)
    from l4compile.kernels import why_unavailable

    if why_unavailable():
        print(f"error: {why_unavailable()}", file=sys.stderr)
        return 2
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from l4compile.kernels import ops

    from triton.compiler.compiler import make_backend

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    try:
        dtypes = [getattr(torch, d) for d in a.dtypes.split(",")]
        if not dtypes or any(d not in (torch.bfloat16, torch.float16, torch.float32) for d in dtypes):
            raise AttributeError
    except AttributeError:
        print(f"error: --dtypes '{a.dtypes}' must list bfloat16 / float16 / float32", file=sys.stderr)
        return 2
    print(f"triton {triton.__version__}, target sm_90a; {a.dims} dimensions; shared memory limit "
          f"{SHARED_LIMIT // 1024} KiB a block")
    print("| case | dtype | kernel | constexprs | registers | spilled (stack) bytes | shared bytes | programs an SM "
          f"(warps); this launch on {H100_SMS} SMs | tensor cores |")
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    rows, bad = [], 0
    todo = [(c, d) for d in dtypes for c in cases(DIMS[a.dims], d)]
    if a.sweep:
        todo += [(c, d) for d in dtypes if d != torch.float32 for c in sweep_cases(DIMS["scout"], d)]
    if a.tuning:
        todo += [(c, d) for d in dtypes for c in tuning_cases(DIMS["scout"], d)]
    if a.cases:
        todo = [(c, d) for c, d in todo if any(w in c[0] for w in a.cases.split(","))]
    for (name, thunk), dtype in todo:
        dname = str(dtype).replace("torch.", "")
        rec = Recorder()
        real, ops.wrap_triton = ops.wrap_triton, rec
        try:
            thunk()
        finally:
            ops.wrap_triton = real
        for kernel, grid, args, kw in rec.launches:
            row = {"case": name, "dtype": dname, "kernel": kernel.__name__, "error": None,
                   "programs": grid_programs(grid)}
            try:
                sig, constexprs, attrs, options, consts = specialize(kernel, args, kw, backend)
                row["constexprs"] = consts
                t0 = time.perf_counter()
                compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=attrs),
                                          target=target, options=options)
                row["compile_s"] = round(time.perf_counter() - t0, 2)     # 0 when Triton's cache had it
                row.update(resources(compiled.asm["cubin"], tool), shared_bytes=compiled.metadata.shared,
                           num_warps=compiled.metadata.num_warps, mma=mma_kinds(compiled.asm["ptx"]),
                           loop_loads=loop_loads(compiled.asm["ttgir"]))
                row["programs_per_sm"] = programs_per_sm(row["registers"], row["num_warps"], row["shared_bytes"])
                row["fill"] = fill(row["programs"], row["programs_per_sm"])
                if a.ops:
                    row["sass_ops"] = sass_ops(compiled.asm["cubin"], tool)
            except Exception as ex:           # reported, and the exit status says so
                row["error"] = f"{type(ex).__name__}: {ex}".splitlines()[0][:200]
            if not row["error"] and row["shared_bytes"] > SHARED_LIMIT:
                row["error"] = (f"needs {row['shared_bytes']} bytes of shared memory, over the {SHARED_LIMIT} an H100 "
                                "block may have")
            if not row["error"] and any(lp["sync"] and lp["async"] for lp in row["loop_loads"]):
                row["error"] = (f"a software-pipelined loop waits on a synchronous global load each iteration "
                                f"(loops: {row['loop_loads']})")
            chosen = not name.startswith(("sweep", "tune "))      # a configuration the code launches as it is
            if (row["error"] or (row.get("stack_bytes") and dtype != torch.float32)) and chosen:
                bad += 1
            rows.append(row)
            shown = " ".join(f"{k}={v}" for k, v in row.get("constexprs", {}).items() if k.isupper())
            if row["error"]:
                print(f"| {name} | {dname} | {row['kernel']} | {shown} | {row['error']} | - | - | - | - |", flush=True)
            else:
                print(f"| {name} | {dname} | {row['kernel']} | {shown} | {row['registers']} | {row['stack_bytes']} | "
                      f"{row['shared_bytes']} | {row['programs_per_sm']} ({row['programs_per_sm'] * row['num_warps']}); "
                      f"{row['fill']} | {', '.join(row['mma']) or '-'} |", flush=True)
                if a.ops:
                    print("|  |  |  | SASS loop: " + " ".join(f"{k} {v}" for k, v in row["sass_ops"].items() if v)
                          + "; loop loads (sync/async): " + " ".join(f"{lp['sync']}/{lp['async']}"
                                                                      for lp in row["loop_loads"])
                          + " | | | | | |", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"triton": triton.__version__, "target": "sm_90a", "dims": a.dims,
                                            "rows": rows}, indent=2, default=str))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
