"""The pass manager: selects, orders, runs, times, lints and (optionally) verifies passes over a Program.

Selection: every registered pass with ``default=True`` (builtins and entry-point passes from the group
``l4compile.passes``), plus user passes given as ``MODULE:FUNC``, minus ``--skip-pass`` names. Order: from the
passes' declarations only (``passes._registry.order_passes``).
"""
from __future__ import annotations

import importlib
import importlib.metadata
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from l4compile import pass_options as po
from l4compile.errors import L4Error
from l4compile.passes import _registry as reg
from l4compile.program import Program

ENTRY_POINT_GROUP = "l4compile.passes"


@dataclass
class PassRecord:
    name: str
    seconds: float
    changed: bool
    stats: dict[str, Any] = field(default_factory=dict)
    drift: float | None = None          # verify mode, exact pass: max|out - ref| / max|ref| after this pass
    sqnr_db: float | None = None        # verify mode, lossy pass: logit SQNR of its output against its input

    def to_dict(self) -> dict[str, Any]:
        d = {"name": self.name, "seconds": round(self.seconds, 4), "changed": self.changed, "stats": self.stats}
        if self.drift is not None:
            d["drift"] = self.drift
        if self.sqnr_db is not None:
            d["logit_sqnr_db"] = round(self.sqnr_db, 2)
        return d


def load_entry_point_passes() -> list[str]:
    """Import every module registered under the entry-point group; their decorators register passes."""
    names = []
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except Exception as e:  # a broken plugin is the user's to fix; name it
            raise L4Error(f"cannot load pass plugin '{ep.name}' ({ep.value}): {e}") from None
        spec = getattr(obj, "_l4_pass", None)
        if spec is not None:
            names.append(spec.name)
    return names


def load_user_pass(ref: str) -> reg.PassSpec:
    """``MODULE:FUNC`` -> PassSpec. An undecorated function is registered as a pass that runs last."""
    mod_name, sep, func_name = ref.partition(":")
    if not sep or not mod_name or not func_name:
        raise L4Error(f"--pass '{ref}' must look like MODULE:FUNC (e.g. mypasses:strip_asserts)")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise L4Error(f"--pass '{ref}': cannot import module '{mod_name}': {e}") from None
    fn = getattr(mod, func_name, None)
    if not callable(fn):
        raise L4Error(f"--pass '{ref}': module '{mod_name}' has no function '{func_name}'")
    spec = getattr(fn, "_l4_pass", None)
    if spec is None:
        builtin = [s.name for s in reg.registered_passes().values() if s.default]
        reg.register_pass(func_name, after=tuple(builtin), source="user")(fn)
        spec = fn._l4_pass
    return spec


def select_passes(user: tuple[str, ...] = (), skip: tuple[str, ...] = (), kind: str = "text") -> list[reg.PassSpec]:
    """The ordered passes for a Program of ``kind`` (a pass runs on the kinds its ``programs`` names)."""
    import l4compile.passes  # noqa: F401  (builtins register on import)

    load_entry_point_passes()
    known = reg.registered_passes()
    for name in skip:
        if name not in known:
            raise L4Error(f"--skip-pass '{name}': no such pass; known passes: {', '.join(sorted(known))}")
    chosen = {s.name: s for s in known.values() if s.default}
    for ref in user:
        spec = load_user_pass(ref)
        chosen[spec.name] = spec
    return reg.order_passes([s for n, s in chosen.items() if n not in skip and kind in s.programs])


def check_pass_options(pass_options: dict, user: tuple[str, ...] = (), skip: tuple[str, ...] = ()) -> None:
    """L4Error unless every option is for a pass this compile runs on some program kind, and fits its options
    dataclass (``l4compile.pass_options``)."""
    specs = {s.name: s for kind in reg.PROGRAM_KINDS for s in select_passes(user, skip, kind)}
    po.check(pass_options, list(specs.values()), reg.registered_passes())


def lint(gm: torch.fx.GraphModule, pass_name: str) -> None:
    """Structural checks after every pass: fx's lint (well-formed, every get_attr resolves), one output."""
    try:
        gm.graph.lint()
    except Exception as e:
        raise L4Error(f"pass '{pass_name}' left a malformed graph: {e}") from None
    outputs = [n for n in gm.graph.nodes if n.op == "output"]
    if len(outputs) != 1:
        raise L4Error(f"pass '{pass_name}' left {len(outputs)} output nodes")


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().float(), ref.detach().float()
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def dump_graph(gm: torch.fx.GraphModule, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(gm.print_readable(print_output=False, include_stride=False, include_device=False))


def run_passes(program: Program, compile_config: Any, *, dump_ir: Path | None = None,
               reference: torch.Tensor | None = None, tolerance: float = 1e-4,
               on_pass: Callable[[str, float], None] | None = None) -> list[PassRecord]:
    """Run the selected passes over ``program`` in order. With ``reference`` (the eager model's logits on
    ``program.example_inputs``), verify after each pass and raise naming the first pass that failed:

    * an exact pass (``PassResult.min_logit_sqnr_db`` None) must keep ``max|out - ref| / max|ref| <= tolerance``
      (``PassRecord.drift``), ``ref`` being ``reference`` or, after a lossy pass, that pass's output;
    * a lossy pass (quantize with a scheme) must keep the logit SQNR of its output against its INPUT's output
      at or above the bound it declares (``PassRecord.sqnr_db``; fp8 25 dB, int4 18 dB as in the parity matrix).
    """
    from l4compile.quant import sqnr_db

    specs = select_passes(compile_config.passes, compile_config.skip_passes, program.kind)
    records: list[PassRecord] = []
    verify = reference is not None
    if verify:
        with torch.no_grad():
            before = program.run_example()       # what the first pass's input graph computes
    if dump_ir is not None:
        dump_graph(program.gm, dump_ir / "00-traced.txt")
    for i, spec in enumerate(specs, start=1):
        options = po.build(spec, compile_config.options_for(spec.name))
        ctx = reg.PassContext(model_config=program.model_config, compile_config=compile_config, options=options,
                              example_inputs=program.example_inputs, metadata=program.metadata, verify=verify,
                              weights=program.weights)
        t0 = time.perf_counter()
        result = spec.fn(program.gm, ctx)
        seconds = time.perf_counter() - t0
        if not isinstance(result, reg.PassResult):
            raise L4Error(f"pass '{spec.name}' returned {type(result).__name__}, not PassResult")
        program.gm = result.gm
        program.gm.recompile()
        lint(program.gm, spec.name)
        rec = PassRecord(spec.name, seconds, result.changed, dict(result.stats))
        if verify:
            with torch.no_grad():
                out = program.run_example()
            bound = result.min_logit_sqnr_db
            if bound is not None:
                rec.sqnr_db = sqnr_db(before, out)
                if not rec.sqnr_db >= bound:
                    raise L4Error(f"verify: lossy pass '{spec.name}' brought the logit SQNR against its input down to "
                                  f"{rec.sqnr_db:.1f} dB < {bound:g} dB; this model does not keep its accuracy under "
                                  f"it (random-weight presets never do); compile without it or without --verify")
                reference = out                  # later exact passes are held to the lossy pass's output
            else:
                rec.drift = _rel_err(out, reference)
                if not rec.drift <= tolerance:
                    raise L4Error(f"verify: pass '{spec.name}' changed the model's output (max relative logit error "
                                  f"{rec.drift:.3g} > {tolerance:g}); rerun with --skip-pass {spec.name}")
            before = out
        if dump_ir is not None:
            dump_graph(program.gm, dump_ir / f"{i:02d}-{spec.name}.txt")
        records.append(rec)
        if on_pass is not None:
            on_pass(spec.name, seconds)
    return records
