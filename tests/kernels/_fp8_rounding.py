"""A probe kernel for tests/kernels/test_moe_fp8_kernel.py (a module of its own: it imports Triton, which the test
modules import only once ``require_interpreter`` has passed)."""
import triton
import triton.language as tl

from l4compile.kernels.fp8_rows import round_e4m3


@triton.jit
def rounded_kernel(x_ptr, y_ptr, N: tl.constexpr):
    """y = round_e4m3(x) (float32 [N] each)."""
    o = tl.arange(0, N)
    tl.store(y_ptr + o, round_e4m3(tl.load(x_ptr + o)))
