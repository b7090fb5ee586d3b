"""Custom ops (torch.library, namespace ``l4``) introduced by passes.

Importing this package registers every op (and its fake and Inductor decomposition).
"""
from . import attention, moe, quant  # noqa: F401  (registers l4::attention*, l4::moe, l4::linear_fp8/int4, l4::moe_q)
from . import all_reduce, moe_ep  # noqa: F401  (l4::all_reduce, l4::moe_ep: collectives over torch.distributed)
from l4compile.kernels import dispatch as _kernels  # noqa: E402  (CUDA kernels of l4::moe/linear_int4/linear_fp8)

if hasattr(_kernels, "register_cuda_kernels"):   # else dispatch is mid-import (imported first): it registers itself
    _kernels.register_cuda_kernels()

DECOMPOSITIONS = {**attention.DECOMPOSITIONS, **quant.DECOMPOSITIONS}  # what the Inductor backend inlines
