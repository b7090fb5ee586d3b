"""eliminate_dead_code: remove nodes whose results nothing uses (side-effect-free ops only)."""
from __future__ import annotations

import torch.fx

from ._registry import PassContext, PassResult, register_pass


@register_pass("eliminate_dead_code", after=("fuse_moe", "lower_irope", "lower_vision_rope"),
               programs=("text", "vision"))
def eliminate_dead_code(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """Remove nodes whose results are unused (fx's impurity rules keep asserts and in-place ops)."""
    before = len(gm.graph.nodes)
    gm.graph.eliminate_dead_code()
    removed = before - len(gm.graph.nodes)
    return PassResult(gm, changed=removed > 0, stats={"removed": removed})
