"""l4compile passes: one pass per file, registered by decorator; ordering comes from declarations.

    from l4compile.passes import register_pass, PassContext, PassResult

    @register_pass("my_pass", after=("fuse_moe",))
    def my_pass(gm, ctx: PassContext) -> PassResult: ...
"""
from ._registry import PassContext, PassResult, PassSpec, get_pass, order_passes, register_pass, registered_passes
from . import eliminate_dead_code, fuse_moe, kv_cache, lower_irope, quantize  # noqa: F401  (builtins register on import)
from . import shard_experts  # noqa: F401  (runs only for compile --plan: default=False)

__all__ = ["PassContext", "PassResult", "PassSpec", "get_pass", "order_passes", "register_pass", "registered_passes"]
