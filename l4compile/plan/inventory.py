"""Parameter inventory: every weight the traced graph reads, with its shape, dtype and role.

The planner never needs weight values, only shapes, so it works on the full-size model built on the meta
device. The preferred source is the traced graph (``Program``): its ``get_attr`` targets are the provenance
names ``lm.<transformers parameter>`` and resolve to meta tensors. ``from_module`` reads the same names from
``named_parameters`` (prefixed ``lm.``) for when tracing is unavailable; tests check the two agree.

Roles are named patterns over the provenance names (one table, no string tests elsewhere)::

    lm.model.layers.1.feed_forward.experts.gate_up_proj  -> role expert_gate_up, group experts, layer 1
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from l4compile.errors import L4Error

PARAM_PREFIX = "lm."
_L = r"^model\.layers\.(?P<layer>\d+)\."

# (pattern over the transformers parameter name, role, group). First match wins.
ROLE_TABLE: tuple[tuple[str, str, str], ...] = (
    (r"^model\.embed_tokens\.weight$", "embedding", "vocab"),
    (r"^lm_head\.weight$", "lm_head", "vocab"),
    (r"^model\.norm\.weight$", "norm", "norm"),
    (_L + r"(input_layernorm|post_attention_layernorm)\.weight$", "norm", "norm"),
    (_L + r"self_attn\.q_proj\.weight$", "attn_q", "attention"),
    (_L + r"self_attn\.k_proj\.weight$", "attn_k", "attention"),
    (_L + r"self_attn\.v_proj\.weight$", "attn_v", "attention"),
    (_L + r"self_attn\.o_proj\.weight$", "attn_o", "attention"),
    (_L + r"feed_forward\.router\.weight$", "router", "router"),
    (_L + r"feed_forward\.experts\.gate_up_proj$", "expert_gate_up", "experts"),
    (_L + r"feed_forward\.experts\.down_proj$", "expert_down", "experts"),
    (_L + r"feed_forward\.shared_expert\.(gate|up)_proj\.weight$", "shared_in", "shared_expert"),
    (_L + r"feed_forward\.shared_expert\.down_proj\.weight$", "shared_out", "shared_expert"),
    (_L + r"feed_forward\.(gate|up)_proj\.weight$", "dense_in", "dense_mlp"),
    (_L + r"feed_forward\.down_proj\.weight$", "dense_out", "dense_mlp"),
    (r"^model\.rotary_emb\.", "buffer", "other"),
)
_COMPILED = tuple((re.compile(p), role, group) for p, role, group in ROLE_TABLE)


@dataclass(frozen=True)
class ParamRecord:
    """One weight: provenance name (``lm.<param>``), shape, element bytes in the model dtype, role and layer."""

    name: str
    shape: tuple[int, ...]
    elem_bytes: int
    role: str
    group: str
    layer: int | None

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def classify(param_name: str) -> tuple[str, str, int | None]:
    """transformers parameter name -> (role, group, layer). Unknown names are ``other`` (kept replicated)."""
    for rx, role, group in _COMPILED:
        m = rx.match(param_name)
        if m:
            layer = m.groupdict().get("layer")
            return role, group, int(layer) if layer is not None else None
    return "other", "other", None


def _record(name: str, t: torch.Tensor) -> ParamRecord:
    role, group, layer = classify(name[len(PARAM_PREFIX):])
    return ParamRecord(name, tuple(int(d) for d in t.shape), t.element_size(), role, group, layer)


def from_program(prog) -> list[ParamRecord]:
    """Every ``get_attr`` weight of a traced ``Program`` (the graph's own inventory)."""
    out = []
    for target in prog.param_provenance():
        obj = prog.gm
        for part in target.split("."):
            obj = getattr(obj, part)
        out.append(_record(target, obj))
    if not out:
        raise L4Error("the traced graph reads no lm.* weights; cannot plan from it")
    return out


def from_module(lm: torch.nn.Module) -> list[ParamRecord]:
    """The same inventory from ``named_parameters`` + buffers, named as the graph names them."""
    items = list(lm.named_parameters()) + list(lm.named_buffers())
    return [_record(PARAM_PREFIX + n, t) for n, t in items]


def load_inventory(model: str, *, trace: bool = True) -> tuple[list[ParamRecord], object, str]:
    """MODEL -> (records, Llama4TextConfig, source) from the full-size model on the meta device.

    ``source`` is ``"traced graph"`` or ``"module parameters"`` (with the reason when tracing failed)."""
    from l4compile import frontend

    lm = frontend.load(model, meta=True, dtype="bfloat16").model
    if trace:
        try:
            from l4compile.program import trace as trace_fn
            prog = trace_fn(lm, max_batch=2, max_seq=32, device="meta")
            return from_program(prog), lm.config, "traced graph"
        except L4Error:
            raise
        except Exception as e:  # noqa: BLE001  (tracing on meta is best effort; the module has the same names)
            return from_module(lm), lm.config, f"module parameters (tracing on meta failed: {type(e).__name__})"
    return from_module(lm), lm.config, "module parameters"
