"""l4compile passes: one pass per file, registered by decorator; ordering comes from declarations.

    from l4compile.passes import register_pass, PassContext, PassResult

    @register_pass("my_pass", after=("fuse_moe",))
    def my_pass(gm, ctx: PassContext) -> PassResult: ...
"""
from ._registry import PassContext, PassResult, PassSpec, get_pass, order_passes, register_pass, registered_passes
# builtins register on import
from . import eliminate_dead_code, fuse_moe, fuse_qkv, kv_cache, lower_irope, lower_vision_rope, quantize  # noqa: F401
from . import shard_experts, shard_tensor_parallel  # noqa: F401  (run only for compile --plan: default=False)

__all__ = ["PassContext", "PassResult", "PassSpec", "get_pass", "order_passes", "register_pass", "registered_passes"]
