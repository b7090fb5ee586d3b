"""Custom ops (torch.library, namespace ``l4``) introduced by passes.

Importing this package registers every op (and its fake and Inductor decomposition).
"""
from . import attention, moe, quant  # noqa: F401  (registers l4::attention*, l4::moe, l4::linear_fp8/int4, l4::moe_q)
from . import moe_ep  # noqa: F401  (registers l4::moe_ep, expert-parallel over torch.distributed)

DECOMPOSITIONS = {**attention.DECOMPOSITIONS, **quant.DECOMPOSITIONS}  # what the Inductor backend inlines
