# T tokens, N out features, K in features, G Int4 scale group, E experts, H hidden, I expert width
"""Compile-time tuning of the Int4 kernels' blocks on the GPU an engine is built for (``compile --tune-kernels``).

``layout`` picks Int4 blocks from weight shapes alone, before anything has run: a decode GEMV's best split-K,
BN, unpack and warps depend on the GPU (132 SMs on an H100, 3.35 or 4.8 TB/s, its latency) and are measured here
instead. For each distinct Int4 problem of a graph (``problems``: the l4::linear_int4 and l4::moe_q nodes on Int4
weights, keyed as ``tuned_blocks`` keys them), ``tune``:

    1. makes random weights of the problem's shapes on the GPU, packed as the quantize pass packs them, and an
       activation of T tokens for each T in ``tokens`` (default 1: a batch-1 decode step);
    2. runs every candidate (``int4_candidates`` / ``moe_candidates``: layout's choice, split-K, BN 32, 8 warps,
       the inline-PTX unpack, ...) and checks it against the reference op (``_linear_int4_impl`` / ``_moe_q_impl``);
       one that fails to compile or is wrong is recorded and left out;
    3. times the correct ones as engines launch them (``timing.graph_timer``: CUDA-graph replay, L2 flushed; split
       GEMMs chained as a step chains them) and keeps the fastest over ``tokens`` (summed), unless it beats layout's
       choice by less than ``MIN_GAIN``: timing noise does not change an engine.

A RoPE layer's fused qkv, which a CUDA engine runs as ``l4::int4_mm_rope`` (its blocks widened to whole heads,
``layout.rope_int4_blocks``), is timed in that form, and NoPE layers' qkv of the same shape as the plain GEMM, the two
weighted by how many layers run each (``Problem.rope``, ``_forms``).

The result is a table (``tuned_blocks``) the backend activates while it traces the engine, and records for the
manifest (``kernel_blocks``: each candidate's microseconds). Results are cached per GPU, library versions, problem,
tokens and candidate list (``cache_path``), so a second engine of the same model on the same host (another layer
count, the full model after a 2-layer one) measures nothing again. A compile runs all this in a child process
(``tune_process``), which a faulting candidate cannot take the compile down with.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from . import interpreting
from .layout import Int4Blocks, int4_blocks, moe_int4_blocks, rope_int4_blocks
from .tuned_blocks import Choice, Key, choice_label, choice_to_json, int4_key, moe_key

MIN_GAIN = 0.03            # the fastest replaces layout's choice only when it takes at least 3% less time
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 3e-2, torch.float16: 3e-2}   # max |out - ref| / max |ref|
INTERPRETER_TOLERANCE = 5e-2                          # the CPU interpreter truncates bf16 dot operands


@dataclasses.dataclass(frozen=True)
class Problem:
    key: Key                 # tuned_blocks key: ("int4_mm", N, K, G, scale dtype) or ("moe_q", E, H, I, Gh, Gi, ..)
    count: int = 1           # nodes of the graph that run it (a step launches it this many times)
    top_k: int = 1           # moe_q: experts a token
    rope: tuple | None = None   # int4_mm that is a RoPE layer's fused qkv, which a CUDA engine runs as
                             # l4::int4_mm_rope (its tiles widened to heads, the keys transformed in its epilogue):
                             # (head_dim, k_col0, k_cols, qk_norm); timed in that form (``_runs``)
    rope_count: int | None = None   # of ``count``, the nodes that run the rope form (None: all); the others (NoPE
                             # layers' qkv, the same shape) run the plain GEMM: ``tune_problem`` weighs the two


def problems(gm: torch.fx.GraphModule, rope_qkv: Callable | None = None) -> list[Problem]:
    """The distinct Int4 problems of ``gm`` (a Program's graph, before the backend's decompositions), in graph
    order, with how many nodes run each. ``rope_qkv`` (a CUDA engine that transforms k in its qkv GEMMs: the
    rewrite's own matcher, ``backends.qkv_rope_fused.rope_qkv_match``): a problem that some RoPE layer's qkv runs is
    marked (``Problem.rope``, with how many of its nodes do: ``rope_count``), and timed as the engine runs each of
    its nodes."""
    found: dict[Key, Problem] = {}
    ropes = _rope_qkvs(gm, rope_qkv) if rope_qkv else {}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is torch.ops.l4.linear_int4.default:
            wp, ws = (_value(gm, a) for a in node.args[1:3])
            if wp is None or ws is None or wp.dtype != torch.uint8:
                continue
            k_in = 2 * wp.shape[-1]
            key, top_k = int4_key(wp.shape[0], k_in, k_in // ws.shape[-1], ws.dtype), 1
            rope = ropes.get(node)
            if rope is not None and rope_int4_blocks(int4_blocks(*key[1:4]), key[1], *rope[:3]) is None:
                rope = None                                # no tile holds its heads: the engine runs the plain GEMM
        elif node.target is torch.ops.l4.moe_q.default:
            w = [_value(gm, a) for a in node.args[2:12]]
            if any(t is None for t in w) or w[0].dtype != torch.uint8:
                continue                                   # FP8 MoE: not tuned here
            gate_up_s, down_q, down_s = w[1], w[2], w[3]
            n_exp, hidden, i_dim = down_q.shape[0], down_q.shape[1], 2 * down_q.shape[2]
            key = moe_key(n_exp, hidden, i_dim, hidden // gate_up_s.shape[-1], i_dim // down_s.shape[-1], down_s.dtype)
            top_k, rope = int(node.args[12]), None
        else:
            continue
        old = found.get(key)
        rope_nodes = (old.rope_count or 0 if old else 0) + (rope is not None)   # rope_count: an int until the end
        found[key] = Problem(key, 1 + (old.count if old else 0), top_k, (old.rope if old else None) or rope,
                             rope_nodes)
    return [p if p.rope else dataclasses.replace(p, rope_count=None) for p in found.values()]


def _rope_qkvs(gm: torch.fx.GraphModule, match: Callable) -> dict:
    """qkv node -> (head_dim, k_col0, k_cols, qk_norm) for each ``l4::attention_cached`` of ``gm`` that ``match``
    (``rope_qkv_match``: the same test the backend's rewrite applies after ``caches_in_place``, whose calls keep the
    op's arguments) takes."""
    out = {}
    for attn in gm.graph.find_nodes(op="call_function", target=torch.ops.l4.attention_cached.default):
        m = match(attn)
        if m is not None:
            qkv, k_col0, k_cols, head_dim, qk_norm = m
            out[qkv] = (head_dim, k_col0, k_cols, bool(qk_norm))
    return out


def _value(gm: torch.fx.GraphModule, arg) -> Tensor | None:
    """The tensor (or its fake / meta value) behind a weight argument: a get_attr's attribute, else its meta val."""
    if not isinstance(arg, torch.fx.Node):
        return None
    if arg.op == "get_attr":
        obj = gm
        for part in arg.target.split("."):
            obj = getattr(obj, part, None)
        return obj if isinstance(obj, Tensor) else None
    val = arg.meta.get("val")
    return val if isinstance(val, Tensor) else None


# ---- candidates -----------------------------------------------------------------------------------------------

def _int4_static(key: Key) -> Int4Blocks:
    _, n_out, k_in, group, _ = key
    return int4_blocks(n_out, k_in, group)


def int4_candidates(key: Key, dtype: torch.dtype) -> list[Int4Blocks]:
    """l4::int4_mm's candidates, layout's choice first: split-K 2/4/8 (a decode GEMV's programs, 1 an SM at N 5120,
    hold too few loads in flight to cover HBM latency), BN 32 unsplit (twice the programs, no partials), 8 warps
    and the inline-PTX bf16x2 unpack split 4 ways (bf16 only; sm_90 PTX)."""
    b = _int4_static(key)
    if not b.scale_per_block:                  # gathered scales (odd groups): layout's choice only
        return [b]
    r = functools.partial(dataclasses.replace, b)
    out = [b, r(split_k=2), r(split_k=4), r(split_k=8), r(block_n=max(16, b.block_n // 2)), r(split_k=4, num_warps=8)]
    if dtype == torch.bfloat16 and not interpreting():
        out.append(r(split_k=4, bf16x2=True))
    return _unique(out)


def moe_candidates(key: Key, dtype: torch.dtype) -> list[tuple[Int4Blocks, Int4Blocks]]:
    """l4::moe_q_fused's (gate_up, down) candidates, layout's choice first: down split 2 or 4 ways (at a decode step
    its 2 x H / BN programs leave SMs unevenly loaded), both split 4 ways, 2 pipeline stages (half of gate_up's shared
    memory: more programs an SM), 8 warps, and the bf16x2 unpack (bf16 only)."""
    _, _, hidden, inter, group_h, group_i, _ = key
    gu, dn = moe_int4_blocks(hidden, inter, group_h, group_i)
    if not (gu.scale_per_block and dn.scale_per_block):
        return [(gu, dn)]
    r = dataclasses.replace
    out = [(gu, dn), (gu, r(dn, split_k=2)), (gu, r(dn, split_k=4)), (r(gu, split_k=4), r(dn, split_k=4)),
           (r(gu, num_stages=2), r(dn, num_stages=2)), (r(gu, num_warps=8), r(dn, num_warps=8))]
    if dtype == torch.bfloat16 and not interpreting():
        out.append((r(gu, bf16x2=True), r(dn, bf16x2=True)))
    return _unique(out)


def _unique(items: list) -> list:
    return list(dict.fromkeys(items))


# ---- the problem's tensors and calls --------------------------------------------------------------------------

CHUNK_ELEMENTS = 1 << 25     # float32 weights drawn and quantized (or dequantized) at a time: 128 MB


def _rows(n: int, k: int) -> int:
    return max(1, CHUNK_ELEMENTS // k) if n * k > CHUNK_ELEMENTS else n


def _packed(shape: tuple[int, ...], group: int, scale_dtype: torch.dtype, device, g: torch.Generator):
    """Random weights [.., N, K] packed as the quantize pass packs them, drawn a chunk of rows at a time: a full
    Scout compile tunes beside ~58 GB of engine weights on the GPU, and the whole float32 lm_head (4 GB) or expert
    stack (5.4 GB), with quantize's temporaries, would not fit beside them."""
    from l4compile.quant import quantize_int4

    *lead, n, k = shape
    step = _rows(n, k)
    packed = torch.empty(*lead, n, k // 2, dtype=torch.uint8, device=device)
    scales = None
    for idx in (torch.cartesian_prod(*(torch.arange(d) for d in lead)).reshape(-1, len(lead)).tolist()
                if lead else [[]]):
        for r0 in range(0, n, step):
            rows = min(step, n - r0)
            wq, ws = quantize_int4(torch.randn(rows, k, generator=g, device=device) * 0.02, group, scale_dtype)
            if scales is None:
                scales = torch.empty(*lead, n, ws.shape[-1], dtype=ws.dtype, device=device)
            packed[(*idx, slice(r0, r0 + rows))] = wq
            scales[(*idx, slice(r0, r0 + rows))] = ws
    return packed, scales


def _linear_reference(x: Tensor, wp: Tensor, ws: Tensor) -> Tensor:
    """``l4::linear_int4``'s reference, a chunk of output features at a time (the lm_head dequantized whole is 4 GB)."""
    from l4compile.ops.quant import _linear_int4_impl

    step = _rows(wp.shape[0], 2 * wp.shape[1])
    return torch.cat([_linear_int4_impl(x, wp[r0:r0 + step], ws[r0:r0 + step]) for r0 in range(0, wp.shape[0], step)],
                     dim=-1)


def _runs(problem: Problem, dtype: torch.dtype, tokens: int, device, g: torch.Generator):
    """(reference output, candidate -> call) for ``problem`` at ``tokens`` tokens of activations in ``dtype``."""
    from l4compile.ops.quant import _moe_q_impl

    from .layout import SPLIT_K_LOCK_WORDS
    from .ops import fused_moe_int4, int4_matmul

    key = problem.key
    scale_dtype = getattr(torch, key[-1])
    if key[0] == "int4_mm":
        _, n_out, k_in, group, _ = key
        wp, ws = _packed((n_out, k_in), group, scale_dtype, device, g)
        x = torch.randn(tokens, k_in, generator=g, device=device).to(dtype)
        lock = torch.zeros(SPLIT_K_LOCK_WORDS, device=device, dtype=torch.int32)   # chained calls leave it zeros

        if problem.rope is not None:        # each token a sequence at position ROPE_START, as a decode batch
            return _rope_runs(problem, x, wp, ws, lock)

        def call(b: Int4Blocks):            # split: chained, as a CUDA engine's step runs it
            return (lambda: int4_matmul(x, wp, ws, blocks=b, lock=lock)[0]) if b.split_k > 1 else \
                (lambda: int4_matmul(x, wp, ws, blocks=b))
        return _linear_reference(x, wp, ws), call
    _, n_exp, hidden, inter, group_h, group_i, _ = key
    router = (torch.randn(n_exp, hidden, generator=g, device=device) * 0.5).to(dtype)
    weights = [t for shape, group in (((n_exp, 2 * inter, hidden), group_h), ((n_exp, hidden, inter), group_i),
                                      ((inter, hidden), group_h), ((inter, hidden), group_h), ((hidden, inter), group_i))
               for t in _packed(shape, group, scale_dtype, device, g)]
    x = torch.randn(tokens, hidden, generator=g, device=device).to(dtype)
    # top-1: the logits made beforehand, as a CUDA engine's step gives them (l4::add_rms_norm_router), so the time is
    # the MoE's own launches, without a router matmul
    logits = torch.nn.functional.linear(x, router) if problem.top_k == 1 else None

    def call_moe(blocks: tuple[Int4Blocks, Int4Blocks]):
        return lambda: fused_moe_int4(x, router, *weights, problem.top_k, blocks=blocks, logits=logits)
    return _moe_q_impl(x, router, *weights, problem.top_k), call_moe


ROPE_START = 1000           # the position a RoPE qkv problem's decode tokens are at (its tables: ROPE_START + 1 rows)


def _rope_runs(problem: Problem, x: Tensor, wp: Tensor, ws: Tensor, lock: Tensor):
    """(reference, candidate -> call) of a RoPE layer's qkv (``Problem.rope``) as ``l4::int4_mm_rope`` runs it: each
    row of x a sequence's token at ``ROPE_START``, the keys RoPE-rotated (and normed) in the epilogue, chained where
    the widened blocks split K."""
    from l4compile.ops.attention import plain_rope_tables

    from .dispatch import k_rope_reference
    from .ops import KRope, int4_matmul

    head_dim, k_col0, k_cols, qk_norm = problem.rope
    cos, sin = plain_rope_tables(head_dim, ROPE_START + 1, x.device)
    start = torch.tensor([ROPE_START], device=x.device)
    rope = KRope(start, cos, sin, 1, k_col0, k_cols, head_dim, qk_norm, 1e-5)
    ref = k_rope_reference(_linear_reference(x, wp, ws)[:, None], start, cos, sin, k_col0, k_cols, head_dim, qk_norm,
                           1e-5)[:, 0]

    def call(b: Int4Blocks):
        if rope_int4_blocks(b, wp.shape[0], head_dim, k_col0, k_cols).split_k > 1:
            return lambda: int4_matmul(x, wp, ws, blocks=b, lock=lock, rope=rope)[0]
        return lambda: int4_matmul(x, wp, ws, blocks=b, rope=rope)
    return ref, call


def _forms(problem: Problem) -> list[tuple[Problem, float]]:
    """(problem as ``_runs`` makes it, weight) for each form its nodes run: a RoPE qkv's rope form and, where NoPE
    layers share its shape, the plain GEMM (weighted by how many nodes run each; a weight may be 0)."""
    if problem.rope is None:
        return [(problem, 1.0)]
    rope = problem.count if problem.rope_count is None else problem.rope_count
    plain = dataclasses.replace(problem, rope=None, rope_count=None)
    return [(problem, rope / problem.count), (plain, (problem.count - rope) / problem.count)]


def _rel_err(out: Tensor, ref: Tensor) -> float:
    return float((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30))


# ---- tuning ---------------------------------------------------------------------------------------------------

def candidates(problem: Problem, dtype: torch.dtype) -> list[Choice]:
    """The problem's candidates, layout's choice first; for a RoPE qkv that only RoPE layers run (``Problem.rope``,
    every node) one of each set that ``layout.rope_int4_blocks`` widens to the same launch (BN 64 split 2 and BN
    32 unsplit are both BN 128 split 4 at Scout's head_dim: timed once)."""
    cands = (int4_candidates if problem.key[0] == "int4_mm" else moe_candidates)(problem.key, dtype)
    if problem.rope is None or _forms(problem)[1][1] > 0:
        return cands
    head_dim, k_col0, k_cols, _ = problem.rope
    launched = {}
    for c in cands:
        launched.setdefault(rope_int4_blocks(c, problem.key[1], head_dim, k_col0, k_cols), c)
    return list(launched.values())


class ContextLost(RuntimeError):
    """A candidate left the CUDA context unusable (an illegal address, a trap: CUDA errors are sticky), so nothing
    after it in this process can be measured. ``tune_process`` restarts the tuning without that candidate."""

    def __init__(self, key: Key, label: str, error: str):
        super().__init__(f"{problem_name(key)} {label}: {error}")
        self.key, self.label, self.error = key, label, error


def _context_broken(device: torch.device) -> bool:
    """True when ``device`` can no longer run anything (after a candidate raised)."""
    if device.type != "cuda":
        return False
    try:
        torch.cuda.synchronize(device)
        return float(torch.ones(1, device=device).sum().item()) != 1.0
    except Exception:
        return True


def tune_problem(problem: Problem, device, dtype: torch.dtype, tokens: tuple[int, ...],
                 timer: Callable[[Callable[[], Any]], float], seed: int = 0, excluded: dict[str, str] | None = None,
                 progress: Callable[[str | None], None] | None = None) -> dict[str, Any]:
    """Measure ``problem``'s candidates -> its record: ``key``, ``count``, ``tokens``, ``blocks`` (the choice, JSON),
    ``label``, ``us`` (its time summed over ``tokens``), ``static_us`` (layout's choice), and ``candidates`` (each
    one's ``label``, ``us`` or ``error``, ``rel_err``). ``blocks`` is None where no candidate ran correctly.
    ``excluded``: label -> why, candidates recorded with that error and never run (one that killed a tuning
    process). ``progress(label)`` is called before each candidate runs, ``progress(None)`` before the problem's
    tensors are made. Raises ``ContextLost`` when a candidate's error leaves the GPU unusable."""
    cands = candidates(problem, dtype)
    tol = INTERPRETER_TOLERANCE if interpreting() else TOLERANCE.get(dtype, 3e-2)
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)
    excluded = excluded or {}
    rows = [{"label": choice_label(c), "us": 0.0, "rel_err": 0.0, "error": excluded.get(choice_label(c))}
            for c in cands]
    progress = progress or (lambda label: None)
    for t, (form, weight) in ((t, f) for t in tokens for f in _forms(problem) if f[1] > 0):
        progress(None)
        ref, call = _runs(form, dtype, t, device, g)
        for c, row in zip(cands, rows):
            if row["error"]:
                continue
            progress(row["label"])
            try:
                fn = call(c)
                err = _rel_err(fn(), ref)
                row["rel_err"] = max(row["rel_err"], err)
                if not err <= tol:                            # NaN too
                    row["error"] = f"wrong result at {t} tokens: rel err {err:.1e} > {tol:.0e}"
                    continue
                row["us"] += weight * 1e3 * timer(fn)
            except Exception as e:      # a configuration the compiler or this GPU refuses (registers, PTX, ...)
                row["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
                if _context_broken(device):
                    raise ContextLost(problem.key, row["label"], row["error"]) from e
        del ref, call
    ok = [i for i, row in enumerate(rows) if not row["error"]]
    for row in rows:
        if row["error"]:
            row["us"] = None
        else:
            row["us"] = round(row["us"], 3)
    best = min(ok, key=lambda i: rows[i]["us"]) if ok else None
    static_us = rows[0]["us"]
    if best is not None and static_us is not None and rows[best]["us"] > (1 - MIN_GAIN) * static_us:
        best = 0                                                  # within the noise of layout's choice
    return {"key": list(problem.key), "count": problem.count, "tokens": list(tokens),
            **({"rope": list(problem.rope), "rope_count": _rope_nodes(problem)} if problem.rope else {}),
            "blocks": None if best is None else choice_to_json(cands[best]),
            "label": None if best is None else rows[best]["label"], "us": None if best is None else rows[best]["us"],
            "static_us": static_us, "candidates": rows}


def tune(probs: list[Problem], device: str | torch.device, dtype: torch.dtype, tokens: tuple[int, ...] = (1,),
         timer: Callable | None = None, cache: Path | None | bool = True, log: Callable[[str], None] | None = None,
         excluded: dict[tuple[Key, str], str] | None = None,
         progress: Callable[[Key, str | None], None] | None = None,
         on_record: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Tune every problem in this process -> ``{"device", "tokens", "seconds", "problems": [record, ...]}`` (records
    as ``tune_problem``'s, plus ``cached``). ``timer``: ``fn -> ms`` (default: ``timing.graph_timer`` on CUDA, wall
    clock elsewhere). ``cache``: True for ``cache_path()``, a path, or False/None for none. ``excluded``: (problem key,
    candidate label) -> why it is not run; ``progress(key, label)``: as ``tune_problem``'s; ``on_record(record)``:
    each record as soon as it is known (``tune_process`` keeps them when a later candidate kills the process)."""
    from .timing import graph_timer, wall_timer

    device = resolve_device(device)
    timer = timer or (graph_timer() if device.type == "cuda" else wall_timer())
    path = resolve_cache(cache)
    stored = _read_cache(path) if path else {}
    t0 = time.perf_counter()
    records = []
    for p in probs:
        ckey = _cache_key(p, device, dtype, tokens)
        rec = cached_record(stored, ckey, p)
        if rec is None:
            skip = {label: why for (key, label), why in (excluded or {}).items() if tuple(key) == tuple(p.key)}
            watch = functools.partial(progress, p.key) if progress else None
            rec = dict(tune_problem(p, device, dtype, tokens, timer, excluded=skip, progress=watch), cached=False)
            stored[ckey] = {k: v for k, v in rec.items() if k not in ("count", "cached")}
            if path:
                _write_cache(path, stored)
        records.append(rec)
        if on_record:
            on_record(rec)
        if log:
            log("tuned " + summary(rec))
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"device": _device_name(device), "tokens": list(tokens), "dtype": str(dtype).removeprefix("torch."),
            "seconds": round(time.perf_counter() - t0, 3), "problems": records}


def problem_name(key: Key | list) -> str:
    """"int4_mm 7168x5120 G128" or "moe_q E16 H5120 I8192"."""
    if key[0] == "int4_mm":
        return f"int4_mm {key[1]}x{key[2]} G{key[3]}"
    return f"moe_q E{key[1]} H{key[2]} I{key[3]}"


def summary(rec: dict[str, Any]) -> str:
    """One line of a ``tune`` record: the choice, its time and its speed-up over layout's choice."""
    name = problem_name(rec["key"]) + (" (rope)" if rec.get("rope") else "")
    if rec["blocks"] is None:
        why = f"not measured ({rec['error']})" if rec.get("error") else "no candidate ran correctly"
        return f"{name}: {why}; layout's blocks stay"
    gain = f"{rec['static_us'] / rec['us']:.2f}x layout's" if rec["static_us"] and rec["us"] else "layout's failed"
    return (f"{name}: {rec['label']}, {rec['us']:.1f} us at {'+'.join(map(str, rec['tokens']))} tokens ({gain})"
            + (", cached" if rec.get("cached") else ""))


def tune_program(program, dtype: str, log: Callable[[str], None] | None = None,
                 rope_qkv: Callable | None = None) -> dict[str, Any]:
    """``tune`` the Int4 problems of a Program (every rank's graph, for a sharded one) at activations of the
    engine's ``dtype`` on the current CUDA device, in a child process (``tune_process``: a candidate that faults
    cannot take the compile with it) -> the result the manifest keeps as ``kernel_blocks``. ``rope_qkv``: as
    ``problems``' (the engine transforms k in its qkv GEMMs)."""
    from l4compile.errors import L4Error

    from . import why_unavailable
    from .dispatch import load_triton_ops

    if not torch.cuda.is_available():
        raise L4Error("--tune-kernels times kernels on a GPU, and this machine has no CUDA device")
    if why_unavailable() or not load_triton_ops():
        raise L4Error(f"--tune-kernels needs the Triton kernels: {why_unavailable() or 'triton failed to load'}")
    found: dict[Key, Problem] = {}
    for gm in program.gm.meta.get("l4_shards") or [program.gm]:
        for p in problems(gm, rope_qkv):
            old = found.get(p.key)
            rope = p.rope or (old.rope if old else None)
            found[p.key] = dataclasses.replace(p, count=p.count + (old.count if old else 0), rope=rope,
                                               rope_count=None if rope is None else
                                               _rope_nodes(p) + (_rope_nodes(old) if old else 0))
    if not found and log:
        log("tune kernels: no Int4 GEMM or Int4 MoE in this graph (--quant int4 has them); nothing to tune")
    from .tune_process import tune_isolated

    torch.cuda.empty_cache()           # the compile's freed blocks, for the tuning process beside its weights
    return tune_isolated(list(found.values()), "cuda", getattr(torch, dtype), log=log)


def _rope_nodes(p: Problem) -> int:
    """How many of ``p``'s nodes run the rope form."""
    return 0 if p.rope is None else p.count if p.rope_count is None else p.rope_count


# ---- cache ----------------------------------------------------------------------------------------------------

def resolve_device(device: str | torch.device) -> torch.device:
    """``device`` with its index ("cuda" -> the current CUDA device), as cache keys and timers name it."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def resolve_cache(cache: Path | None | bool) -> Path | None:
    """``tune``'s ``cache`` argument -> the cache file, or None for none."""
    return cache_path() if cache is True else (Path(cache) if cache else None)


def cached_record(stored: dict[str, Any], ckey: str, p: Problem) -> dict[str, Any] | None:
    """``p``'s record under ``ckey`` in a read cache, with this graph's node count, or None."""
    rec = stored.get(ckey)
    if rec is None or rec.get("key") != list(p.key):
        return None
    return dict(rec, count=p.count, cached=True)


def cache_path() -> Path:
    """``$L4COMPILE_CACHE_DIR/kernel_tuning.json`` (default ``~/.cache/l4compile``)."""
    root = os.environ.get("L4COMPILE_CACHE_DIR") or Path.home() / ".cache" / "l4compile"
    return Path(root) / "kernel_tuning.json"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} sm_{major}{minor}"
    return "cpu (interpreter)" if interpreting() else "cpu"


def _cache_key(p: Problem, device: torch.device, dtype: torch.dtype, tokens: tuple[int, ...]) -> str:
    import triton

    cands = [choice_to_json(c) for c in candidates(p, dtype)]
    fingerprint = hashlib.sha256(json.dumps(cands, sort_keys=True).encode()).hexdigest()[:16]
    return json.dumps([_device_name(device), torch.__version__, triton.__version__, list(p.key), p.top_k,
                       str(dtype), list(tokens), fingerprint, MIN_GAIN]
                      + ([list(p.rope), _rope_nodes(p), p.count] if p.rope else []))


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):            # missing or unreadable: tune again (and rewrite it)
        return {}


def _write_cache(path: Path, data: dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)
    except OSError:                          # a read-only home: the figures are in the manifest all the same
        pass
