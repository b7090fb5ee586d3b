"""The pure-PyTorch side of the GPU kernels (no Triton needed): the MoE tile layout, block choices, the FP8
``_scaled_mm`` path (torch 2.13 implements row-wise ``_scaled_mm`` on CPU too), the CUDA registration leaving
CPU results unchanged, importing without Triton, and the CUDA decompositions tracing with a symbolic token count."""
# T tokens, E experts, K top-k, BM tile rows
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from l4compile.kernels.fp8_scaled_mm import cpu_rowwise_scaled_mm, linear_fp8_scaled_mm, scaled_mm_supported
from l4compile.kernels.layout import int4_blocks, moe_rows, num_tiles
from l4compile.ops.moe import _moe_impl
from l4compile.ops.quant import _linear_fp8_impl, _linear_int4_impl
from l4compile.quant import quantize_fp8, quantize_int4

from .conftest import rel_err, require_cuda_kernels, require_interpreter

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("n_tok,n_exp,top_k,bm", [(0, 4, 1, 16), (1, 16, 1, 64), (37, 5, 2, 4), (50, 3, 1, 8)])
def test_moe_rows_tiles_cover_every_row_once(n_tok, n_exp, top_k, bm):
    g = torch.Generator().manual_seed(n_tok)
    logits = torch.randn(n_tok, n_exp, generator=g)
    if n_tok > 10:
        logits[:, 1] = -1e9                                        # expert 1 gets no token
    val, idx = logits.topk(top_k, dim=1)
    score = torch.sigmoid(val)
    rows = moe_rows(idx, score, n_exp, bm)
    n_rows = n_tok * (top_k + 1)
    assert rows.tile_group.shape == (num_tiles(n_rows, n_exp + 1, bm),)
    seen = torch.zeros(n_rows, dtype=torch.int64)
    row_group = torch.cat((idx.reshape(-1).sort(stable=True).values, torch.full((n_tok,), n_exp)))
    for grp, r0, end in zip(rows.tile_group.tolist(), rows.tile_row0.tolist(), rows.tile_row_end.tolist()):
        if grp == n_exp + 1:
            continue                                               # unused tile
        assert r0 < end and grp <= n_exp
        block = torch.arange(r0, min(r0 + bm, end))
        seen[block] += 1
        assert (row_group[block] == grp).all()                     # a tile never straddles groups
    assert (seen == 1).all()
    a = n_tok * top_k
    assert torch.equal(rows.row_tok[a:], torch.arange(n_tok, dtype=torch.int32))     # shared rows: every token
    assert (rows.row_scale[a:] == 1).all()
    # routed rows: row r reads its token's score for the expert of the row
    for r in range(a):
        t = int(rows.row_tok[r])
        k = int((idx[t] == row_group[r]).nonzero()[0])
        assert rows.row_scale[r] == score[t, k]
        assert rows.routed_row[t * top_k + k] == r                # the combine's gather finds the row again


@pytest.mark.parametrize("bm", [1, 4, 16])
def test_num_tiles_bounds_every_routing_and_is_reached(bm):
    """NT = (R + min(G, R) * (BM - 1)) // BM holds the tiles of any split of R rows into G groups, and some split
    needs every one of them (so it is the least static bound): every group that holds a row holding one row more
    than a multiple of BM. A decode step of a top-1 MoE (R = 2: one routed row, one shared) gets its 2 tiles."""
    tiles = lambda counts: sum((c + bm - 1) // bm for c in counts)
    g = torch.Generator().manual_seed(bm)
    for groups in (1, 2, 17, 129):
        for rows in (0, 1, 2, 3, 16, 17, 33, 200, 4096):
            bound = num_tiles(rows, groups, bm)
            for _ in range(20):                                    # random splits of the rows over the groups
                counts = torch.bincount(torch.randint(groups, (rows,), generator=g), minlength=groups).tolist()
                assert tiles(counts) <= bound
            k = min(groups, rows)                                  # worst split: k groups, k-1 of 1 + m*BM rows
            if k:
                worst = [1 + ((rows - k) // bm // k) * bm] * (k - 1)
                worst.append(rows - sum(worst))
                assert tiles(worst) <= bound
                if (rows - k) % bm == 0 and (rows - k) // bm % k == 0:
                    assert tiles(worst) == bound                  # reached
    assert num_tiles(2, 17, 16) == 2 and num_tiles(2, 129, 16) == 2      # Scout / Maverick decode
    assert num_tiles(2 * 2048, 17, 16) == (4096 + 17 * 15) // 16         # prefill: about R / BM + G as before


def test_split_k_plan_splits_decode_and_not_prefill():
    """S <= split_k slices of whole K blocks, as many as SPLIT_K_PARTIAL_BYTES of float32 partials allow: Scout's
    q_proj (N 5120, 40 K blocks) and the MoE gate_up (2I = 16384 partial columns) split at decode, not in prefill;
    and the same expression over a SymInt row count, without a guard."""
    from l4compile.kernels.layout import SPLIT_K_PARTIAL_BYTES, split_k_plan

    assert split_k_plan(1, 5120, 5120, 128, 8) == (8, 5 * 128)
    assert split_k_plan(1, 5120, 5120, 128, 1) == (1, 5120)                 # the default: never split
    assert split_k_plan(1, 5120, 5120, 128, 3) == (3, 14 * 128)             # 40 blocks as 14 + 14 + 12
    assert split_k_plan(1, 96, 96, 32, 8) == (3, 32)                        # at most one split per K block
    assert split_k_plan(1, 256, 256, 32, 6) == (4, 64)                      # 8 blocks as 2+2+2+2, no split empty
    assert split_k_plan(1, 5120, 5120, 256, 8) == (7, 3 * 256)              # Scout's 20 word steps: 6 x 3 + 2
    assert split_k_plan(1, 5120, 5120, 256, 16) == (10, 2 * 256)            # a widened SK16: 10 x 2, not 16
    assert split_k_plan(8192, 5120, 5120, 128, 8) == (1, 5120)              # prefill: 160 MiB a split
    assert split_k_plan(64, 16384, 5120, 128, 8) == (4, 10 * 128)           # 4 MiB a split: 4 fit 16 MiB
    assert split_k_plan(0, 5120, 5120, 128, 8) == (8, 5 * 128)              # no rows: nothing to hold
    for rows in (1, 2, 17, 64, 300, 4096):
        for n_out, k_in, split in ((5120, 5120, 8), (16384, 5120, 4), (5120, 8192, 8), (1024, 5120, 6)):
            s, k_split = split_k_plan(rows, n_out, k_in, 128, split)
            assert 1 <= s <= split and k_split == -(-(k_in // 128) // s) * 128              # cdiv(K blocks, S)
            assert rows > 64 or (s - 1) * k_split < k_in                                   # decode: none empty
            assert s == 1 or s * rows * n_out * 4 <= SPLIT_K_PARTIAL_BYTES
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    from torch._dynamo.source import ConstantSource

    env = ShapeEnv()
    t = env.create_symintnode(env.create_symbol(5, ConstantSource("T")), hint=5)
    s, k_split = split_k_plan(2 * t, 16384, 5120, 128, 8)
    assert "Min(" in str(s) and not env.guards                               # a SymInt expression, no guard on T


def test_split_k_plan_counts_chained_counters():
    """A chained GEMM (l4::int4_mm_chained) has SPLIT_K_LOCK_WORDS counters: S = 1 where its output tiles outnumber
    them, the plan as before where they fit; over a SymInt tile count, still without a guard."""
    from l4compile.kernels.layout import SPLIT_K_LOCK_WORDS, split_k_plan

    assert SPLIT_K_LOCK_WORDS >= 3157                                        # Scout's Int4 lm_head at decode (BN 64)
    assert split_k_plan(1, 5120, 5120, 128, 8, 80, SPLIT_K_LOCK_WORDS) == (8, 5 * 128)
    assert split_k_plan(1, 5120, 5120, 128, 8, SPLIT_K_LOCK_WORDS, SPLIT_K_LOCK_WORDS) == (8, 5 * 128)
    assert split_k_plan(1, 5120, 5120, 128, 8, SPLIT_K_LOCK_WORDS + 1, SPLIT_K_LOCK_WORDS) == (1, 40 * 128)
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    from torch._dynamo.source import ConstantSource

    env = ShapeEnv()
    t = env.create_symintnode(env.create_symbol(5, ConstantSource("T")), hint=5)
    s, _ = split_k_plan(t, 5120, 5120, 128, 8, ((t + 15) // 16) * 80, SPLIT_K_LOCK_WORDS)
    assert "Min(" in str(s) and not env.guards


def test_int4_blocks():
    assert int4_blocks(5120, 5120, 128) == int4_blocks(5120, 5120, 128)
    b = int4_blocks(5120, 5120, 128)
    assert (b.block_k, b.scale_per_block) == (128, True)
    assert (int4_blocks(33, 96, 32).block_k, int4_blocks(33, 96, 32).scale_per_block) == (32, True)
    assert int4_blocks(16, 48, 12).scale_per_block is False and int4_blocks(16, 30, 6).block_k == 32
    with pytest.raises(ValueError):
        int4_blocks(16, 100, 128)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_scaled_mm_matches_reference_on_cpu(dtype):
    if not cpu_rowwise_scaled_mm():
        pytest.skip(f"torch {torch.__version__}'s CPU _scaled_mm takes per-tensor scales only")
    g = torch.Generator().manual_seed(0)
    w_q, w_scale = quantize_fp8(torch.randn(48, 64, generator=g))
    x = torch.randn(2, 5, 64, generator=g).to(dtype)
    assert scaled_mm_supported(x, w_q, w_scale)
    out = linear_fp8_scaled_mm(x, w_q, w_scale)
    assert out.shape == (2, 5, 48) and out.dtype == dtype
    assert rel_err(out, _linear_fp8_impl(x, w_q, w_scale)) < {torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    assert not scaled_mm_supported(x[..., :40], quantize_fp8(torch.randn(48, 40))[0], w_scale)   # K % 16


def test_fp8_scaled_mm_hands_cublas_a_column_major_weight(monkeypatch):
    """cuBLASLt's FP8 GEMM (CUDA _scaled_mm) takes a column-major second operand. A per-expert slice of a transposed
    stack (what --verify quantizes) is row-major as w_q.t(); the kernel must lay it out first. The CPU op accepts
    either, so the layout is asserted on the call itself."""
    seen = []
    real = torch._scaled_mm

    def spy(a, b, **kw):
        seen.append((a.stride(1), b.stride(0)))
        return real(a, b, **kw)

    monkeypatch.setattr(torch, "_scaled_mm", spy)
    if not cpu_rowwise_scaled_mm():
        pytest.skip(f"torch {torch.__version__}'s CPU _scaled_mm takes per-tensor scales only")
    g = torch.Generator().manual_seed(0)
    stack, scales = quantize_fp8(torch.randn(2, 64, 48, generator=g).transpose(1, 2))   # [E, N, K], K not innermost
    w_q, w_scale = stack[1], scales[1]
    assert w_q.stride(1) != 1
    x = torch.randn(3, 64, generator=g)
    out = linear_fp8_scaled_mm(x, w_q, w_scale)
    assert seen == [(1, 1)]                       # a row-major, b column-major
    assert rel_err(out, _linear_fp8_impl(x, w_q, w_scale)) < 1e-5


def test_cuda_kernels_registered_and_cpu_unchanged():
    for op in ("l4::moe", "l4::linear_int4", "l4::linear_fp8"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), op
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    args = (r(9, 32), r(4, 32), r(4, 32, 48), r(4, 24, 32), r(24, 32), r(24, 32), r(32, 24))
    assert torch.equal(torch.ops.l4.moe(*args, 1), _moe_impl(*args, 1))
    wp, ws = quantize_int4(r(16, 64), 128)
    fq, fs = quantize_fp8(r(16, 64))
    x = r(3, 64)
    assert torch.equal(torch.ops.l4.linear_int4(x, wp, ws), _linear_int4_impl(x, wp, ws))
    assert torch.equal(torch.ops.l4.linear_fp8(x, fq, fs), _linear_fp8_impl(x, fq, fs))


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=ROOT,
                          timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore", **env})


def test_import_without_triton():
    """With triton unimportable, l4compile and its ops import, CPU ops run, and the kernels say why they cannot."""
    p = _python("""
        import sys
        sys.modules["triton"] = None                      # import triton -> ImportError
        import torch, l4compile, l4compile.ops
        from l4compile.kernels import triton_available, why_unavailable
        from l4compile.kernels.dispatch import cuda_decompositions, load_triton_ops
        assert not triton_available() and not load_triton_ops() and "pip install" in why_unavailable()
        assert set(cuda_decompositions()) == {torch.ops.l4.linear_fp8.default}
        x = torch.randn(2, 8)
        print(torch.ops.l4.moe(x, torch.randn(2, 8), torch.randn(2, 8, 6), torch.randn(2, 3, 8), torch.randn(3, 8),
                               torch.randn(3, 8), torch.randn(8, 3), 1).shape)
    """)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "torch.Size([2, 8])" in p.stdout


def test_cuda_decompositions_export_with_symbolic_tokens():
    """What the Inductor backend does for --device cuda, short of compiling: export with a dynamic token count, then
    decompose l4::moe / linear_int4 / linear_fp8 into the kernel ops. The triton_op bodies must trace with fake
    tensors (no host sync, no data-dependent shape, no guard on T). Runs without the interpreter (tracing only)."""
    from l4compile.kernels import why_unavailable

    if why_unavailable():
        pytest.skip(why_unavailable())
    p = _python("""
        import torch, l4compile.ops
        from l4compile.kernels.dispatch import cuda_decompositions
        from l4compile.quant import quantize_fp8, quantize_int4
        H, I, E = 32, 16, 3
        bufs = (torch.randn(E, H), torch.randn(E, H, 2 * I), torch.randn(E, I, H), torch.randn(I, H),
                torch.randn(I, H), torch.randn(H, I), *quantize_int4(torch.randn(48, H), 128),
                *quantize_fp8(torch.randn(H, 48)))
        class M(torch.nn.Module):
            def __init__(self):
                super().__init__()
                for i, t in enumerate(bufs):
                    self.register_buffer(f"b{i}", t)
            def forward(self, x):
                b = [getattr(self, f"b{i}") for i in range(len(bufs))]
                h = torch.ops.l4.moe(x, *b[:6], 1)
                return torch.ops.l4.linear_fp8(torch.ops.l4.linear_int4(h, b[6], b[7]), b[8], b[9])
        T = torch.export.Dim("T", min=1, max=4096)
        ep = torch.export.export(M(), (torch.randn(9, H),), dynamic_shapes={"x": {0: T}})
        ep = ep.run_decompositions(cuda_decompositions())
        print(sorted(str(n.target) for n in ep.graph.nodes if n.op == "call_function"
                     and ("l4" in str(n.target) or "scaled_mm" in str(n.target))))
        print([str(r) for r in ep.range_constraints.values()])
    """, TRITON_INTERPRET="0")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "['aten._scaled_mm.default', 'l4.int4_mm.default', 'l4.moe_fused.default']" in p.stdout
    assert "VR[1, 4096]" in p.stdout                                # T stayed symbolic over its whole range


def test_cuda_decompositions_export_moe_q_with_symbolic_tokens():
    """l4::moe_q in --device cuda engines: Int4 weights decompose to l4::moe_q_fused, FP8 weights to l4::moe_fp8_fused,
    decided from dtypes while T stays symbolic; and each body as Inductor traces it is aten host code + the routing
    kernel (one program) and the two GEMM kernels with a grid in T, no host sync. Tracing only."""
    from l4compile.kernels import why_unavailable

    if why_unavailable():
        pytest.skip(why_unavailable())
    p = _python("""
        import torch, l4compile.ops
        from l4compile.kernels.dispatch import cuda_decompositions
        from l4compile.kernels.ops import fused_moe_fp8, fused_moe_int4
        from l4compile.quant import quantize_fp8, quantize_int4
        H, I, E = 32, 16, 3
        experts = lambda quant: [t for w in (torch.randn(E, 2 * I, H), torch.randn(E, H, I), torch.randn(I, H),
                                             torch.randn(I, H), torch.randn(H, I)) for t in quant(w)]
        bufs = (torch.randn(E, H), *experts(quantize_int4), *experts(quantize_fp8))
        class M(torch.nn.Module):
            def __init__(self, body):
                super().__init__()
                self.body = body
                for i, t in enumerate(bufs):
                    self.register_buffer(f"b{i}", t)
            def forward(self, x):
                b = [getattr(self, f"b{i}") for i in range(len(bufs))]
                if self.body == "int4":
                    return fused_moe_int4(x, *b[:11], 1)
                if self.body == "fp8":
                    return fused_moe_fp8(x, b[0], *b[11:], 1)
                return torch.ops.l4.moe_q(torch.ops.l4.moe_q(x, *b[:11], 1), b[0], *b[11:], 2)
        T = torch.export.Dim("T", min=1, max=4096)
        for body in (None, "int4", "fp8"):
            ep = torch.export.export(M(body), (torch.randn(9, H),), dynamic_shapes={"x": {0: T}})
            ep = ep.run_decompositions(cuda_decompositions())
            calls = [n for n in ep.graph.nodes if n.op == "call_function"]
            print(sorted(str(n.target) for n in calls if "l4" in str(n.target) or "triton" in str(n.target)))
            print([str(getattr(g, "meta", {}).get("val", g)) for n in calls if "triton" in str(n.target)
                   for g in n.kwargs["grid"][0][:1]])
            print([str(r) for r in ep.range_constraints.values()], any("scalar_dense" in str(n.target) for n in calls))
    """, TRITON_INTERPRET="0")
    assert p.returncode == 0, p.stderr[-3000:]
    routed, grids, ranges, *bodies = p.stdout.strip().splitlines()[-9:]
    assert routed == "['l4.moe_fp8_fused.default', 'l4.moe_q_fused.default']"   # no opaque op left
    assert grids == "[]" and ranges == "['VR[1, 4096]'] False"
    for name, (body, body_grids, body_ranges) in zip(("int4", "fp8"), (bodies[:3], bodies[3:])):
        assert body == "['triton_kernel_wrapper_functional'" + ", 'triton_kernel_wrapper_functional'" * 2 + "]"
        route, gate_up, down = eval(body_grids)                                 # route (one program), gate_up, down
        assert "//16" in gate_up and "Min(" in down                         # NT = (2T + min(E+1, 2T) * 15) // 16
        # the GEMMs (Int4 and, since 2026-12-07, FP8) map a 1-token step themselves: no route program then
        # (moe_route.tile_span)
        assert re.fullmatch(r"Min\(1, s\d+ - 1\)", route), (name, route)
        assert body_ranges == "['VR[1, 4096]'] False"                           # T symbolic, no host sync


def test_split_k_gemms_export_with_symbolic_tokens():
    """Split-K blocks in an engine: the Int4 GEMV and both fused-MoE GEMMs trace with a symbolic token count, their
    split count (the grid's third axis) an expression in T (split at decode, not in prefill: ``split_k_plan``),
    with no guard on T and no host-side sum of partials (the kernels' last programs add them). The widths make S
    reach 1 inside T's range (Min(4, 4096 // T) at T <= 4096), where buffers sized S * min(1, S - 1) once made export
    guard on T through a contiguity check (is the size 0 or 1?). Tracing only."""
    from l4compile.kernels import why_unavailable

    if why_unavailable():
        pytest.skip(why_unavailable())
    p = _python("""
        import torch, l4compile.ops
        from l4compile.kernels.layout import Int4Blocks
        from l4compile.kernels.ops import fused_moe_int4, int4_matmul
        from l4compile.quant import quantize_int4
        H, I, E = 512, 128, 3        # H: two steps of 2G (word-loaded scales), I: four K blocks
        bufs = (torch.randn(E, H), *[t for w in (torch.randn(E, 2 * I, H), torch.randn(E, H, I), torch.randn(I, H),
                torch.randn(I, H), torch.randn(H, I)) for t in quantize_int4(w, 128)])
        b = Int4Blocks(16, 32, 32, True, 4)
        class M(torch.nn.Module):
            def __init__(self):
                super().__init__()
                for i, t in enumerate(bufs):
                    self.register_buffer(f"b{i}", t)
            def forward(self, x):
                w = [getattr(self, f"b{i}") for i in range(len(bufs))]
                return int4_matmul(fused_moe_int4(x, *w, 1, blocks=(b, b)), w[5], w[6], blocks=b)
        T = torch.export.Dim("T", min=1, max=4096)
        ep = torch.export.export(M(), (torch.randn(9, H),), dynamic_shapes={"x": {0: T}})
        calls = [n for n in ep.graph.nodes if n.op == "call_function"]
        kernels = [n for n in calls if "triton" in str(n.target)]
        print([str(getattr(g, "meta", {}).get("val", g)) for g in (n.kwargs["grid"][0][2] for n in kernels[1:])])
        print([str(r) for r in ep.range_constraints.values()], any("sum" in str(n.target) for n in calls))
    """, TRITON_INTERPRET="0")
    assert p.returncode == 0, p.stderr[-3000:]
    splits, ranges = p.stdout.strip().splitlines()[-2:]
    splits = eval(splits)
    assert len(splits) == 3 and all("Min(" in s and "s" in s for s in splits), splits   # gate_up, down, int4_mm
    assert ranges == "['VR[1, 4096]'] False"


def test_cuda_decompositions_keep_moe_opaque_where_the_kernel_does_not_apply():
    """A float64 l4::moe (no fused kernel for it) stays the op in a CUDA engine's graph instead of tracing the
    grouped fallback, whose host sync does not trace with a symbolic token count. Tracing only."""
    from l4compile.kernels import why_unavailable

    if why_unavailable():
        pytest.skip(why_unavailable())
    p = _python("""
        import torch, l4compile.ops
        from l4compile.kernels.dispatch import cuda_decompositions
        H, I, E = 32, 16, 3
        bufs = [t.double() for t in (torch.randn(E, H), torch.randn(E, H, 2 * I), torch.randn(E, I, H),
                                     torch.randn(I, H), torch.randn(I, H), torch.randn(H, I))]
        class M(torch.nn.Module):
            def __init__(self):
                super().__init__()
                for i, t in enumerate(bufs):
                    self.register_buffer(f"b{i}", t)
            def forward(self, x):
                return torch.ops.l4.moe(x, *[getattr(self, f"b{i}") for i in range(6)], 1)
        T = torch.export.Dim("T", min=1, max=4096)
        ep = torch.export.export(M(), (torch.randn(9, H).double(),), dynamic_shapes={"x": {0: T}})
        ep = ep.run_decompositions(cuda_decompositions())
        print(sorted(str(n.target) for n in ep.graph.nodes if n.op == "call_function" and "l4" in str(n.target)))
    """, TRITON_INTERPRET="0")
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip().splitlines()[-1] == "['l4.moe.default']"


def test_cuda_decompositions_export_attention_with_symbolic_tokens():
    """l4::attention_cached in --device cuda engines: its projection and cache update stay aten, its attention becomes
    l4::attention_fused (no cat of cache and new keys), with batch and tokens symbolic; the attention_fused body as
    Inductor traces it is the partial and combine kernels, the key splits a guard-free expression of the row count.
    Tracing only."""
    from l4compile.kernels import why_unavailable

    if why_unavailable():
        pytest.skip(why_unavailable())
    p = _python("""
        import torch, l4compile.ops
        from l4compile.kernels.dispatch import cuda_decompositions
        from l4compile.kernels.ops import fused_attention
        B, HQ, HKV, D, L = 2, 8, 2, 16, 4096
        class M(torch.nn.Module):
            def __init__(self, body):
                super().__init__()
                self.body = body
                self.register_buffer("cos", torch.randn(128, D // 2))
                self.register_buffer("sin", torch.randn(128, D // 2))
            def forward(self, q, k, v, kc, vc, start):
                if self.body:
                    heads = lambda x, h: x.view(x.shape[0], x.shape[1], h, D).transpose(1, 2)
                    return fused_attention(heads(q, HQ), heads(k, HKV), heads(v, HKV), kc, vc, start, HQ, HKV, 16, 0.25)
                return torch.ops.l4.attention_cached(q, k, v, kc, vc, start, self.cos, self.sin, HQ, HKV, D, True,
                                                     True, 16, False, 8192.0, 0.1, 0.25, 1e-5)
        T, Bd = torch.export.Dim("T", min=1, max=64), torch.export.Dim("B", min=1, max=4)
        args = (torch.randn(B, 9, HQ * D), torch.randn(B, 9, HKV * D), torch.randn(B, 9, HKV * D),
                torch.randn(B, HKV, L, D), torch.randn(B, HKV, L, D), torch.tensor([3]))
        shapes = ({0: Bd, 1: T}, {0: Bd, 1: T}, {0: Bd, 1: T}, {0: Bd}, {0: Bd}, None)
        for body in (False, True):
            ep = torch.export.export(M(body), args, dynamic_shapes=shapes).run_decompositions(cuda_decompositions())
            calls = [n for n in ep.graph.nodes if n.op == "call_function"]
            print(sorted({str(n.target) for n in calls if "l4" in str(n.target) or "triton" in str(n.target)
                          or "cat" in str(n.target) or "attention" in str(n.target)}))
            print([[str(getattr(x, "meta", {}).get("val", x)) for x in n.kwargs["grid"][0]] for n in calls
                   if "triton" in str(n.target)])
            print(sorted(str(r) for r in ep.range_constraints.values()))
    """, TRITON_INTERPRET="0")
    assert p.returncode == 0, p.stderr[-3000:]
    routed, _, ranges, body, splits, body_ranges = p.stdout.strip().splitlines()[-6:]
    assert routed == "['l4.attention_fused.default']"                  # no aten.cat, no SDPA, no attention_cached
    assert body == "['triton_kernel_wrapper_functional']"               # partial + combine
    # S = max(1, min(32, 264 // (row blocks * B * Hkv))), row blocks = ceil(4T / 64) (the 4 query heads a kv head has)
    partial, combine = eval(splits)                                     # the two grids, as strings
    assert len(partial) == 3 and partial[2].startswith("Max(1, Min(32, (132//(") and "4*s" in partial[2]
    assert combine[1] == partial[1] and combine[2:] in ([], ["1"])
    # combine: ceil(4T / 16) tiles of DECODE_M rows, times min(1, S - 1): no programs when one split wrote the output
    t = partial[0][len("((4*"):partial[0].index(" ")]
    assert partial[0] == f"((4*{t} + 63)//64)" and combine[0] == f"(((4*{t} + 15)//16))*Min(1, {partial[2]} - 1)"
    assert ranges == body_ranges == "['VR[1, 4]', 'VR[1, 64]']"


@pytest.mark.gpu
def test_fp8_cuda_dispatch_uses_scaled_mm():
    require_cuda_kernels()
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 _scaled_mm needs compute capability 8.9+")
    w_q, w_scale = quantize_fp8(torch.randn(256, 512, device="cuda"))
    x = torch.randn(7, 512, device="cuda", dtype=torch.bfloat16)
    assert rel_err(torch.ops.l4.linear_fp8(x, w_q, w_scale), _linear_fp8_impl(x, w_q, w_scale)) < 1e-2


@pytest.mark.gpu
def test_inductor_cuda_engine_int4_matches_cpu_engine(tmp_path):
    """AOTInductor on CUDA with the kernels compiled in: a tiny Int4 engine's logits against the same engine on CPU."""
    require_cuda_kernels()
    import l4compile

    ids = torch.tensor([[1, 5, 9, 2, 7, 3]])
    logits = {}
    for dev in ("cpu", "cuda"):
        eng = l4compile.compile("tiny", backend="inductor", out=tmp_path / dev, quant="int4", device=dev,
                                max_seq_len=32, max_batch_size=1)
        logits[dev] = eng.prefill(ids.to(dev)).float().cpu()
    assert rel_err(logits["cuda"], logits["cpu"]) < 1e-3


def test_bench_kernels_script_checks_every_kernel(tmp_path, capsys):
    """benchmarks/bench_kernels.py (the GPU sweep) at CI size under the interpreter: every kernel and baseline row is
    checked against torch on dequantized weights and timed."""
    require_cuda_kernels() if torch.cuda.is_available() else require_interpreter()
    import json

    from tests.conftest import load_benchmark

    mod = load_benchmark("bench_kernels")
    out = tmp_path / "k.json"
    assert mod.main(["--tiny", "--tokens", "2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert report["device"] == ("cpu (interpreter)" if not torch.cuda.is_available() else torch.cuda.get_device_name())
    kernels = [r["kernel"] for r in rows]
    assert kernels == [*["attention_fused pos 7"] * 2, "sdpa aten pos 7", *["attention_fused pos 31"] * 2,
                       "sdpa aten pos 31",
                       *["moe_q_fused"] * 4, "moe_fused bf16", *["moe_q_fused + add + norm"] * 2,
                       "add_rms_norm_router", "norm + router", *["int4_mm qkv + q/k rope"] * 2,
                       *["int4_mm q_proj"] * 4, "torch.mm bf16 q_proj", *["int4_mm kv_proj"] * 4,
                       "torch.mm bf16 kv_proj", *["int4_mm o_proj"] * 4, "torch.mm bf16 o_proj", "moe_fp8_fused",
                       "moe_q reference fp8"]
    assert all(r["error"] is None and r["ms"] > 0 and r["rel_err"] < 5e-2 for r in rows)
    # what a decode step must read: k and v of the visible positions (2 sequences, 2 kv heads, head_dim 16, bf16)
    # plus q in and the output out (2 x 4 heads x 16)
    assert [r["bytes"] for r in rows if r["kernel"].endswith("pos 7")] == [2 * 2 * 2 * 8 * 16 * 2 + 2 * 2 * 64 * 2] * 3
    # the chained launch (the engines') and the two-launch form it replaced, both checked
    assert [r["config"] for r in rows if r["kernel"] == "attention_fused pos 31"] == ["BM16 BN16", "+ combine launch"]
    out = capsys.readouterr().out
    assert "| int4_mm q_proj | 2 | BN32 BK32 NS4 |" in out and "| moe_q_fused | 2 | BN32 BK32 NS4 |" in out
    assert "| int4_mm q_proj | 2 | BN32 BK32 SK2 |" in out                        # split: l4::int4_mm_chained's form
    assert "| int4_mm q_proj | 2 | BN32 BK32 NW8 |" in out and "| moe_q_fused | 2 | BN32 BK32 NW8 |" in out
    assert "| moe_q_fused | 2 | BN32 BK32 |" in out and "| moe_q_fused | 2 | BN32 BK32 SK2/2 |" in out and "| moe_fp8_fused | 2 | BM16 BN16 BK32 |" in out and "| attention_fused pos 31 | 2 | BM16 BN16 |" in out


def test_bench_kernels_prefill_rows(tmp_path, capsys):
    """``--prefill`` (with ``--tokens ''``: its rows alone): q_proj and the Int4 MoE at prefill token counts, the
    decode blocks against tall tiles and bf16, and the causal attention against SDPA, each checked and timed, in
    TFLOP/s (2 T N K; the MoE 12 T H I: a routed and a shared row a token; attention 4 D Hq T (T + 1) / 2)."""
    require_cuda_kernels() if torch.cuda.is_available() else require_interpreter()
    import json

    from tests.conftest import load_benchmark

    mod = load_benchmark("bench_kernels")
    out = tmp_path / "k.json"
    assert mod.main(["--tiny", "--tokens", "", "--prefill", "20", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["kernel"], r["config"].split(" ")[0]) for r in rows] == [
        ("int4_mm q_proj prefill", "decode"), ("int4_mm q_proj prefill", "BM32"),
        ("torch.mm bf16 q_proj prefill", "cuBLAS"), ("moe_q_fused prefill", "decode"), ("moe_q_fused prefill", "BM32"),
        ("moe_fused bf16 prefill", "BM64"), ("attention_fused prefill", "BM64"), ("sdpa prefill", "K/V")]
    assert all(r["error"] is None and r["ms"] > 0 for r in rows)
    h, i, heads, d = mod.TINY["H"], mod.TINY["I"], mod.TINY["heads"], mod.TINY["head_dim"]
    assert {r["flops"] for r in rows[:3]} == {2 * 20 * heads * d * h}
    assert {r["flops"] for r in rows[3:6]} == {12 * 20 * h * i}
    assert {r["flops"] for r in rows[6:]} == {4 * d * heads * 20 * 21 // 2}      # causal: 20 * 21 / 2 pairs
    assert rows[6]["rel_err"] < 1e-2
    assert "TFLOP/s" in capsys.readouterr().out
    assert mod.main(["--tiny", "--tokens", "", "--prefill", ""]) == 2
    assert "must be comma-separated lists of positive integers, not both empty" in capsys.readouterr().err
