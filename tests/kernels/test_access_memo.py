"""l4compile.kernels.access_memo: torch's which-arguments-does-this-kernel-write analysis runs once per kernel
signature (what generate_ttir compiles), not once per traced call; other kernels and unkeyable calls are left to
torch. The end-to-end effect (7 analyses for a 4-layer engine, the same wrapper) is in test_aoti_sm90.py."""
from __future__ import annotations

import pytest
import torch

from l4compile.kernels import why_unavailable

pytestmark = pytest.mark.skipif(why_unavailable() is not None, reason=str(why_unavailable()))


@pytest.fixture(autouse=True)
def h100(monkeypatch):
    """An active target, as on a GPU host (or under benchmarks/_fake_h100); this CPU process has none."""
    from triton.backends.compiler import GPUTarget

    from l4compile.kernels import access_memo
    monkeypatch.setattr(access_memo, "_target", lambda: GPUTarget("cuda", 90, 32))


def _fakes(*shapes, dtype=torch.bfloat16):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        return [torch.empty(s, dtype=dtype) for s in shapes]


def _kernel():
    from l4compile.kernels.moe_route import moe_route_kernel
    return moe_route_kernel


def test_key_is_what_generate_ttir_compiles():
    from l4compile.kernels.access_memo import key

    a, b = _fakes((4, 16), (1, 5120))
    (c,) = _fakes((4, 16), dtype=torch.float32)
    k = _kernel()
    assert key(k, {"x_ptr": a, "T": 7, "BLOCK": 16}, {}) == key(k, {"BLOCK": 16, "T": 7, "x_ptr": b}, {})
    assert key(k, {"x_ptr": a, "T": 7}, {}) != key(k, {"x_ptr": c, "T": 7}, {})      # dtype
    assert key(k, {"x_ptr": a, "T": 7}, {}) != key(k, {"x_ptr": a, "T": 1}, {})      # an int Triton may specialise
    assert key(k, {"x_ptr": a, "T": True}, {}) != key(k, {"x_ptr": a, "T": 1}, {})   # 1 and True compare equal
    real = torch.empty(8, dtype=torch.bfloat16)
    assert key(k, {"x_ptr": real}, {})[2] == (("x_ptr", ("tensor", torch.bfloat16, True)),)
    assert key(k, {"x_ptr": real[1:]}, {})[2] == (("x_ptr", ("tensor", torch.bfloat16, False)),)   # 2-byte offset


def test_autotuners_key_by_function_and_configs():
    """Torch wraps a kernel launched with num_warps / num_stages in a new one-config Autotuner at each traced call:
    two such wrappers of one kernel with the same configs share a key (one analysis, not one a call); other configs,
    or a config with a pre_hook (which the key cannot vouch for), do not."""
    from triton import Config
    from triton.runtime.autotuner import Autotuner

    from l4compile.kernels.access_memo import key

    (a,) = _fakes((4, 16))
    k = _kernel()
    wrap = lambda *configs: Autotuner(k, k.arg_names, list(configs), key=[], reset_to_zero=None,  # noqa: E731
                                      restore_value=None)
    one, again = wrap(Config({}, num_warps=8, num_stages=2)), wrap(Config({}, num_warps=8, num_stages=2))
    args = {"x_ptr": a, "T": 7}
    assert one is not again and key(one, args, {}) == key(again, args, {}) != key(k, args, {})
    assert key(wrap(Config({}, num_warps=4, num_stages=2)), args, {}) != key(one, args, {})
    assert key(wrap(Config({}, num_warps=8, num_stages=2, pre_hook=lambda _: None)), args, {}) is None


def test_key_declines_what_it_cannot_vouch_for():
    import triton

    from l4compile.kernels.access_memo import key

    @triton.jit
    def outside(x_ptr):                       # defined here, not in l4compile
        pass

    (a,) = _fakes((4,))
    assert key(outside, {"x_ptr": a}, {}) is None
    assert key(_kernel(), {"x_ptr": a, "shape": [1, 2]}, {}) is None                 # unhashable
    assert key(_kernel(), {"x_ptr": a}, {"x_ptr": ("stable", ([16],))}) is None       # TMA descriptors


def test_no_target_no_memo(monkeypatch):
    """Without an active driver torch's analysis fails and assumes every tensor written: never kept."""
    from triton.backends.compiler import GPUTarget

    from l4compile.kernels import access_memo

    monkeypatch.undo()
    (a,) = _fakes((4,))
    if access_memo._target() is not None:
        pytest.skip("this process has an active Triton driver")
    assert access_memo.key(_kernel(), {"x_ptr": a}, {}) is None
    monkeypatch.setattr(access_memo, "_target", lambda: GPUTarget("cuda", 80, 32))
    other = access_memo.key(_kernel(), {"x_ptr": a}, {})
    monkeypatch.setattr(access_memo, "_target", lambda: GPUTarget("cuda", 90, 32))
    assert other != access_memo.key(_kernel(), {"x_ptr": a}, {})                      # the target is in the key


def test_symbolic_values_key_as_one():
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from l4compile.kernels.access_memo import key

    env = ShapeEnv()
    s = env.create_unbacked_symint()
    (a,) = _fakes((4,))
    assert key(_kernel(), {"x_ptr": a, "T": s}, {})[2] == (("T", ("sym",)), ("x_ptr", ("tensor", torch.bfloat16)))


def test_memo_runs_the_analysis_once_per_key():
    from l4compile.kernels import access_memo

    calls = []

    def analyze(kernel, kwargs, tma):
        calls.append(sorted(kwargs))
        return ["out_ptr"] if "out_ptr" in kwargs else {"accesses": len(calls)}

    memo = access_memo._memoized(analyze)
    a, b = _fakes((3, 8), (9, 8))
    first = memo(_kernel(), {"x_ptr": a, "out_ptr": b, "N": 8}, {})
    again = memo(_kernel(), {"x_ptr": b, "out_ptr": a, "N": 8}, {})                  # other shapes, same key
    assert first == again == ["out_ptr"] and first is not again                     # a list: each caller's own
    assert len(calls) == 1
    other = memo(_kernel(), {"x_ptr": a, "N": 16}, {})
    assert memo(_kernel(), {"x_ptr": b, "N": 16}, {}) is other and len(calls) == 2
    memo(_kernel(), {"x_ptr": a, "N": 16}, {"x_ptr": "tma"})                         # declined: analysed each time
    memo(_kernel(), {"x_ptr": a, "N": 16}, {"x_ptr": "tma"})
    assert len(calls) == 4
    memo(_kernel(), {"x_ptr": a, "N": 16}, tma={})                                  # keywords: passed through
    assert len(calls) == 5


def test_install_wraps_torch_once():
    from torch._higher_order_ops import triton_kernel_wrap as wrap

    from l4compile.kernels import access_memo, ops  # noqa: F401  (importing ops installs it)

    names = [n for n in access_memo._NAMES if hasattr(wrap, n)]     # 2.13: identify_accessed_tensors; 2.11: ..._mutated_
    assert names
    for name in names:
        fn = getattr(wrap, name)
        assert fn._l4_memo and not getattr(fn.__wrapped__, "_l4_memo", False)
        assert access_memo.install() and getattr(wrap, name) is fn
