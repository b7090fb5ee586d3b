"""``l4compile plan MODEL --gpus N --gpu-mem 80GiB [...]``: choose an expert-sharding layout.

Wiring (l4compile/cli.py): ``from l4compile.plan import cli as plan_cli``; ``plan_cli.add_parser(sub)`` in
``build_parser``; ``"plan": plan_cli.run`` in ``COMMANDS``. Exit 0 when a layout fits, 1 when none does
(the output says what would make it fit), 2 for user errors (L4Error)."""
from __future__ import annotations

import argparse
import json

from l4compile.errors import L4Error


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "plan", help="plan expert sharding over GPUs: per-rank memory, max context, communication",
        description="Plan how to shard MODEL (built on the meta device: no weights are loaded) over --gpus GPUs "
                    "of --gpu-mem each: per-rank memory by dtype, KV cache with ring buffers for chunked "
                    "layers, the maximum context, per-token communication, and the best feasible layout.")
    p.add_argument("model", metavar="MODEL", help="checkpoint directory or preset name (scout, maverick, ...)")
    p.add_argument("--gpus", default="1", help="number of GPUs (default 1)")
    p.add_argument("--gpu-mem", default="80GiB", help="memory per GPU, e.g. 80GiB or 141GB (default 80GiB)")
    p.add_argument("--quant", default="none", help="none | fp8 | int4 (weights; router, norms, embeddings stay bf16)")
    p.add_argument("--max-seq-len", default=None, help="context each sequence must hold (default: one attention "
                                                       "chunk, 8192 for Llama 4)")
    p.add_argument("--batch-size", default="1", help="sequences served at once (default 1)")
    p.add_argument("--kv-dtype", default="bf16", help="bf16 | fp8")
    p.add_argument("--calibrate", action="store_true",
                   help="balance expert placement on routing loads measured on calibration prompts "
                        "(real, small checkpoints only)")
    p.add_argument("--calibration-ids", default=None, metavar="FILE",
                   help="with --calibrate: one prompt per line, comma-separated token ids")
    p.add_argument("--reserve", default=None, help="memory kept free per GPU (default max(2GiB, 5%%))")
    p.add_argument("--prefill-chunk", default=None, help="tokens per sequence per prefill step (default 8192)")
    p.add_argument("--no-trace", action="store_true",
                   help="take the inventory from the module's parameters instead of tracing the graph")
    p.add_argument("--json", action="store_true", help="print one JSON object (the last stdout line)")
    return p


def _int(option: str, text, *, allow_none: bool = False) -> int | None:
    if text is None and allow_none:
        return None
    try:
        v = int(str(text))
    except ValueError:
        raise L4Error(f"{option} '{text}' is not an integer") from None
    if v < 1:
        raise L4Error(f"{option} must be at least 1, got {v}")
    return v


def request_from_args(a):
    from l4compile.plan.memory import parse_size
    from l4compile.plan.planner import PlanRequest

    return PlanRequest(model=a.model, gpus=_int("--gpus", a.gpus), gpu_mem=parse_size(a.gpu_mem, "--gpu-mem"),
                       quant=a.quant, max_seq_len=_int("--max-seq-len", a.max_seq_len, allow_none=True),
                       batch_size=_int("--batch-size", a.batch_size), kv_dtype=a.kv_dtype, calibrate=a.calibrate,
                       calibration_ids=a.calibration_ids,
                       reserve=parse_size(a.reserve, "--reserve") if a.reserve is not None else None,
                       prefill_chunk=_int("--prefill-chunk", a.prefill_chunk, allow_none=True),
                       trace=not a.no_trace)


def format_table(plan) -> str:
    from l4compile.plan.memory import fmt_bytes, fmt_tokens

    r, b, cap = plan.request, plan.best, plan.model_max_context
    lines = [f"plan {r.model}: {r.gpus} x {fmt_bytes(r.gpu_mem)}, quant {r.quant}, kv {r.kv_dtype}, "
             f"batch {r.batch_size}, context required {plan.required_context} (inventory: {plan.inventory_source}; "
             f"experts: {plan.placement_source})", ""]
    hdr = f"{'':2}{'layout':<76}{'fullest rank':>13}{'max context':>13}{'comm B/tok':>12}{'decode ms':>11}"
    lines += [hdr, "-" * len(hdr)]
    rows = sorted(plan.evaluations, key=lambda e: (e.invalid is not None, not e.feasible,
                                                   e.time.get("step_s", 0) if e.time else 0))
    for e in rows:
        mark = "* " if e is b else "  "
        if e.invalid:
            lines.append(f"{mark}{e.strategy.label(r.gpus):<76}  invalid: {e.invalid}")
            continue
        ctx = fmt_tokens(min(e.max_context, cap)) if e.feasible else "no fit"
        lines.append(f"{mark}{e.strategy.label(r.gpus):<76}{fmt_bytes(e.peak_bytes):>13}{ctx:>13}"
                     f"{e.comm.bytes_per_token:>12,.0f}{e.time['step_s'] * 1e3:>11.3f}")
    if b is not None:
        lines += ["", f"per rank ({b.strategy.label(r.gpus)}):",
                  f"{'rank':>4} {'experts/layer':>13} {'weights':>10} {'by dtype':<52}{'kv':>9}{'act':>9}"
                  f"{'reserve':>9}{'total':>10}"]
        for rk in b.ranks:
            m = rk["memory"]
            ex = rk["experts"]
            n_ex = str(len(next(iter(ex.values())))) if isinstance(ex, dict) and ex else "all/TP"
            dt = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in m["weights_by_dtype"].items())
            lines.append(f"{rk['rank']:>4} {n_ex:>13} {fmt_bytes(m['weights']):>10} {dt:<52}"
                         f"{fmt_bytes(m['kv_cache']):>9}{fmt_bytes(m['activations']):>9}"
                         f"{fmt_bytes(m['reserve']):>9}{fmt_bytes(m['total']):>10}")
        if b.comm and b.comm.breakdown:
            lines.append("communication per token: " + "; ".join(f"{k} {v:,.0f} B" for k, v in b.comm.breakdown.items()))
        if b.feasible:
            lines.append(f"max context {fmt_tokens(min(b.max_context, cap))} tokens per sequence (memory holds "
                         f"{fmt_tokens(b.max_context)}; {fmt_tokens(b.max_context_without_rings)} without ring "
                         f"buffers); model limit {fmt_tokens(cap)}")
    lines += ["", ("FEASIBLE: " if plan.feasible else "NOT FEASIBLE: ") + plan.reason]
    return "\n".join(lines)


def run(args) -> int:
    from l4compile.plan.planner import make_plan

    plan = make_plan(request_from_args(args))
    if args.json:
        print(json.dumps(plan.to_json()))
    else:
        print(format_table(plan))
    return 0 if plan.feasible else 1
