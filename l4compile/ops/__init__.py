"""Custom ops (torch.library, namespace ``l4``) introduced by passes.

Importing this package registers every op (and its fake and Inductor decomposition).
"""
from . import attention, moe  # noqa: F401  (registers l4::attention*, l4::moe)

DECOMPOSITIONS = {**attention.DECOMPOSITIONS}  # what the Inductor backend inlines before compiling
