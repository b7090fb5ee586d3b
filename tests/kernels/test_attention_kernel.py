"""l4::attention_fused (Triton attention over the cache and the new keys, by position) against l4::attention_cached's
reference (``cat(cache, new keys)`` under a mask): decode and multi-token steps, ring buffers that wrap (T > L
too), full-causal NoPE layers, GQA group sizes, split key ranges; that it never reads a key no query can see; and a
whole tiny model's prefill + decode steps with every attention fused."""
# B batch, T new tokens, L cache slots, Hq / Hkv heads, D head_dim
from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from l4compile.ops.attention import attention_cached_impl

from .conftest import TOL, rel_err, require_cuda_kernels, require_interpreter

ROOT = Path(__file__).resolve().parents[2]

# (B, T, L, Hq, Hkv, D, start, chunk, rope): chunked layers have L = chunk (a ring), NoPE layers chunk 0
CASES = {
    "decode": (1, 1, 16, 4, 2, 16, 5, 16, True),
    "decode-wrapped-ring": (2, 1, 16, 4, 2, 16, 37, 16, True),
    "decode-chunk-start": (1, 1, 16, 4, 2, 16, 32, 16, True),     # first token of a chunk: sees itself alone
    "chunked-prefill": (2, 7, 16, 4, 2, 16, 13, 16, True),         # crosses a chunk boundary
    "chunk-ends-a-tile": (1, 3, 16, 4, 2, 16, 15, 16, True),       # keys 0..15, a whole tile, seen by 15 alone
    "prompt-longer-than-ring": (2, 20, 16, 4, 2, 16, 0, 16, True),
    "continue-past-ring": (1, 20, 16, 4, 2, 16, 13, 16, True),
    "nope-global": (1, 9, 32, 4, 1, 16, 11, 0, False),             # temperature tuning, one kv head
    "nope-decode-odd-dim": (2, 1, 40, 10, 2, 24, 39, 0, False),    # head_dim 24 padded to 32, group of 5
    "cache-shorter-than-context": (1, 3, 16, 4, 2, 16, 37, 0, False),  # the op's contract: the last L positions
    "decode-two-blocks": (1, 1, 128, 4, 2, 16, 100, 0, False),      # default blocks split its 101 keys 2 ways
}


def _args(b, t, slots, hq, hkv, d, start, chunk, rope, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g).to(dtype)                    # noqa: E731
    positions = start + t + 1
    table = lambda: torch.randn(positions, d // 2, generator=g)                 # noqa: E731  cos / sin [P, D/2]
    return (rnd(b, t, hq * d), rnd(b, t, hkv * d), rnd(b, t, hkv * d), rnd(b, hkv, slots, d), rnd(b, hkv, slots, d),
            torch.tensor([start]), table(), table(), hq, hkv, d, rope, rope, chunk, not rope, 4.0, 0.1,
            1 / math.sqrt(d), 1e-5)


def _fused(blocks=None, n_split=None, inplace=False):
    """l4::attention_fused's body (``inplace``: l4::attention_fused_inplace's) with these blocks and splits."""
    from l4compile.kernels.layout import AttentionBlocks
    from l4compile.kernels.ops import fused_attention, fused_attention_inplace

    blocks = blocks or AttentionBlocks(16, 16, 16)
    return lambda *a: (fused_attention_inplace if inplace else fused_attention)(*a, blocks=blocks, n_split=n_split)


@pytest.mark.parametrize("n_split", [1, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_fused_attention_matches_reference(case, n_split):
    require_interpreter()
    from l4compile.kernels.layout import AttentionBlocks

    args = _args(*CASES[case])
    d = CASES[case][5]
    ref = attention_cached_impl(*args)
    blocks = AttentionBlocks(16, 16, max(16, 1 << (d - 1).bit_length()))      # head_dim padded to a power of 2
    out = attention_cached_impl(*args, fused_attend=_fused(blocks, n_split))
    assert out[0].shape == ref[0].shape and rel_err(out[0], ref[0]) < TOL[torch.float32]
    assert torch.equal(out[1], ref[1]) and torch.equal(out[2], ref[2])          # the cache update is the reference's


@pytest.mark.parametrize("n_split", [1, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_fused_attention_inplace_writes_the_new_caches(case, n_split):
    """l4::attention_fused_inplace's body: from q as projected (its RoPE and qk-norm, or temperature, applied in the
    partial kernel) the functional op's output on q transformed by the reference, and the caches it is given updated
    to the reference's new caches (only the last L tokens where T > L), by its combine launch, which also runs with
    one split, where there is nothing to merge; the functional op leaves the caches as they were."""
    require_interpreter()
    from l4compile.kernels.layout import AttentionBlocks

    args = _args(*CASES[case])
    blocks = AttentionBlocks(16, 16, max(16, 1 << (CASES[case][5] - 1).bit_length()))
    ref = attention_cached_impl(*args)
    kc, vc = args[3].clone(), args[4].clone()
    plain = attention_cached_impl(*args, fused_attend=_fused(blocks, n_split))
    assert torch.equal(args[3], kc) and torch.equal(args[4], vc)
    assert not torch.equal(kc, ref[1]) and not torch.equal(vc, ref[2])          # the step does change them
    out = attention_cached_impl(*args[:3], kc, vc, *args[5:], fused_attend=_fused(blocks, n_split, inplace=True),
                                fused_inplace=True)
    assert out[1] is kc and out[2] is vc
    assert torch.equal(kc, ref[1]) and torch.equal(vc, ref[2])
    # the same tiles and splits on a q the kernel transformed (its rms mean sums in another order: float32 ulps)
    assert rel_err(out[0], plain[0]) < 1e-6 and rel_err(out[0], ref[0]) < TOL[torch.float32]


@pytest.mark.parametrize("n_split", [1, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_fused_attention_chained_merges_in_its_partial_kernel(case, n_split):
    """l4::attention_fused_chained's body: the in-place op's output, bit for bit, and its caches, with the split
    merge and (S > 1) the cache write done by the partial kernel's last programs; over several row blocks
    ("prompt-longer-than-ring", 3 of them at S = 3) the cache is written by the last of them to merge. Its
    counters are left zeros and the next launch's block is zeroed (it came as garbage)."""
    require_interpreter()
    from l4compile.kernels.layout import SPLIT_K_LOCK_WORDS, AttentionBlocks
    from l4compile.kernels.ops import fused_attention_inplace

    args = _args(*CASES[case])
    blocks = AttentionBlocks(16, 16, max(16, 1 << (CASES[case][5] - 1).bit_length()))
    ref = attention_cached_impl(*args)
    kc, vc = args[3].clone(), args[4].clone()
    plain = attention_cached_impl(*args[:3], kc, vc, *args[5:], fused_attend=_fused(blocks, n_split, inplace=True),
                                  fused_inplace=True)[0]
    lock = torch.zeros(SPLIT_K_LOCK_WORDS, dtype=torch.int32)
    nxt = torch.full((SPLIT_K_LOCK_WORDS,), -7, dtype=torch.int32)
    kc, vc = args[3].clone(), args[4].clone()

    def chained(*a):
        out, next_lock = fused_attention_inplace(*a, blocks=blocks, n_split=n_split, lock=lock, next_lock=nxt)
        assert next_lock is nxt
        return out
    out = attention_cached_impl(*args[:3], kc, vc, *args[5:], fused_attend=chained, fused_inplace=True)[0]
    assert torch.equal(out, plain)
    assert torch.equal(kc, ref[1]) and torch.equal(vc, ref[2])
    assert not lock.any() and not nxt.any()


def test_fused_attention_chained_refuses_a_bad_lock():
    require_interpreter()
    from l4compile.kernels.layout import AttentionBlocks
    from l4compile.kernels.ops import fused_attention_inplace

    args = list(_args(*CASES["decode"]))
    q, k, v = (x.view(1, 1, -1, 16).transpose(1, 2) for x in args[:3])
    rest = (*args[3:8], 4, 2, 16, 0.25, True, True, False, 4.0, 0.1, 1e-5)
    with pytest.raises(ValueError, match=r"attention_fused_chained: lock must be \[4096\] int32 zeros on cpu, got "
                                         r"\[16\] torch.int32"):
        fused_attention_inplace(q, k, v, *rest, lock=torch.zeros(16, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"2 row blocks x 2048 \(batch, kv head\) pairs and 2 splits need 6144 "
                                         r"counters, more than 4096"):
        qb = torch.zeros(1024, 4, 9, 16)                            # B 1024, Hkv 2, R*T = 18 rows: 2 row blocks
        kb, cache = torch.zeros(1024, 2, 9, 16), torch.zeros(1024, 2, 16, 16)
        fused_attention_inplace(qb, kb, kb, cache, cache, *args[5:8], 4, 2, 16, 0.25, True, True, False, 4.0, 0.1,
                                1e-5, blocks=AttentionBlocks(16, 16, 16), n_split=2,
                                lock=torch.zeros(4096, dtype=torch.int32))


def test_fused_attention_inplace_refuses_tables_of_another_head_dim():
    require_interpreter()
    from l4compile.kernels.ops import fused_attention_inplace

    args = list(_args(*CASES["decode"]))                      # head_dim 16: tables [P, 8]
    q, k, v = (x.view(1, 1, -1, 16).transpose(1, 2) for x in args[:3])
    for cos, sin in ((args[6][:, :4], args[7][:, :4]), (args[6], args[7][:3])):
        with pytest.raises(ValueError, match=r"cos / sin must be \[positions, 8\], got"):
            fused_attention_inplace(q, k, v, *args[3:6], cos, sin, 4, 2, 16, 0.25, True, True, False, 4.0, 0.1, 1e-5)


def test_fused_attention_refuses_a_scaling_not_above_zero():
    """The kernel keeps each row's largest unscaled score and scales in the exponent: that is the largest scaled
    score only for a positive scaling (Llama 4's is head_dim ** -0.5)."""
    require_interpreter()
    from l4compile.kernels.ops import fused_attention

    args = list(_args(*CASES["decode"]))
    q, k, v = (x.view(1, 1, -1, 16).transpose(1, 2) for x in args[:3])
    for scaling in (0.0, -0.25, float("nan")):
        with pytest.raises(ValueError, match=rf"attention_fused: scaling must be > 0, got {scaling}"):
            fused_attention(q, k, v, *args[3:6], 4, 2, 16, scaling)


@pytest.mark.parametrize("chained", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_attention_cached_in_place(dtype, chained):
    """What a CUDA engine's step runs for each layer (``dispatch.attention_cached_in_place``, default blocks and
    splits): the attention output alone, with the caches it is given updated to l4::attention_cached's new caches,
    by l4::attention_fused_inplace (float32, bfloat16: RoPE + qk-norm and NoPE temperature cases), or by copying the
    reference's into them (float64, no kernel). Chained (``attention_cached_chained``, l4::attention_fused_chained):
    the same, and a block of zeroed counters for the next launch (without the kernel, the one it was given)."""
    require_interpreter()
    from l4compile.kernels.dispatch import attention_cached_chained, attention_cached_in_place
    from l4compile.kernels.layout import SPLIT_K_LOCK_WORDS

    for case in ("decode-wrapped-ring", "chunked-prefill", "prompt-longer-than-ring", "nope-decode-odd-dim",
                 "decode-two-blocks"):
        args = _args(*CASES[case], dtype=dtype)
        ref = attention_cached_impl(*args)
        if chained:
            lock = torch.zeros(SPLIT_K_LOCK_WORDS, dtype=torch.int32)
            out, nxt = attention_cached_chained(*args, lock)
            assert not lock.any() and not nxt.any() and nxt.shape == lock.shape
            assert (nxt is lock) == (dtype == torch.float64)
        else:
            out = attention_cached_in_place(*args)
        assert isinstance(out, torch.Tensor) and out.dtype == dtype
        assert rel_err(out, ref[0]) < TOL.get(dtype, TOL[torch.float32]), case
        assert torch.equal(args[3], ref[1]) and torch.equal(args[4], ref[2]), case


def test_fused_attention_bfloat16():
    require_interpreter()
    args = _args(*CASES["chunked-prefill"], dtype=torch.bfloat16)
    out = attention_cached_impl(*args, fused_attend=_fused(n_split=2))[0]
    assert out.dtype == torch.bfloat16 and rel_err(out, attention_cached_impl(*args)[0]) < TOL[torch.bfloat16]


def test_fused_attention_reads_only_visible_keys():
    """A decode step at position 21 of a 64-slot global cache sees slots 0..20, and one at position 37 of a 16-slot
    chunked ring sees slots 0..4 (positions 32..36; slots 5..15 hold positions 21..31, the previous chunk), besides
    its own new key. NaN in every other slot: the masked reference multiplies it into the output, the kernel must
    never load it."""
    require_interpreter()
    for case, visible in (((1, 1, 64, 4, 2, 16, 21, 0, False), 21), ((1, 1, 16, 4, 2, 16, 37, 16, True), 5)):
        args = list(_args(*case))
        clean = attention_cached_impl(*args)[0]
        for i in (3, 4):
            args[i] = args[i].clone()
            args[i][:, :, visible:] = float("nan")
        assert attention_cached_impl(*args)[0].isnan().all()                    # what reading them would do
        out = attention_cached_impl(*args, fused_attend=_fused(n_split=2))[0]
        assert not out.isnan().any() and rel_err(out, clean) < TOL[torch.float32]


@pytest.mark.parametrize("n_split", [1, 3])
def test_decode_rows_take_the_short_tile(n_split, monkeypatch):
    """With BM 64, a step whose R*T rows fit ATTENTION_DECODE_BLOCK_M (16) runs them as one 16-row tile, and a taller
    step keeps BM 64: the tile height each program used, and outputs a BM 16 run's (rows are independent), to float32
    rounding: the interpreter's dot is numpy's matmul, whose BLAS may sum a row in another order at another tile
    height (numpy 2.4.6 does for the 40-row prompt; bit for bit before)."""
    require_interpreter()
    from l4compile.kernels import attention
    from l4compile.kernels.layout import ATTENTION_DECODE_BLOCK_M, AttentionBlocks

    heights = []
    inner = attention._attend_rows

    def recorded(*a):
        heights.append(int(a[-8]))               # BLOCK_M: 8th from the end (then BN, BD, 2 dot and 3 q modes)
        return inner(*a)

    monkeypatch.setattr(attention, "_attend_rows", recorded)
    # (case, R*T rows): decode 2 x 1, chunked-prefill 2 x 7, nope-decode 5 x 1, a prompt 2 x 20
    for case, rows in (("decode", 2), ("chunked-prefill", 14), ("nope-decode-odd-dim", 5),
                       ("prompt-longer-than-ring", 40)):
        args = _args(*CASES[case])
        bd = max(16, 1 << (CASES[case][5] - 1).bit_length())
        heights.clear()
        tall = attention_cached_impl(*args, fused_attend=_fused(AttentionBlocks(64, 16, bd), n_split))[0]
        want = ATTENTION_DECODE_BLOCK_M if rows <= ATTENTION_DECODE_BLOCK_M else 64
        assert heights and set(heights) == {want}, case
        short = attention_cached_impl(*args, fused_attend=_fused(AttentionBlocks(16, 16, bd), n_split))[0]
        assert rel_err(tall, short) < 1e-6, (case, rel_err(tall, short))
        assert rel_err(tall, attention_cached_impl(*args)[0]) < TOL[torch.float32], case


@pytest.mark.parametrize("case, n_split, tiles", [
    ("decode-two-blocks", 1, [(0, False), (16, False), (32, False), (48, False), (64, False), (80, False),
                              (96, True)]),                              # 101 keys: 6 whole tiles, then the edge
    ("decode-two-blocks", 3, [(0, False), (16, False), (32, False), (48, False), (64, False), (80, False),
                              (96, True)]),                              # splits of 48 keys: [0, 48) [48, 96) [96, 101)
    ("chunk-ends-a-tile", 1, [(0, True), (16, True)]),                  # rows 16, 17 must not see keys 0..15
    # keys 0..19, 3 row blocks of 16 of the 4 heads x 9 tokens (positions 11..19): the first two hold a row at 11,
    # the last one (head 3, positions 16..19) sees keys 0..15 whole
    ("nope-global", 1, [(0, False), (0, True), (16, True)]),
])
def test_tiles_every_row_sees_take_no_mask(case, n_split, tiles, monkeypatch):
    """The key tiles of a row block run unmasked where every row sees every key of the tile (after the last row's
    chunk start, up to the first row's own position, inside the split), masked elsewhere: the (first key, masked)
    pairs the programs took, with BN 16, and the output still the reference's."""
    require_interpreter()
    from l4compile.kernels import attention
    from l4compile.kernels.layout import AttentionBlocks

    taken = []
    inner = attention._attend_tile

    def recorded(*a):
        taken.append((int(a[4]), bool(a[-4])))   # p0, masked (then BN, the dot modes)
        return inner(*a)

    monkeypatch.setattr(attention, "_attend_tile", recorded)
    args = _args(*CASES[case])
    out = attention_cached_impl(*args, fused_attend=_fused(AttentionBlocks(16, 16, 16), n_split))[0]
    assert sorted(set(taken)) == tiles
    assert rel_err(out, attention_cached_impl(*args)[0]) < TOL[torch.float32]


def test_attention_splits():
    """Decode at batch 1 fills the GPU with key splits; prefill and large batches get one; small caches are capped
    at one split per BN keys."""
    from l4compile.kernels.layout import attention_blocks, attention_splits

    bn = attention_blocks(128).block_n
    assert attention_splits(1, 1, 8, 8192, bn) == 32                 # Scout decode, batch 1: 8 (b, kv head) pairs
    assert attention_splits(1, 8, 8, 8192, bn) == 4
    assert attention_splits(1, 32, 8, 8192, bn) == 1
    assert attention_splits(640, 1, 8, 8192, bn) == 1                # an 8K-token prefill
    assert attention_splits(1, 1, 8, 128, bn) == 2                   # 128 slots: 2 blocks of 64
    assert attention_splits(1, 1, 2, 16, bn) == 1
    with pytest.raises(ValueError, match="head_dim 512"):
        attention_blocks(512)


def _tiny_steps_against_graph(prog, run) -> tuple[float, int]:
    """The tiny step graph ``prog`` and ``run(input ids, start [1], caches) -> (logits, new caches)`` side by side,
    each from its own empty caches, through a 13-token prefill and 7 decode steps of a batch of 2 (through the
    chunk-16 ring's wrap): ``run``'s new caches within 1e-5 of the graph's at every step. -> (largest logits error,
    steps)."""
    _, n_kv, _, d = prog.kv_layout["shape"]
    new_caches = lambda: [torch.zeros(2, n_kv, layer["slots"], d)                  # noqa: E731
                          for layer in prog.kv_layout["layers"] for _ in (0, 1)]
    ids = torch.randint(0, prog.model_config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    steps = [(ids[:, :13], 0)] + [(ids[:, i:i + 1], i) for i in range(13, 20)]
    ref_c, caches, worst = new_caches(), new_caches(), 0.0
    with torch.no_grad():
        for x, start in steps:
            pos = torch.tensor([start])
            ref = prog.gm(x, pos, *ref_c)
            logits, caches = run(x, pos, caches)
            ref_c = list(ref[1:])
            worst = max(worst, rel_err(logits, ref[0]))
            assert all(rel_err(c, r) < 1e-5 for c, r in zip(caches, ref_c, strict=True)), start
    return worst, len(steps)


def test_tiny_model_steps_with_fused_attention():
    """The tiny preset's step graph, every l4::attention_cached run with the kernel (what a CUDA engine compiles in):
    a 13-token prefill and 7 decode steps of a batch of 2, through the chunk-16 ring's wrap, against the graph as it
    is."""
    require_interpreter()
    from l4compile.compiler import lower
    from l4compile.config import CompileConfig
    from l4compile.progress import Progress

    prog = lower("tiny", CompileConfig(max_seq_len=40, max_batch_size=2), progress=Progress()).program
    fused_attend = _fused(n_split=2)
    calls = []

    class Fused(torch.fx.Interpreter):
        def call_function(self, target, args, kwargs):
            if target is torch.ops.l4.attention_cached.default:
                calls.append(target)
                return attention_cached_impl(*args, **kwargs, fused_attend=fused_attend)
            return super().call_function(target, args, kwargs)

    def run(x, pos, caches):
        logits, *new = Fused(prog.gm).run(x, pos, *caches)
        return logits, new

    worst, n_steps = _tiny_steps_against_graph(prog, run)
    assert len(calls) == n_steps * len(prog.kv_layout["layers"]) and worst < 1e-5


def test_cuda_engine_step_writes_caches_in_place(tmp_path, monkeypatch, launches):
    """The step graph a --device cuda Inductor engine compiles (backends.inductor: ``caches_in_place`` with
    ``attention_cached_in_place``, exported and decomposed for CUDA): every layer attends with
    l4::attention_fused_chained and nothing else touches a cache. As AOTInductor and the jit runtime take it
    (``mutations_in_place``; the jit runtime's ``in_place_module``), each of those calls writes its layer's cache
    inputs themselves and nothing copies a cache. In Int4, with every GEMM taken as one that may split K, the
    l4::int4_mm_chained calls (l4::int4_mm_rope_chained for a RoPE layer's qkv, which transforms k) and the
    attention calls between them hand each other their zeroed counters from one new_zeros block. As saved
    (program.pt2) and run here on CPU tensors under the interpreter, a 13-token prefill and 7 decode steps (batch 2,
    through the chunk-16 ring's wrap) give the step graph's logits and write its new caches into the caches given;
    so they do with the Int4 GEMMs' prefill blocks forced on (tiny's float32 GEMMs have none): the prefill's 26 rows
    run them, the decode steps the decode blocks. Built in a process without the interpreter, which cannot trace
    the kernels."""
    require_interpreter()
    from l4compile.compiler import lower
    from l4compile.config import CompileConfig
    from l4compile.progress import Progress

    config = "CompileConfig(max_seq_len=40, max_batch_size=2, quant='int4')"
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import sys, torch
        from backends.inductor import export_for_aoti, in_place_module
        from l4compile.compiler import lower
        from l4compile.config import CompileConfig
        from l4compile.kernels import dispatch
        from l4compile.progress import Progress
        dispatch.int4_mm_splits = lambda w, s: True            # chain every Int4 GEMM (tiny's do not split)
        dispatch.int4_rope_splits = lambda *args: True         # the RoPE layers' qkv (l4::int4_mm_rope) too
        ep, in_place = export_for_aoti(lower("tiny", {config}, progress=Progress()).program, "cuda")
        assert in_place
        torch.export.save(ep, sys.argv[1])
        graph = in_place_module(torch.export.load(sys.argv[1])).graph      # as the jit runtime loads it
        print([n.target for n in graph.nodes if n.op == "call_module"])
        phs = [n.name for n in graph.nodes if n.op == "placeholder"]
        print([(str(n.target), [phs.index(a.name) if getattr(a, "op", "") == "placeholder" else None
                                for a in n.args[3:5]]) for n in graph.nodes if n.op == "call_function"])
        chained = (torch.ops.l4.int4_mm_chained.default, torch.ops.l4.int4_mm_rope_chained.default,
                   torch.ops.l4.attention_fused_chained.default)
        calls = [n for n in graph.nodes if n.target in chained]           # each takes its counters last
        print([[str(u.target) for u in n.users] for n in calls])
        heads = lambda n: n.args[-1].target is torch.ops.aten.new_zeros.default        # the chain's fill
        print([(heads(n) if i == 0 else n.args[-1].args == (calls[i - 1], 1), len(n.args[-1].users), str(n.target))
               for i, n in enumerate(calls)])
        """), str(tmp_path / "program.pt2")], capture_output=True, text=True, cwd=ROOT, timeout=600,
        env={**os.environ, "TRITON_INTERPRET": "0", "PYTHONWARNINGS": "ignore"})
    assert p.returncode == 0, p.stderr[-3000:]
    prog = lower("tiny", eval(config), progress=Progress()).program                 # the same seeded weights
    n_layers = len(prog.kv_layout["layers"])
    *_, guard_calls, calls, chain_users, chain = p.stdout.strip().splitlines()
    calls = eval(calls)                                                             # (target, [cache inputs])
    # 2 Int4 GEMMs a layer (the fused qkv, o_proj; the MoE runs its own kernels) and the attention between them,
    # each block of counters from the one before it and read once
    chain = eval(chain)
    assert [(first, users) for first, users, _ in chain] == [(True, 1)] * 3 * n_layers, chain
    # the 3 RoPE layers' qkv transforms k in its epilogue (backends.qkv_rope_fused), the NoPE layer's does not
    qkv = ["l4.int4_mm_rope_chained.default"] * (n_layers - 1) + ["l4.int4_mm_chained.default"]
    assert [t for *_, t in chain] == [t for q in qkv for t in (q, "l4.attention_fused_chained.default",
                                                               "l4.int4_mm_chained.default")]
    assert all(set(u) <= {"<built-in function getitem>"} for u in eval(chain_users))
    assert [t for t, _ in calls].count("aten.new_zeros.default") == 1
    assert not {"l4.int4_mm.default", "l4.int4_mm_rope.default"} & {t for t, _ in calls}
    first_cache = len(prog.gm.graph.find_nodes(op="placeholder")) - 2 * n_layers
    assert [c for t, c in calls if t == "l4.attention_fused_chained.default"] == [
        [first_cache + 2 * i, first_cache + 2 * i + 1] for i in range(n_layers)]
    assert not [t for t, _ in calls if t in ("aten.copy_.default", "aten.clone.default", "aten.index_copy.default",
                                             "l4.attention_fused.default", "l4.attention_fused_inplace.default",
                                             "auto_functionalized_v2")]
    # as the jit runtime loads it (in_place_module): the decomposed CUDA graph records guards from its example step
    # (T > 1, B != 1) that ep.module() asserts on every call, and torch.compile with it: a decode step at T = 1
    # fails them ("Guard failed: 64 * input_ids.size()[1] > 64"). AOTInductor never checked them
    program = torch.export.load(tmp_path / "program.pt2")
    assert any("input_ids" in g for g in program._guards_code)           # what module() would have asserted
    assert eval(guard_calls) == []                                       # in_place_module calls no _guards_fn
    step = program.module(check_guards=False)                           # in_place_module's, traced here

    worst, _ = _tiny_steps_against_graph(prog, lambda x, pos, caches: (step(x, pos, *caches), caches))
    assert worst < 1e-5                                 # and the caches given updated in place, step by step
    from l4compile.kernels import ops
    from l4compile.kernels.layout import Int4Blocks

    tall = Int4Blocks(32, 32, 32, True)
    monkeypatch.setattr(ops, "INT4_PREFILL_ROWS", 8)
    monkeypatch.setattr(ops, "int4_prefill_blocks", lambda *a: tall)
    monkeypatch.setattr(ops, "moe_int4_prefill_blocks", lambda *a: (tall, tall))
    launches.clear()
    worst, _ = _tiny_steps_against_graph(prog, lambda x, pos, caches: (step(x, pos, *caches), caches))
    assert worst < 1e-5
    # 4 Int4 launches a layer a step (qkv, o_proj, the MoE's gate_up and down): the prefill's at BM 32, then 7 steps'
    int4 = [kw["BLOCK_M"] for name, _, kw in launches if "int4" in name]
    assert int4 == [32] * 4 * n_layers + [16] * 7 * 4 * n_layers, int4


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
def test_attention_cached_cuda_uses_the_kernel(case, dtype):
    """On CUDA, l4::attention_cached dispatches to the kernel (default blocks and splits)."""
    require_cuda_kernels()
    args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in _args(*CASES[case], dtype=dtype)]
    ref = attention_cached_impl(*args)
    out = torch.ops.l4.attention_cached(*args)
    assert rel_err(out[0], ref[0]) < {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    assert torch.equal(out[1], ref[1])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
def test_attention_cached_in_place_cuda(case, dtype):
    """On CUDA, what an engine's step runs (l4::attention_fused_inplace, default blocks and splits): the caches given
    become the reference's new caches exactly, the output the reference's."""
    require_cuda_kernels()
    from l4compile.kernels.dispatch import attention_cached_in_place

    args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in _args(*CASES[case], dtype=dtype)]
    ref = attention_cached_impl(*args)
    out = attention_cached_in_place(*args)
    assert rel_err(out, ref[0]) < {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    assert torch.equal(args[3], ref[1]) and torch.equal(args[4], ref[2])


@pytest.mark.gpu
def test_attention_fused_cuda_scout_decode():
    """Scout's attention (40/8 heads x 128, bf16) decoding at positions 511 and 8191 of an 8K cache."""
    require_cuda_kernels()
    for start in (511, 8191):
        args = [a.cuda() if isinstance(a, torch.Tensor) else a
                for a in _args(1, 1, 8192, 40, 8, 128, start, 0, False, dtype=torch.bfloat16)]
        assert rel_err(torch.ops.l4.attention_cached(*args)[0], attention_cached_impl(*args)[0]) < 2e-2


def test_attention_merge_can_be_turned_off(monkeypatch):
    """L4COMPILE_ATTENTION_MERGE=0 builds a CUDA engine whose attention merges its key splits in a second launch, as
    before l4::attention_fused_chained (to time a decode step both ways: gpu_session.sh attnmerge)."""
    from backends.inductor import attention_merge_enabled

    assert attention_merge_enabled()
    monkeypatch.setenv("L4COMPILE_ATTENTION_MERGE", "0")
    assert not attention_merge_enabled()
    monkeypatch.setenv("L4COMPILE_ATTENTION_MERGE", "1")
    assert attention_merge_enabled()


@pytest.mark.gpu
@pytest.mark.parametrize("batch,t,start", [(1, 1, 511), (1, 1, 8191), (8, 1, 4000), (1, 40, 300), (1, 200, 7000)])
def test_attention_fused_chained_cuda_scout(batch, t, start):
    """What a CUDA engine's chained step runs (l4::attention_fused_chained, default blocks and splits) at Scout's
    widths: decode (32 and 4 key splits merged in the partial kernel), a 40-token step (4 row blocks, 8 splits) and
    a 200-token one (16 row blocks, 2 splits): the cache written by the last row block merged, on a GPU's concurrent
    programs: the reference's output and new caches, the counters left zeros and the next block zeroed, through
    three launches on one block."""
    require_cuda_kernels()
    from l4compile.kernels.dispatch import attention_cached_chained
    from l4compile.kernels.layout import SPLIT_K_LOCK_WORDS

    lock = torch.zeros(SPLIT_K_LOCK_WORDS, dtype=torch.int32, device="cuda")
    for seed in range(3):
        args = [a.cuda() if isinstance(a, torch.Tensor) else a
                for a in _args(batch, t, 8192, 40, 8, 128, start, 0, False, dtype=torch.bfloat16, seed=seed)]
        ref = attention_cached_impl(*args)
        out, nxt = attention_cached_chained(*args, lock)
        assert rel_err(out, ref[0]) < 2e-2
        assert torch.equal(args[3], ref[1]) and torch.equal(args[4], ref[2])
        assert not lock.any().item() and not nxt.any().item()
