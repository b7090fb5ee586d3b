"""The planner: inventory + layouts + memory + cost -> a ranked list of layouts and the chosen one.

Usage::

    from l4compile.plan import PlanRequest, make_plan
    plan = make_plan(PlanRequest("maverick", gpus=8, gpu_mem=80 * GiB, quant="fp8"))
    plan.feasible, plan.best.strategy, plan.to_json()
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from l4compile.errors import L4Error
from l4compile.plan import cost as costm
from l4compile.plan import memory as mem
from l4compile.plan.inventory import ParamRecord
from l4compile.plan.layouts import (Strategy, balanced_placement, candidates, even_placement, invalid_reason,
                                    kv_heads_local, local_matrices, rank_loads)

MAX_GPUS_SUGGESTED = 64
KV_DTYPES = ("bf16", "fp8")


@dataclass(frozen=True)
class PlanRequest:
    model: str
    gpus: int
    gpu_mem: int                               # bytes per GPU
    quant: str = "none"
    max_seq_len: int | None = None             # required context per sequence (default: one attention chunk)
    batch_size: int = 1                        # sequences served at once
    kv_dtype: str = "bf16"
    calibrate: bool = False
    calibration_ids: str | None = None         # file: one prompt per line, comma-separated token ids
    reserve: int | None = None                 # bytes per GPU kept free (default max(2 GiB, 5%))
    prefill_chunk: int | None = None           # tokens per sequence per prefill step (default: chunk size)
    trace: bool = True                         # inventory from the traced graph (else from named_parameters)

    def __post_init__(self):
        for name in ("gpus", "gpu_mem", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise L4Error(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
        for name in ("max_seq_len", "prefill_chunk"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise L4Error(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
        mem.get_scheme(self.quant)
        if self.kv_dtype not in KV_DTYPES:
            raise L4Error(f"unknown --kv-dtype '{self.kv_dtype}'; use one of: {', '.join(KV_DTYPES)}")
        if self.reserve is not None and not 0 <= self.reserve < self.gpu_mem:
            raise L4Error("--reserve must be smaller than --gpu-mem")


@dataclass
class Evaluation:
    strategy: Strategy
    invalid: str | None
    ranks: list[dict] = field(default_factory=list)
    max_context: int = 0                      # tokens per sequence that fit (uncapped by the model)
    peak_bytes: int = 0                       # the fullest rank at the required context
    comm: costm.Comm | None = None
    time: dict = field(default_factory=dict)
    feasible: bool = False
    imbalance: float = 1.0                    # busiest EP rank's routed load / mean (1 = even)
    max_context_without_rings: int = 0        # the same memory if every layer kept the whole context


@dataclass
class Plan:
    request: PlanRequest
    model_config: object
    inventory_source: str
    required_context: int
    model_max_context: int
    evaluations: list[Evaluation]
    best: Evaluation | None
    reason: str
    placement_source: str
    suggestions: list[str]

    @property
    def feasible(self) -> bool:
        return self.best is not None and self.best.feasible

    def to_json(self) -> dict:
        r, c, b = self.request, self.model_config, self.best
        out = {"feasible": self.feasible, "model": r.model, "gpus": r.gpus, "gpu_mem_bytes": r.gpu_mem,
               "quant": r.quant, "kv_dtype": r.kv_dtype, "batch_size": r.batch_size,
               "required_context_tokens": self.required_context, "inventory": self.inventory_source,
               "expert_placement": self.placement_source,
               "strategy": b.strategy.label(r.gpus) if b else None,
               "layout": b.strategy.to_dict() if b else None,
               "ranks": b.ranks if b else [],
               "max_context_tokens": min(b.max_context, self.model_max_context) if b else 0,
               "max_context_tokens_uncapped": b.max_context if b else 0,
               "max_context_tokens_without_rings": min(b.max_context_without_rings, self.model_max_context)
               if b else 0,
               "model_max_position_embeddings": self.model_max_context,
               "expert_load_imbalance": round(b.imbalance, 4) if b else None,
               "comm_bytes_per_token": round(b.comm.bytes_per_token) if b and b.comm else 0,
               "comm_breakdown": {k: round(v) for k, v in b.comm.breakdown.items()} if b and b.comm else {},
               "decode_step_ms": round(b.time["step_s"] * 1e3, 4) if b and b.time else None,
               "reason": self.reason, "suggestions": self.suggestions,
               "candidates": [_eval_summary(e, r.gpus, self.model_max_context) for e in self.evaluations],
               "model_config": {"layers": c.num_hidden_layers, "experts": c.num_local_experts,
                                "moe_layers": list(c.moe_layers), "hidden": c.hidden_size}}
        return out


def _eval_summary(e: Evaluation, n: int, cap: int) -> dict:
    d = {"strategy": e.strategy.label(n), "layout": e.strategy.to_dict(), "valid": e.invalid is None}
    if e.invalid:
        d["invalid"] = e.invalid
        return d
    d.update(feasible=e.feasible, peak_bytes=e.peak_bytes, max_context_tokens=min(e.max_context, cap),
             comm_bytes_per_token=round(e.comm.bytes_per_token), decode_step_ms=round(e.time["step_s"] * 1e3, 4))
    return d


# ------------------------------------------------------------------------------------------ evaluation

class _Model:
    """What one evaluation needs from the inventory, computed once per (request, config)."""

    def __init__(self, records: list[ParamRecord], cfg, scheme: mem.QuantScheme):
        self.records, self.cfg, self.scheme = records, cfg, scheme
        self.moe_layers = sorted({r.layer for r in records if r.group == "experts"})
        from l4compile.passes.kv_cache import cache_layout
        import torch
        chunk = int(cfg.attention_chunk_size)
        lay = cache_layout(cfg, chunk, torch.bfloat16, ring_buffers=True)
        self.ring_bytes = lay["ring_bytes"]                       # all kv heads, bf16, one sequence
        self.bpt_global = lay["bytes_per_token"]                  # grows with context
        self.bpt_all = lay["bytes_per_token_without_rings"]       # below one chunk every layer grows
        self.chunk = chunk


def _weights(m: _Model, s: Strategy, n: int, placement: dict[int, list[list[int]]]):
    """-> per rank: (bytes by label, bytes by group, elements read per token (non-expert),
    {layer: bytes per local expert}, {layer: elements per expert})."""
    base_lbl: dict[str, int] = {}
    base_grp: dict[str, int] = {}
    base_elems = 0
    base_read = 0
    expert_recs = []
    for rec in m.records:
        if rec.group == "experts":
            expert_recs.append(rec)
            continue
        cnt, out, inp = local_matrices(rec, s, m.cfg, n, 0)
        b = mem.matrix_bytes(cnt, out, inp, rec.elem_bytes, m.scheme.quantized(rec.role), m.scheme)
        for k, v in b.items():
            base_lbl[k] = base_lbl.get(k, 0) + v
        tot = sum(b.values())
        base_grp[rec.group] = base_grp.get(rec.group, 0) + tot
        if rec.role != "embedding":          # a decode step gathers B embedding rows, reads everything else
            base_read += tot
            base_elems += cnt * out * inp
    ranks = []
    for r in range(n):
        lbl, grp = dict(base_lbl), dict(base_grp)
        per_expert: dict[int, int] = {}
        per_expert_elems: dict[int, int] = {}
        for rec in expert_recs:
            n_local = len(placement[rec.layer][r]) if s.experts == "ep" else rec.shape[0]
            cnt, out, inp = local_matrices(rec, s, m.cfg, n, n_local)
            b = mem.matrix_bytes(cnt, out, inp, rec.elem_bytes, m.scheme.quantized(rec.role), m.scheme)
            one = mem.matrix_bytes(1, out, inp, rec.elem_bytes, m.scheme.quantized(rec.role), m.scheme)
            for k, v in b.items():
                lbl[k] = lbl.get(k, 0) + v
            grp["experts"] = grp.get("experts", 0) + sum(b.values())
            per_expert[rec.layer] = per_expert.get(rec.layer, 0) + sum(one.values())
            per_expert_elems[rec.layer] = per_expert_elems.get(rec.layer, 0) + out * inp
        ranks.append((lbl, grp, base_read, base_elems, per_expert, per_expert_elems))
    return ranks


def _sequences(s: Strategy, n: int, b: int) -> list[int]:
    if s.attention == "tp":
        return [b] * n
    return [b // n + (1 if r < b % n else 0) for r in range(n)]


def _kv(m: _Model, heads_local: int, kv_dtype: str, ctx: int, seqs: int) -> float:
    scale = (mem.KV_BYTES[kv_dtype] / 2) * heads_local / m.cfg.num_key_value_heads
    if ctx <= m.chunk:
        return seqs * scale * m.bpt_all * ctx
    return seqs * scale * (m.ring_bytes + m.bpt_global * ctx)


def _max_context(m: _Model, heads_local: int, kv_dtype: str, free: float, seqs: int, rings: bool = True) -> int:
    """Largest context whose KV cache for ``seqs`` sequences fits in ``free`` bytes (closed form)."""
    if seqs == 0:
        return 1 << 62
    if free <= 0:
        return 0
    scale = (mem.KV_BYTES[kv_dtype] / 2) * heads_local / m.cfg.num_key_value_heads
    per_seq = free / seqs / scale
    if per_seq <= m.bpt_all * m.chunk or not rings:
        return int(per_seq // m.bpt_all)
    if m.bpt_global == 0:
        return 1 << 62
    return int((per_seq - m.ring_bytes) // m.bpt_global)


def _activations(m: _Model, s: Strategy, n: int, tokens: int, seqs: int) -> int:
    c = m.cfg
    a = costm.ACT_BYTES
    tp = lambda d, choice: d // n if choice == "tp" else d   # noqa: E731
    attn = (tp(c.num_attention_heads, s.attention) + 2 * kv_heads_local(s, c, n)) * c.head_dim
    widths = [tp(c.intermediate_size, s.shared)]
    if s.dense_mlp != "n/a":
        widths.append(tp(c.intermediate_size_mlp, s.dense_mlp))
    k = c.num_experts_per_tok
    if s.experts == "ep":
        share = mem.EXPERT_CAPACITY / n if s.attention == "tp" else mem.EXPERT_CAPACITY
        widths.append(int(k * c.intermediate_size * share))
    else:
        widths.append(k * c.intermediate_size // n)
    per_token = a * (mem.ACT_HIDDEN_COPIES * c.hidden_size + attn + 3 * max(widths))
    vocab_local = math.ceil(c.vocab_size / n) if s.vocab == "tp" else c.vocab_size
    return int(mem.ACT_SAFETY * tokens * per_token + seqs * vocab_local * 4)


def evaluate(m: _Model, s: Strategy, req: PlanRequest, required: int, loads: dict[int, list[float]] | None,
             placement_fn=None) -> Evaluation:
    n, cfg = req.gpus, m.cfg
    why = invalid_reason(s, cfg, n)
    ev = Evaluation(s, why)
    if why:
        return ev
    e_count = cfg.num_local_experts
    placement = {}
    for layer in m.moe_layers:
        if loads and s.experts == "ep":
            placement[layer] = balanced_placement(loads[layer], n)
        else:
            placement[layer] = even_placement(e_count, n) if s.experts == "ep" else [list(range(e_count))] * n
    heads = kv_heads_local(s, cfg, n)
    seqs = _sequences(s, n, req.batch_size)
    reserve = req.reserve if req.reserve is not None else mem.default_reserve(req.gpu_mem)
    prefill = min(req.prefill_chunk or m.chunk, required)
    weights = _weights(m, s, n, placement)
    ev.comm = costm.communication(s, cfg, n)
    k, b = cfg.num_experts_per_tok, req.batch_size
    shares = {layer: ([x / sum(loads[layer]) for x in loads[layer]] if loads and sum(loads[layer]) else
                      [1.0 / e_count] * e_count) for layer in m.moe_layers}
    max_ctx, peak, worst, no_rings = 1 << 62, 0, None, 1 << 62
    # Routed experts per MoE layer: a layer finishes when its busiest rank does, so every rank pays the
    # busiest rank's expert reads and routed FLOPs. Under EP the busiest rank touches about t + sqrt(t)
    # experts (t: its expected distinct experts touched; Poisson spread) and at least one: with B = 1 one
    # rank reads a whole expert per layer while the others wait.
    expert_read, expert_flops = 0.0, 0.0
    imbalance = 1.0
    for layer in m.moe_layers:
        pe, pe_elems = weights[0][4][layer], weights[0][5][layer]
        if s.experts == "ep":
            reads, flops_l = [], []
            for r in range(n):
                p = [k * shares[layer][e] for e in placement[layer][r]]
                touched = sum(costm.touched_fraction(x, b) for x in p)
                busiest = max(1.0, touched + math.sqrt(touched)) if n > 1 else touched
                reads.append(min(len(p), busiest) * pe)
                flops_l.append(2.0 * pe_elems * b * sum(p))
            expert_read += max(reads)
            expert_flops += max(flops_l)
            if loads:
                imbalance = max(imbalance, max(rank_loads(placement[layer], shares[layer])) * n)
        else:
            expert_read += pe * sum(costm.touched_fraction(k * x, b) for x in shares[layer])
            expert_flops += 2.0 * pe_elems * b * k
    q_local = (cfg.num_attention_heads // n if s.attention == "tp" else cfg.num_attention_heads) * cfg.head_dim
    attended = sum(min(m.chunk, required) if t == "chunked_attention" else required for t in cfg.layer_types)
    for r in range(n):
        lbl, grp, base_read, base_elems, _, _ = weights[r]
        w_total = sum(lbl.values())
        tok_r = b if s.attention == "tp" else seqs[r]
        act = _activations(m, s, n, tok_r * prefill, tok_r)
        kv_req = _kv(m, heads, req.kv_dtype, required, seqs[r])
        total = w_total + reserve + act + kv_req
        free = req.gpu_mem - w_total - reserve - act
        max_ctx = min(max_ctx, _max_context(m, heads, req.kv_dtype, free, seqs[r]))
        no_rings = min(no_rings, _max_context(m, heads, req.kv_dtype, free, seqs[r], rings=False))
        peak = max(peak, int(total))
        # decode step at the required context: B sequences, one token each
        read = base_read + kv_req + expert_read
        flops = 2.0 * base_elems * tok_r + expert_flops + 4.0 * q_local * attended * tok_r
        t = costm.step_time(read, flops, ev.comm, b)
        if worst is None or t["step_s"] > worst["step_s"]:
            worst = t
        ev.ranks.append({
            "rank": r,
            "experts": {str(layer): placement[layer][r] for layer in m.moe_layers} if s.experts == "ep" else "all (TP)",
            "sequences": seqs[r],
            "memory": {"weights": int(w_total), "weights_by_dtype": {k2: int(v) for k2, v in sorted(lbl.items())},
                       "weights_by_group": {k2: int(v) for k2, v in sorted(grp.items())},
                       "kv_cache": int(kv_req), "activations": int(act), "reserve": int(reserve),
                       "total": int(total), "capacity": req.gpu_mem},
        })
    ev.max_context, ev.peak_bytes, ev.time = max_ctx, peak, worst
    ev.imbalance, ev.max_context_without_rings = imbalance, no_rings
    ev.feasible = max_ctx >= required
    return ev


# ------------------------------------------------------------------------------------------ top level

def required_context(req: PlanRequest, cfg) -> int:
    cap = int(cfg.max_position_embeddings)
    if req.max_seq_len is not None:
        if req.max_seq_len > cap:
            raise L4Error(f"--max-seq-len {req.max_seq_len} exceeds the model's max_position_embeddings {cap}")
        return req.max_seq_len
    return min(int(cfg.attention_chunk_size), cap)


def _pick(evals: list[Evaluation]) -> Evaluation | None:
    ok = [e for e in evals if e.feasible]
    if ok:
        return min(ok, key=lambda e: (round(e.time["step_s"], 9), -e.max_context, e.peak_bytes))
    valid = [e for e in evals if e.invalid is None]
    return min(valid, key=lambda e: e.peak_bytes) if valid else None


def _evaluate_all(m: _Model, req: PlanRequest, required: int, loads) -> list[Evaluation]:
    return [evaluate(m, s, req, required, loads) for s in candidates(m.cfg, req.gpus)]


def _suggest(records, cfg, req: PlanRequest, required: int, best: Evaluation | None) -> list[str]:
    """What would make an infeasible request fit: more GPUs, lighter weights/KV, a bigger GPU, less context."""
    from dataclasses import replace
    out = []
    m = _Model(records, cfg, mem.get_scheme(req.quant))
    for n in range(req.gpus + 1, MAX_GPUS_SUGGESTED + 1):
        r2 = replace(req, gpus=n, calibrate=False)
        if any(e.feasible for e in _evaluate_all(m, r2, required, None)):
            out.append(f"--gpus {n}")
            break
    order = ("none", "fp8", "int4")
    for q in order[order.index(req.quant) + 1:]:
        r2 = replace(req, quant=q, calibrate=False)
        evs = _evaluate_all(_Model(records, cfg, mem.get_scheme(q)), r2, required, None)
        fits = [e for e in evs if e.feasible]
        if fits:
            out.append(f"--quant {q} (max context {mem.fmt_tokens(max(e.max_context for e in fits))})")
            break
    if req.kv_dtype == "bf16":
        r2 = replace(req, kv_dtype="fp8", calibrate=False)
        if any(e.feasible for e in _evaluate_all(m, r2, required, None)):
            out.append("--kv-dtype fp8")
    if best is not None:
        out.append(f"--gpu-mem {math.ceil(best.peak_bytes / mem.GiB)}GiB")
        longest = max(e.max_context for e in _evaluate_all(m, req, required, None) if e.invalid is None)
        if longest > 0:
            out.append(f"--max-seq-len {longest}")
        if req.batch_size > 1:
            out.append("a smaller --batch-size")
    return out


def make_plan(req: PlanRequest, records: list[ParamRecord] | None = None, cfg=None,
              inventory_source: str = "given", loads: dict[int, list[float]] | None = None) -> Plan:
    """Plan ``req``. ``records``/``cfg`` skip loading the model (tests pass a cached inventory)."""
    if records is None:
        from l4compile.plan.inventory import load_inventory
        records, cfg, inventory_source = load_inventory(req.model, trace=req.trace)
    placement_source = "even (contiguous blocks)"
    if req.calibrate and loads is None:
        from l4compile.plan.calibrate import measure_loads
        loads = measure_loads(req.model, records, cfg, req.calibration_ids)
    if loads:
        placement_source = "balanced on calibrated routing loads"
    required = required_context(req, cfg)
    m = _Model(records, cfg, mem.get_scheme(req.quant))
    evals = _evaluate_all(m, req, required, loads)
    best = _pick(evals)
    cap = int(cfg.max_position_embeddings)
    n_ok = sum(e.feasible for e in evals)
    suggestions: list[str] = []
    if best is None:
        reasons = sorted({e.invalid for e in evals if e.invalid})
        reason = f"no layout can run on {req.gpus} GPUs: " + "; ".join(reasons)
    elif best.feasible:
        rank = max(best.ranks, key=lambda x: x["memory"]["total"])
        reason = (f"fits: the fullest rank uses {mem.fmt_bytes(rank['memory']['total'])} of "
                  f"{mem.fmt_bytes(req.gpu_mem)} at {required} tokens x {req.batch_size} sequences; "
                  f"chosen for the lowest estimated decode step ({best.time['step_s'] * 1e3:.3f} ms) among "
                  f"{n_ok} feasible layouts; max context {mem.fmt_tokens(min(best.max_context, cap))} tokens"
                  + (" (the model's limit)" if best.max_context >= cap else ""))
    else:
        suggestions = _suggest(records, cfg, req, required, best)
        reason = (f"does not fit: the least memory any layout needs is {mem.fmt_bytes(best.peak_bytes)} on its "
                  f"fullest rank ({required} tokens x {req.batch_size} sequences), {mem.fmt_bytes(req.gpu_mem)} "
                  f"available; would fit with: " + (", or ".join(suggestions) if suggestions else "nothing tried"))
    return Plan(req, cfg, inventory_source, required, cap, evals, best, reason, placement_source, suggestions)
