"""l4compile: a compiler for Llama 4 models (checkpoint -> torch.fx -> passes -> engine)."""
__version__ = "0.1.0"

from l4compile.errors import L4Error  # noqa: E402


def compile(*args, **kwargs):
    """See ``l4compile.compiler.compile``."""
    from l4compile.compiler import compile as _compile

    return _compile(*args, **kwargs)


def load_engine(path, **kwargs):
    """See ``l4compile.engine.load_engine``."""
    from l4compile.engine import load_engine as _load

    return _load(path, **kwargs)


__all__ = ["L4Error", "compile", "load_engine", "__version__"]
