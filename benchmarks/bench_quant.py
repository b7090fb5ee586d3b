"""Benchmark Int4 and FP8 engines against the unquantized engine of the same backend, in one run on this machine.

    python benchmarks/bench_quant.py [--preset bench-scout] [--backends inductor,onnxruntime] [--prompt 64]
                                     [--new 32] [--repeats 5] [--threads 1]

Compiles the preset for every backend x (--quant none / fp8 / int4), then measures prefill latency and decode
ms/token (generate N+1 tokens minus generate 1, over N) alternately across all engines so machine load hits all
alike. Prints medians, ratios against the unquantized engine of the same backend, engine bytes and weight bytes
(the ONNX model also carries the exporter's per-node provenance metadata, a fixed cost that dominates tiny models).
Accuracy is not measured here: a preset has random weights, whose top-1 routing flips under any quantization
(logit SQNR ~0-3 dB at bench-scout); it is judged on the trained fixture in tests/passes/test_quantize.py
(Inductor) and tests/backends/test_onnxruntime_quant.py (ONNX Runtime).
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

import l4compile
from _common import engine_bench_parser, parse

QUANTS = ("none", "fp8", "int4")


def weight_bytes(eng) -> int:
    m = eng.manifest
    info = m.get("backend_info") or {}
    if "weight_bytes" in info:                                  # ONNX: initializer bytes
        return int(info["weight_bytes"])
    wb = m.get("weight_bytes")                                  # quantize pass stats (after)
    return int(wb["after"]) if wb else sum(v["bytes"] for v in m["artifacts"].values())


def main() -> None:
    ap = engine_bench_parser(__doc__)
    ap.add_argument("--backends", default="inductor,onnxruntime", help="comma-separated backends to compare")
    a = parse(ap)
    backends = [b.strip() for b in a.backends.split(",") if b.strip()]
    cells = [(b, q) for b in backends for q in QUANTS]
    with tempfile.TemporaryDirectory() as tmp:
        engines, compile_s = {}, {}
        for b, q in cells:
            t = time.perf_counter()
            engines[b, q] = l4compile.compile(a.preset, backend=b, out=Path(tmp) / f"{b}-{q}", quant=q,
                                              max_seq_len=a.prompt + a.new + 1, max_batch_size=1)
            compile_s[b, q] = time.perf_counter() - t
        first = engines[cells[0]]
        ids = torch.randint(0, first.vocab_size, (1, a.prompt), generator=torch.Generator().manual_seed(0))
        prefill, decode = {c: [] for c in cells}, {c: [] for c in cells}
        for c in cells:                                    # warm-up
            engines[c].generate(ids, max_new_tokens=a.new + 1)
        for _ in range(a.repeats):
            for c in cells:
                e = engines[c]
                t = time.perf_counter(); e.prefill(ids); prefill[c].append((time.perf_counter() - t) * 1e3)
                t = time.perf_counter(); e.generate(ids, max_new_tokens=1); one = time.perf_counter() - t
                t = time.perf_counter(); e.generate(ids, max_new_tokens=a.new + 1); full = time.perf_counter() - t
                decode[c].append((full - one) * 1e3 / a.new)
        size = {c: sum(v["bytes"] for v in engines[c].manifest["artifacts"].values()) for c in cells}
        wbytes = {c: weight_bytes(engines[c]) for c in cells}
    med_p = {c: statistics.median(v) for c, v in prefill.items()}
    med_d = {c: statistics.median(v) for c, v in decode.items()}
    print(f"{a.preset}: prompt {a.prompt}, {a.new} decode steps, batch 1, {a.threads} thread(s), {a.repeats} repeats")
    print("| backend | quant | engine MB | weights MB | compile s | prefill ms | vs none | decode ms/token | vs none |")
    print("|---|---|---|---|---|---|---|---|---|")
    for b, q in cells:
        base = (b, "none")
        print(f"| {b} | {q} | {size[b, q] / 1e6:.1f} | {wbytes[b, q] / 1e6:.1f} | {compile_s[b, q]:.0f} | "
              f"{med_p[b, q]:.2f} | {med_p[base] / med_p[b, q]:.2f}x | {med_d[b, q]:.2f} | "
              f"{med_d[base] / med_d[b, q]:.2f}x |")


if __name__ == "__main__":
    main()
