"""moe_route_kernel (one launch) builds exactly the grouped-row map ``layout.moe_rows`` builds from aten ops, for
top-1 routing: on the CPU under Triton's interpreter, and on a GPU."""
from __future__ import annotations

import pytest
import torch

from l4compile.kernels.layout import moe_rows, num_tiles

from .conftest import require_cuda_kernels, require_interpreter

try:                    # a module global: Triton resolves the names a jitted function calls in its globals
    from l4compile.kernels.moe_route import tile_span, tile_tokens
except ImportError:     # no triton here: the kernel tests skip
    tile_span = tile_tokens = None


def _logits(n_tok: int, n_exp: int, dtype: torch.dtype, device="cpu") -> torch.Tensor:
    """[T, E] logits without ties at any row's maximum (each row a permutation of k/8 - 1: exact in bf16), so
    torch.topk, whose choice among equal maxima is unspecified, is a sound reference."""
    g = torch.Generator().manual_seed(n_tok * 131 + n_exp)
    perm = torch.argsort(torch.rand(n_tok, n_exp, generator=g), dim=1)
    return (perm.float() / 8 - 1).to(dtype).to(device)


def _reference(logits: torch.Tensor, block_m: int):
    val, idx = logits.topk(1, dim=1)
    return moe_rows(idx, torch.sigmoid(val.float()).to(logits.dtype), logits.shape[1], block_m)


def _check(got, ref, dtype):
    for field in ("row_tok", "routed_row", "tile_group", "tile_row0", "tile_row_end"):
        a, b = getattr(got, field), getattr(ref, field)
        assert a.dtype == b.dtype and torch.equal(a, b), field
    # scores: sigmoid in float32, rounded to the logits' dtype; the interpreter's bf16 cast truncates (RNE on GPUs)
    ulp = {torch.float32: 2 ** -23, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}[dtype]
    assert torch.allclose(got.row_scale, ref.row_scale, rtol=ulp, atol=0)


# T = 0 (empty step), 1 (decode), one and several token blocks; E = 1 (every token one group), Scout, Maverick
# (<= 16 tokens take the kernel's decode blocks, 17 the first step past them)
@pytest.mark.parametrize("n_tok,n_exp,block_m", [(0, 4, 16), (1, 16, 16), (5, 1, 64), (16, 128, 16), (17, 16, 16),
                                                 (37, 16, 16), (300, 128, 16), (1100, 16, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_route_matches_moe_rows(n_tok, n_exp, block_m, dtype):
    require_interpreter()
    from l4compile.kernels.ops import moe_route

    logits = _logits(n_tok, n_exp, dtype)
    rows = moe_route(logits, block_m)
    assert rows.tile_group.shape == (num_tiles(2 * n_tok, n_exp + 1, block_m),)
    _check(rows, _reference(logits, block_m), dtype)


def test_moe_route_takes_the_first_of_equal_maxima():
    require_interpreter()
    from l4compile.kernels.ops import moe_route

    logits = torch.tensor([[0.5, 2.0, 2.0, -1.0], [3.0, 3.0, 3.0, 3.0], [0.0, 1.0, 0.0, 1.0]])
    rows = moe_route(logits, 16)
    # token 0 -> expert 1, token 1 -> expert 0, token 2 -> expert 1: rows [tok 1 | tok 0, tok 2 | shared 0, 1, 2]
    assert rows.row_tok.tolist() == [1, 0, 2, 0, 1, 2]
    assert rows.routed_row.tolist() == [1, 0, 2]


def test_moe_route_reads_strided_logits():
    require_interpreter()
    from l4compile.kernels.ops import moe_route

    logits = _logits(40, 8, torch.float32)
    _check(moe_route(logits.t().contiguous().t(), 16), _reference(logits, 16), torch.float32)   # column-major


@pytest.mark.gpu
@pytest.mark.parametrize("n_tok", [1, 8, 32, 2048, 8192])
def test_moe_route_on_gpu(n_tok):
    require_cuda_kernels()
    from l4compile.kernels.ops import moe_route

    logits = _logits(n_tok, 16, torch.bfloat16, "cuda")
    _check(moe_route(logits, 16), _reference(logits, 16), torch.bfloat16)


def test_moe_route_zeroes_the_split_k_counters_it_is_given():
    """``zero``: the route launch also zeroes up to two flat int32 buffers (the split-K counters of the MoE GEMMs
    after it, which then need no fill kernels); the map is the same as without them."""
    require_interpreter()
    from l4compile.kernels.ops import moe_route

    logits = _logits(5, 16, torch.float32)
    a, b = torch.full((37,), 7, dtype=torch.int32), torch.full((300,), -3, dtype=torch.int32)
    _check(moe_route(logits, 16, (a, b)), _reference(logits, 16), torch.float32)
    assert not a.any() and not b.any()
    one = torch.full((2,), 9, dtype=torch.int32)
    moe_route(logits, 16, (one,))
    assert not one.any()
    for bad in ((a, b, one), (a.long(),), (a.view(37, 1),)):
        with pytest.raises(ValueError, match="up to two flat int32 tensors"):
            moe_route(logits, 16, bad)
    with pytest.raises(ValueError, match="cannot zero split-K counters"):     # a launch that may not run
        moe_route(logits[:1], 16, (one,), in_kernel=True)


@pytest.mark.parametrize("n_zero", [0, 1, 2])
def test_moe_route_launch_has_no_aliased_arguments(n_zero, monkeypatch):
    """Every tensor the route launch takes is a buffer of its own, with or without counters to zero: an output passed
    a second time as an unused counter pointer (as it was) made Inductor copy it first, one extra kernel per bf16 or
    FP8 MoE layer in CUDA engines (aoti_sm90: tiny Inductor kernels 20 -> 16 in bf16, 24 -> 20 in FP8)."""
    require_interpreter()
    from l4compile.kernels import ops

    launches = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kw: launches.append(args)

    monkeypatch.setattr(ops, "wrap_triton", Recorder)
    zero = tuple(torch.zeros(3, dtype=torch.int32) for _ in range(n_zero))
    ops.moe_route(_logits(5, 16, torch.float32), 16, zero)
    tensors = [a for a in launches[0] if isinstance(a, torch.Tensor)]
    assert len(tensors) == 9                           # logits, the 6 tensors of the map, 2 counter pointers
    assert len({t.untyped_storage().data_ptr() for t in tensors}) == len(tensors)


def _tile_span_probe():
    """A kernel storing, for each tile of a 1-token step, what a gate_up program gets when it maps the step from its
    logits itself (``moe_route.tile_span``, ``tile_tokens``): the group, the first and end rows, tokens and scales
    of its BM rows."""
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["T"])
    def probe(logits_ptr, routed_ptr, grp_ptr, span_ptr, tok_ptr, scale_ptr, T, E, stride_e,
              BM: tl.constexpr, BG: tl.constexpr):
        tile = tl.program_id(0)
        grp, row0, row_end, mapped, score = tile_span(tile, grp_ptr, grp_ptr, grp_ptr, logits_ptr, T, E, stride_e,
                                                      True, BG)
        rows = row0 + tl.arange(0, BM)
        tok, scale = tile_tokens(grp_ptr, scale_ptr, routed_ptr, rows, rows < row_end, mapped, score)
        r = tl.arange(0, BM)
        tl.store(grp_ptr + tile, grp)
        tl.store(span_ptr + 2 * tile, row0)
        tl.store(span_ptr + 2 * tile + 1, row_end)
        tl.store(tok_ptr + tile * BM + r, tok)
        tl.store(scale_ptr + tile * BM + r, scale)
    return probe


@pytest.mark.parametrize("case", ["E16", "E128", "E1", "ties", "nan"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemms_map_a_one_token_step_as_the_route_kernel(case, dtype):
    """A batch-1 decode step's tiles as the fused MoE's GEMMs build them from the logits (no route launch) are the
    route kernel's, field for field: each tile's group, rows, tokens and input scales (0 outside the rows), and the
    token's routed row (written by program 0); equal maxima go to the first expert, a NaN row to the last."""
    require_interpreter()
    import triton

    from l4compile.kernels.ops import moe_route

    n_exp = {"E16": 16, "E128": 128, "E1": 1}.get(case, 4)
    logits = {"ties": torch.tensor([[0.5, 2.0, 2.0, -1.0]]), "nan": torch.full((1, 4), float("nan"))}.get(
        case, _logits(1, n_exp, torch.float32)).to(dtype)
    block_m = 16
    ref = moe_route(logits, block_m)
    n_tiles = ref.tile_group.numel()
    grp, span = torch.full((n_tiles,), -7, dtype=torch.int32), torch.full((n_tiles, 2), -7, dtype=torch.int32)
    tok, scale = torch.full((n_tiles, block_m), -7, dtype=torch.int32), torch.full((n_tiles, block_m), -7.0)
    routed = torch.full((1,), -7, dtype=torch.int64)
    _tile_span_probe()[(n_tiles,)](logits, routed, grp, span, tok, scale, 1, n_exp, logits.stride(1), BM=block_m,
                                   BG=max(2, triton.next_power_of_2(n_exp + 1)))
    assert n_tiles == 2 and torch.equal(grp, ref.tile_group) and torch.equal(routed, ref.routed_row)
    assert torch.equal(span[:, 0], ref.tile_row0) and torch.equal(span[:, 1], ref.tile_row_end)
    assert torch.equal(tok[:, 0], ref.row_tok) and not tok[:, 1:].any()
    assert torch.equal(scale[:, 0], ref.row_scale) and not scale[:, 1:].any()
    if case in ("ties", "nan"):
        assert int(grp[0]) == {"ties": 1, "nan": 3}[case]
