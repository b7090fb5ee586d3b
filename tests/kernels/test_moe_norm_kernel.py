"""l4::moe_fused_norm / moe_q_fused_norm / moe_fp8_fused_norm (``kernels/moe_norm.py``): the fused MoE's combine, the
residual add after it and the next RMSNorm, in its down launch at decode-sized steps and in a launch of their own
for longer ones, against the plain fused op followed by the aten add and Llama4TextRMSNorm. Under the CPU
interpreter here, on CUDA with the gpu marker."""
# T tokens, H hidden, I expert width, E experts
from __future__ import annotations

import pytest
import torch

from l4compile.kernels.layout import Int4Blocks
from l4compile.ops.attention import _rms

from .conftest import rel_err, require_cuda_kernels, require_interpreter
from .test_moe_fp8_kernel import make_moe_fp8
from .test_moe_int4_kernel import make_moe_q
from .test_moe_kernel import make_moe

EPS = 1e-5
OPS = {"bf16": ("moe_fused", "moe_fused_norm"), "int4": ("moe_q_fused", "moe_q_fused_norm"),
       "fp8": ("moe_fp8_fused", "moe_fp8_fused_norm")}
# (T, the most tokens the down launch finishes: layout's when None): a 1-token step (tiles from the logits) in the
# down launch; 5 tokens in the launch of their own; then, with the down launch taking up to 32, steps it finishes
# (counted rows of several tiles, several tokens a tile), the largest it takes and one past it
STEPS = [(1, None), (5, None), (5, 32), (32, 32), (35, 32)]


@pytest.fixture
def norm_tokens(monkeypatch):
    """Set how many tokens the down launch finishes (``ops.MOE_NORM_DECODE_TOKENS``; None: layout's)."""
    from l4compile.kernels import ops

    def use(n):
        if n is not None:
            monkeypatch.setattr(ops, "MOE_NORM_DECODE_TOKENS", n)
    return use


def _args(kind: str, n_tok: int, dtype=torch.float32, device="cpu", hidden=40, inter=24, n_exp=3):
    if kind == "bf16":
        return make_moe(n_tok, hidden, inter, n_exp, dtype=dtype, seed=n_tok, device=device)
    if kind == "int4":
        return make_moe_q(n_tok, hidden, inter, n_exp, 8, dtype=dtype, seed=n_tok, device=device)
    return make_moe_fp8(n_tok, hidden, inter, n_exp, dtype=dtype, seed=n_tok, device=device)


def _reference(kind: str, args, residual, norm_w):
    """The plain fused op's [T, H], then h' = residual + it (aten, in the dtype) and x' = RMSNorm(h') * norm_w."""
    x, router_w = args[:2]
    logits = torch.nn.functional.linear(x, router_w)
    y = getattr(torch.ops.l4, OPS[kind][0])(*args, 1, logits)
    h = residual + y
    return h, _rms(h, EPS) * norm_w


def _norm_inputs(args, seed=7):
    x = args[0]
    g = torch.Generator().manual_seed(seed)
    residual = (torch.randn(x.shape, generator=g) * 2).to(device=x.device, dtype=x.dtype)
    norm_w = (1 + 0.1 * torch.randn(x.shape[1], generator=g)).to(device=x.device, dtype=x.dtype)
    return residual, norm_w


def _fused(kind: str, args, residual, norm_w):
    logits = torch.nn.functional.linear(args[0], args[1])
    return getattr(torch.ops.l4, OPS[kind][1])(*args, 1, logits, residual, norm_w, EPS)


@pytest.mark.parametrize("n_tok,in_down", STEPS)
@pytest.mark.parametrize("kind", list(OPS))
def test_fused_norm_matches_plain_op_then_add_and_norm(kind, n_tok, in_down, norm_tokens):
    """h' bit for bit (the same float32 sums, rounded where aten rounds), x' to float32 rounding (the norm's mean
    is summed in another order)."""
    require_interpreter()
    norm_tokens(in_down)
    args = _args(kind, n_tok)
    residual, norm_w = _norm_inputs(args)
    h_ref, x_ref = _reference(kind, args, residual, norm_w)
    h, x = _fused(kind, args, residual, norm_w)
    assert h.shape == x.shape == residual.shape and h.dtype == x.dtype == residual.dtype
    assert torch.equal(h, h_ref)
    assert rel_err(x, x_ref) < 1e-6


@pytest.mark.parametrize("n_tok,in_down", [(1, None), (7, None), (7, 32)])
@pytest.mark.parametrize("kind", list(OPS))
def test_fused_norm_rounds_like_reference_bf16(kind, n_tok, in_down, rne_bf16, norm_tokens):
    """In bf16 the combine rounds once, the residual add once and the norm twice, as the graph's aten ops do."""
    norm_tokens(in_down)
    args = _args(kind, n_tok, torch.bfloat16)
    residual, norm_w = _norm_inputs(args)
    h_ref, x_ref = _reference(kind, args, residual, norm_w)
    h, x = _fused(kind, args, residual, norm_w)
    assert torch.equal(h, h_ref)
    diff = (x.float() - x_ref.float()).abs()
    assert (diff <= x_ref.float().abs() * 2 ** -7).all()                  # within one bf16 ulp
    assert (diff == 0).float().mean() > 0.9


@pytest.mark.parametrize("n_tok", [1, 6])
def test_split_down_counts_each_tile_once(n_tok, norm_tokens):
    """Int4 down split 3 ways over I: only the program that adds a tile's partials counts it (else a token would be
    finished before its last tile was stored, or twice)."""
    require_interpreter()
    from l4compile.kernels import ops

    norm_tokens(32)

    args = make_moe_q(n_tok, 40, 96, 3, 8, seed=n_tok)
    residual, norm_w = _norm_inputs(args)
    blocks = (Int4Blocks(16, 16, 16, False), Int4Blocks(16, 16, 16, False, 3))
    logits = torch.nn.functional.linear(args[0], args[1])
    y = ops.fused_moe_int4(*args, 1, blocks=blocks, logits=logits)
    h, x = ops.fused_moe_int4(*args, 1, blocks=blocks, logits=logits, norm=(residual, norm_w, EPS))
    h_ref = residual + y
    assert torch.equal(h, h_ref)
    assert rel_err(x, _rms(h_ref, EPS) * norm_w) < 1e-6


def test_fused_norm_refuses_what_it_cannot_take():
    require_interpreter()
    from l4compile.kernels import ops

    args = _args("bf16", 3)
    residual, norm_w = _norm_inputs(args)
    with pytest.raises(ValueError, match="top-1 routing only"):
        ops.fused_moe(*args, 2, norm=(residual, norm_w, EPS))
    with pytest.raises(ValueError, match=r"must be \[T, H\] and \[H\]"):
        ops.fused_moe(*args, 1, norm=(residual[:2], norm_w, EPS))
    with pytest.raises(ValueError, match=r"must be \[T, H\] and \[H\]"):
        ops.fused_moe(*args, 1, norm=(residual, norm_w.double(), EPS))


def test_fused_norm_no_tokens():
    require_interpreter()
    args = _args("int4", 0)
    residual, norm_w = _norm_inputs(args)
    h, x = _fused("int4", args, residual, norm_w)
    assert h.shape == x.shape == (0, 40)


def _scout_weights(kind: str):
    """Scout's MoE block (H 5120, I 8192, 16 experts) made on the GPU: (router_w, the op's weights) in bf16, Int4
    (group 128) or FP8, as ``_args`` lays them out."""
    from l4compile.quant import quantize_fp8, quantize_int4

    hidden, inter, n_exp = 5120, 8192, 16
    g = torch.Generator(device="cuda").manual_seed(0)
    r = lambda *s, std=0.02: torch.randn(*s, generator=g, device="cuda") * std  # noqa: E731
    linear = (r(n_exp, 2 * inter, hidden), r(n_exp, hidden, inter), r(inter, hidden), r(inter, hidden),
              r(hidden, inter))                                                  # nn.Linear orientation
    router_w = r(n_exp, hidden, std=0.3).bfloat16()
    if kind == "int4":
        return router_w, tuple(t for w in linear for t in quantize_int4(w, 128))
    if kind == "fp8":
        return router_w, tuple(t for w in linear for t in quantize_fp8(w))
    gate_up, down, *shared = (w.bfloat16() for w in linear)
    return router_w, (gate_up.transpose(1, 2), down.transpose(1, 2), *shared)   # l4::moe's HF layouts


@pytest.mark.gpu
@pytest.mark.parametrize("in_down", [None, 32])
@pytest.mark.parametrize("kind", list(OPS))
def test_fused_norm_cuda_scout_width(kind, in_down, norm_tokens):
    """Scout widths on a GPU, at decode batches 1 / 8 / 32 (the counters, the .cg reads of the rows other programs
    stored, the barrier between the passes) and at 40 / 300 tokens (the launch of its own): h' bit for bit, x'
    within bf16 rounding; three calls each (every gate_up launch zeroes the counters: no state between calls). With
    layout's threshold (batch 1 in the down launch) and with the down launch taking up to 32 tokens."""
    require_cuda_kernels()
    norm_tokens(in_down)
    router_w, weights = _scout_weights(kind)
    g = torch.Generator(device="cuda").manual_seed(1)
    for n_tok in (1, 8, 32, 40, 300):
        x = torch.randn(n_tok, 5120, generator=g, device="cuda").bfloat16()
        args = (x, router_w, *weights)
        residual, norm_w = _norm_inputs(args)
        h_ref, x_ref = _reference(kind, args, residual, norm_w)
        for _ in range(3):
            h, xo = _fused(kind, args, residual, norm_w)
            assert torch.equal(h, h_ref), n_tok
            assert rel_err(xo, x_ref) < 1e-2, n_tok
