"""Benchmark KV-cache decode: l4compile engine vs transformers ``generate`` (its own cache), one run.

    python benchmarks/bench_decode.py [--preset bench-scout] [--prompt 64] [--new 32] [--repeats 5] [--threads 1]

Prints decode ms/token for both (medians over repeats, measured alternately so machine load hits both alike),
the ratio, and the KV-cache bytes per token at Scout and Maverick dimensions with and without ring buffers.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

import l4compile
from _common import engine_bench_parser, parse
from l4compile import frontend
from l4compile.passes.kv_cache import cache_layout


def kib(n: int) -> str:
    return f"{n / 1024:.0f} KiB"


def main() -> None:
    ap = engine_bench_parser(__doc__)
    a = parse(ap)

    print("| model | KV bytes/token, full caches | with ring buffers | ring buffers (fixed, per sequence) |")
    print("|---|---|---|---|")
    for name in ("scout", "maverick"):
        cfg = frontend.load(name, meta=True, dtype="bfloat16").model.config
        lay = cache_layout(cfg, 1 << 20, torch.bfloat16)
        print(f"| {name} bf16 | {kib(lay['bytes_per_token_without_rings'])} | {kib(lay['bytes_per_token'])} | "
              f"{lay['ring_bytes'] / 2**20:.0f} MiB |")

    lm = frontend.load(a.preset).model
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        eng = l4compile.compile(a.preset, out=Path(tmp) / "e", max_seq_len=a.prompt + a.new + 1, max_batch_size=1)
        compile_s = time.perf_counter() - t0
        ids = torch.randint(0, lm.config.vocab_size, (1, a.prompt), generator=torch.Generator().manual_seed(0))

        def ours(n):
            return eng.generate(ids, max_new_tokens=n)

        def hf(n):
            return lm.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True,
                               pad_token_id=0)

        with torch.no_grad():
            assert torch.equal(ours(a.new), hf(a.new)), "greedy tokens differ"
            samples = {"l4compile": [], "transformers": []}
            for _ in range(a.repeats):
                for name, fn in (("l4compile", ours), ("transformers", hf)):
                    t = time.perf_counter(); fn(1); one = time.perf_counter() - t        # prefill + first token
                    t = time.perf_counter(); fn(a.new + 1); full = time.perf_counter() - t
                    samples[name].append((full - one) * 1e3 / a.new)                  # ms per decode step
    med = {k: statistics.median(v) for k, v in samples.items()}
    print(f"\n{a.preset}: prompt {a.prompt}, {a.new} decode steps, batch 1, {a.threads} thread(s), "
          f"{a.repeats} repeats; engine compile {compile_s:.1f} s")
    print("| | decode ms/token (median) | tokens/s |\n|---|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v:.2f} | {1e3 / v:.1f} |")
    print(f"\nspeed-up over transformers generate: {med['transformers'] / med['l4compile']:.1f}x")


if __name__ == "__main__":
    main()
