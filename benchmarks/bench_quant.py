"""Benchmark Int4 and FP8 engines against the unquantized engine, in one run on this machine.

    python benchmarks/bench_quant.py [--preset bench-scout] [--prompt 64] [--new 32] [--repeats 5] [--threads 1]

Compiles the preset three times with the Inductor backend (--quant none / fp8 / int4), then measures prefill
latency and decode ms/token (generate N+1 tokens minus generate 1, over N) alternately across the engines so
machine load hits all alike. Prints medians, ratios against the unquantized engine and engine bytes.
Accuracy is not measured here: a preset has random weights, whose top-1 routing flips under any quantization
(logit SQNR ~0-3 dB at bench-scout); it is judged on the trained fixture in tests/passes/test_quantize.py.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

import l4compile
from _common import engine_bench_parser, parse


def main() -> None:
    ap = engine_bench_parser(__doc__)
    a = parse(ap)
    quants = ("none", "fp8", "int4")
    with tempfile.TemporaryDirectory() as tmp:
        engines, compile_s = {}, {}
        for q in quants:
            t = time.perf_counter()
            engines[q] = l4compile.compile(a.preset, out=Path(tmp) / q, quant=q, max_seq_len=a.prompt + a.new + 1,
                                           max_batch_size=1)
            compile_s[q] = time.perf_counter() - t
        ids = torch.randint(0, engines["none"].vocab_size, (1, a.prompt), generator=torch.Generator().manual_seed(0))
        prefill, decode = {q: [] for q in quants}, {q: [] for q in quants}
        for q in quants:                                   # warm-up
            engines[q].generate(ids, max_new_tokens=a.new + 1)
        for _ in range(a.repeats):
            for q in quants:
                e = engines[q]
                t = time.perf_counter(); e.prefill(ids); prefill[q].append((time.perf_counter() - t) * 1e3)
                t = time.perf_counter(); e.generate(ids, max_new_tokens=1); one = time.perf_counter() - t
                t = time.perf_counter(); e.generate(ids, max_new_tokens=a.new + 1); full = time.perf_counter() - t
                decode[q].append((full - one) * 1e3 / a.new)
        size = {q: sum(v["bytes"] for v in engines[q].manifest["artifacts"].values()) for q in quants}
    med_p = {q: statistics.median(v) for q, v in prefill.items()}
    med_d = {q: statistics.median(v) for q, v in decode.items()}
    print(f"{a.preset}: prompt {a.prompt}, {a.new} decode steps, batch 1, {a.threads} thread(s), {a.repeats} repeats")
    print("| quant | engine MB | compile s | prefill ms | vs none | decode ms/token | vs none |")
    print("|---|---|---|---|---|---|---|")
    for q in quants:
        print(f"| {q} | {size[q] / 1e6:.1f} | {compile_s[q]:.0f} | {med_p[q]:.2f} | {med_p['none'] / med_p[q]:.2f}x | "
              f"{med_d[q]:.2f} | {med_d['none'] / med_d[q]:.2f}x |")


if __name__ == "__main__":
    main()
