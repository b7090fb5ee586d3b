"""add_rms_norm_router_kernel (``l4::add_rms_norm_router``): the residual add, Llama 4's RMSNorm and the MoE router
in one launch, against the reference ops (transformers' Llama4TextRMSNorm, then F.linear): on the CPU under Triton's
interpreter, and on a GPU."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from .conftest import require_cuda_kernels, require_interpreter

EPS = 1e-5


def _reference(a, b, w, router_w, eps=EPS):
    h = a + b
    hf = h.float()
    x = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).type_as(h) * w     # Llama4TextRMSNorm
    return h, x, F.linear(x, router_w)


def _inputs(n_tok, hidden, n_exp, dtype, device="cpu"):
    g = torch.Generator().manual_seed(n_tok * 7919 + hidden * 31 + n_exp)
    a = (torch.randn(n_tok, hidden, generator=g) * 3).to(dtype)
    b = torch.randn(n_tok, hidden, generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(hidden, generator=g)).to(dtype)
    router_w = (torch.randn(n_exp, hidden, generator=g) / hidden ** 0.5).to(dtype)
    return [t.to(device) for t in (a, b, w, router_w)]


def _ulps(got, ref):
    """Largest difference in units of the dtype's last place at ref's magnitude (one ulp: rounding of float32 sums
    taken in another order)."""
    eps = torch.finfo(ref.dtype).eps
    scale = ref.float().abs().clamp_min(torch.finfo(ref.dtype).tiny)
    return float(((got.float() - ref.float()).abs() / (scale * eps)).max()) if ref.numel() else 0.0


def _check(got, inputs, dtype):
    """got = (h, x, logits) against the reference of inputs = (a, b, w, router_w)."""
    h, x, logits = got
    rh, rx, rl = _reference(*inputs)
    assert h.dtype == x.dtype == logits.dtype == dtype and logits.shape == rl.shape
    assert torch.equal(h, rh)                                          # one float32 add, rounded: exact
    # the mean's float32 sum in another order and rsqrt's own rounding move the scale by a few float32 ulps; x is
    # rounded twice after it (to the dtype, then times w): 1 ulp in bf16, a few in float32
    assert _ulps(x, rx) <= {torch.float32: 4.0, torch.bfloat16: 1.0}[dtype]
    # the router: float32 sums over H in another order, rounded once. Against the router of the kernel's own x (an x
    # 1 ulp off does not count twice): within one rounding of the output and the float32 sums' error bound
    # H * eps * sum |x w|; then against the reference's logits, relative to the largest
    x32, w32 = x.float(), inputs[3].float()
    bound = (torch.finfo(dtype).eps * F.linear(x32, w32).abs()
             + x.shape[1] * torch.finfo(torch.float32).eps * F.linear(x32.abs(), w32.abs()))
    assert bool(((logits.float() - F.linear(x32, w32)).abs() <= bound).all())
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    assert float((logits.float() - rl.float()).abs().max()) <= tol * float(rl.float().abs().max())


# N: decode (1), the row path's last (16) and the block path's first (17) step, several row blocks (70);
# H: one chunk, one past a chunk and short of two (the row path's 1024-wide chunks, the block path's 128);
# E: Scout's 16, an odd count (a partial expert block), Maverick's 128
@pytest.mark.parametrize("n_tok,hidden,n_exp", [(1, 64, 16), (1, 1100, 5), (3, 96, 128), (16, 256, 16),
                                                 (17, 96, 5), (70, 1100, 16), (40, 64, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_norm_then_router(n_tok, hidden, n_exp, dtype, rne_bf16):
    from l4compile.kernels.ops import add_rms_norm_router

    a, b, w, router_w = _inputs(n_tok, hidden, n_exp, dtype)
    got = add_rms_norm_router(a, b, w, router_w, EPS)
    _check(got, (a, b, w, router_w), dtype)


def test_takes_strided_rows():
    """a and b as strided views (a slice of a wider buffer, a transpose) need no copy; the triton_op gives what its
    body gives (the engine's graph: tests/kernels/test_attention_kernel.py's CUDA step)."""
    require_interpreter()
    from l4compile.kernels.ops import add_rms_norm_router

    a, b, w, router_w = _inputs(20, 96, 16, torch.float32)
    wide = torch.zeros(20, 200)
    wide[:, 50:146] = a
    a_view, b_view = wide[:, 50:146], b.t().contiguous().t()              # row stride 200; column stride 20
    assert not a_view.is_contiguous() and b_view.stride() == (1, 20)
    _check(add_rms_norm_router(a_view, b_view, w, router_w, EPS), (a, b, w, router_w), torch.float32)
    _check(torch.ops.l4.add_rms_norm_router(a_view, b_view, w, router_w, EPS), (a, b, w, router_w), torch.float32)


def test_refuses_mismatched_inputs():
    require_interpreter()
    from l4compile.kernels.ops import add_rms_norm_router

    a, b, w, router_w = _inputs(2, 64, 4, torch.float32)
    with pytest.raises(ValueError, match="are not \\[N, H\\]"):
        add_rms_norm_router(a, b[:, :32], w, router_w, EPS)
    with pytest.raises(ValueError, match="one dtype"):
        add_rms_norm_router(a, b, w.to(torch.bfloat16), router_w, EPS)


@pytest.mark.gpu
@pytest.mark.parametrize("n_tok", [1, 8, 16, 17, 2048])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_norm_then_router(n_tok, dtype):
    """On the GPU at Scout's width (H 5120, E 16) and Maverick's router (E 128)."""
    require_cuda_kernels()
    from l4compile.kernels.ops import add_rms_norm_router

    for n_exp in (16, 128):
        a, b, w, router_w = _inputs(n_tok, 5120, n_exp, dtype, "cuda")
        got = add_rms_norm_router(a, b, w, router_w, EPS)
        _check(got, (a, b, w, router_w), dtype)
