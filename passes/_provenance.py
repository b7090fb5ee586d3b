"""Finding Llama 4 structure by module provenance (the ``nn_module_stack`` that export records per node)."""
from __future__ import annotations

import re

import torch.fx

_LAYER_RE = re.compile(r"layers\.(\d+)\.")


def innermost_module(node: torch.fx.Node, class_name: str) -> str | None:
    """Path of the innermost module of class ``class_name`` (unqualified) that ``node`` came from, if any."""
    found = None
    for path, cls in (node.meta.get("nn_module_stack") or {}).values():
        qual = cls if isinstance(cls, str) else getattr(cls, "__qualname__", str(cls))
        if qual.rsplit(".", 1)[-1] == class_name:
            found = path
    return found


def layer_index(path: str) -> int:
    """``lm.model.layers.3.feed_forward`` -> 3 (-1 outside the decoder layers)."""
    m = _LAYER_RE.search(path + ".")
    return int(m.group(1)) if m else -1
