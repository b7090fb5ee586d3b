"""Pass registry: a pass is a plain function ``(gm, ctx) -> PassResult`` registered by decorator.

Ordering comes only from declarations (``before``/``after`` edges and ``requires``/``guarantees``
properties), never from import order; ties break by name so the order is deterministic.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import networkx as nx
import torch.fx

from l4compile.errors import L4Error

PassFn = Callable[[torch.fx.GraphModule, "PassContext"], "PassResult"]


@dataclass(frozen=True)
class PassResult:
    """What a pass returns: the (possibly new) graph module and its stats, e.g. ``{"matches": 4}``."""

    gm: torch.fx.GraphModule
    changed: bool = True
    stats: Mapping[str, Any] = field(default_factory=dict)
    # A LOSSY pass (quantize) sets the logit SQNR (dB) its output must keep against its input; verify mode then
    # judges it by that instead of the exact-pass drift bound. None: the pass claims to preserve the output.
    min_logit_sqnr_db: float | None = None


@dataclass(frozen=True)
class PassContext:
    """What a pass may read: the model's config, the compile options and this pass's own options."""

    model_config: Any                 # transformers Llama4TextConfig
    compile_config: Any               # l4compile.config.CompileConfig
    options: Any = None               # this pass's frozen options dataclass (or None)
    example_inputs: tuple = ()
    metadata: Mapping[str, Any] = field(default_factory=dict)  # Program.metadata (read-only by convention)
    verify: bool = False              # verify mode: a pass may add accuracy stats (quantize: layer_sqnr)
    weights: Any = None               # --stream-weights: the WeightSource of the graph's META weights

    def weight(self, gm: torch.fx.GraphModule, target: str) -> torch.Tensor:
        """The VALUES of graph attribute ``target`` (``lm.<transformers name>``). Under --stream-weights the graph
        holds meta tensors and this loads the weight from the source onto the compile device; the caller owns the
        result (nothing is cached), so a pass that reads values must use this instead of the attribute."""
        obj: Any = gm
        for part in target.split("."):
            obj = getattr(obj, part)
        if obj.is_meta and self.weights is not None and target.startswith("lm."):
            return self.weights.load(target[len("lm."):], obj.dtype, getattr(self.compile_config, "device", "cpu"))
        return obj


@dataclass(frozen=True)
class PassSpec:
    name: str
    fn: PassFn
    description: str
    requires: tuple[str, ...] = ()
    guarantees: tuple[str, ...] = ()
    before: tuple[str, ...] = ()
    after: tuple[str, ...] = ()
    options: type | None = None       # frozen dataclass type of this pass's options
    default: bool = True              # runs unless skipped
    source: str = "builtin"           # builtin | entry-point | user
    programs: tuple[str, ...] = ("text",)   # which Program kinds it runs on: "text", "vision"

    def ordering(self) -> str:
        parts = []
        for label, values in (("after", self.after), ("before", self.before),
                              ("requires", self.requires), ("guarantees", self.guarantees)):
            if values:
                parts.append(f"{label}={','.join(values)}")
        return " ".join(parts) or "-"


_REGISTRY: dict[str, PassSpec] = {}
PROGRAM_KINDS = ("text", "vision")


def register_pass(name: str, *, requires=(), guarantees=(), before=(), after=(), options: type | None = None,
                  default: bool = True, description: str | None = None, source: str = "builtin",
                  programs: tuple[str, ...] = ("text",)):
    """Decorator: register ``fn`` as pass ``name``. The docstring's first line is its description.
    ``programs``: the Program kinds it applies to (the text model, the vision tower, or both)."""
    bad = [p for p in programs if p not in PROGRAM_KINDS]
    if not programs or bad:
        raise TypeError(f"pass {name}: programs must be a non-empty subset of {PROGRAM_KINDS}, got {programs!r}")
    if options is not None and not (dataclasses.is_dataclass(options) and options.__dataclass_params__.frozen):
        raise TypeError(f"pass {name}: options must be a frozen dataclass type")

    def deco(fn: PassFn) -> PassFn:
        desc = description or ((fn.__doc__ or "").strip().splitlines() or [""])[0]
        spec = PassSpec(name=name, fn=fn, description=desc, requires=tuple(requires),
                        guarantees=tuple(guarantees), before=tuple(before), after=tuple(after),
                        options=options, default=default, source=source, programs=tuple(programs))
        old = _REGISTRY.get(name)
        if old is not None and old.fn.__qualname__ != fn.__qualname__:
            raise L4Error(f"pass name '{name}' is already registered by {old.fn.__module__}.{old.fn.__qualname__}")
        _REGISTRY[name] = spec
        fn._l4_pass = spec  # type: ignore[attr-defined]
        return fn

    return deco


def registered_passes() -> dict[str, PassSpec]:
    return dict(_REGISTRY)


def get_pass(name: str) -> PassSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise L4Error(f"unknown pass '{name}'; known passes: {', '.join(sorted(_REGISTRY))}") from None


def order_passes(specs: list[PassSpec]) -> list[PassSpec]:
    """Topologically order ``specs`` by their declarations. Edges to passes not in ``specs`` are ignored,
    except a ``requires`` property that no selected pass guarantees, which is an error."""
    by_name = {s.name: s for s in specs}
    g = nx.DiGraph()
    g.add_nodes_from(by_name)
    providers: dict[str, list[str]] = {}
    for s in specs:
        for prop in s.guarantees:
            providers.setdefault(prop, []).append(s.name)
    for s in specs:
        for a in s.after:
            if a in by_name:
                g.add_edge(a, s.name)
        for b in s.before:
            if b in by_name:
                g.add_edge(s.name, b)
        for prop in s.requires:
            if prop not in providers:
                raise L4Error(f"pass '{s.name}' requires '{prop}', which no selected pass guarantees "
                              f"(was a pass it needs skipped?)")
            for p in providers[prop]:
                if p != s.name:
                    g.add_edge(p, s.name)
    try:
        names = list(nx.lexicographical_topological_sort(g))
    except nx.NetworkXUnfeasible:
        cycle = " -> ".join(a for a, _ in nx.find_cycle(g))
        raise L4Error(f"pass ordering has a cycle: {cycle}") from None
    return [by_name[n] for n in names]
