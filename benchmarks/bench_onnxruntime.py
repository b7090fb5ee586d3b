"""Benchmark the ONNX Runtime engine: prefill and KV-cache decode against transformers eager and the Inductor
engine, all in one run (ratios, not absolute numbers, are what carry across machines).

    python benchmarks/bench_onnxruntime.py [--preset bench-scout] [--prompt 64] [--new 32] [--repeats 5] [--threads 1]

Prefill: one forward over the prompt (batch 1). Decode: ms per generated token through each side's KV cache
(engines: ``Engine.generate``; transformers: ``generate`` with its own cache), measured as
(time for 1 + new tokens - time for 1 token) / new. Every side is timed alternately within each repeat so load
on the machine hits all alike; medians are reported. Greedy tokens are checked equal before timing.
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


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = engine_bench_parser(__doc__)
    ap.add_argument("--no-inductor", action="store_true", help="skip the Inductor engine (its compile is slow)")
    a = parse(ap)

    lm = frontend.load(a.preset).model
    ids = torch.randint(0, lm.config.vocab_size, (1, a.prompt), generator=torch.Generator().manual_seed(0))
    backends = ["onnxruntime"] + ([] if a.no_inductor else ["inductor"])
    with tempfile.TemporaryDirectory() as tmp:
        engines, compile_s = {}, {}
        for b in backends:
            t0 = time.perf_counter()
            engines[b] = l4compile.compile(a.preset, backend=b, out=Path(tmp) / b,
                                           max_seq_len=a.prompt + a.new + 1, max_batch_size=1)
            compile_s[b] = time.perf_counter() - t0

        def hf_generate(n):
            return lm.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True,
                               pad_token_id=0)

        sides = {"transformers eager": (lambda: lm(input_ids=ids, use_cache=False).logits, hf_generate)}
        for b, eng in engines.items():
            sides[f"l4compile {b}"] = (lambda e=eng: e.prefill(ids), lambda n, e=eng: e.generate(ids, max_new_tokens=n))

        with torch.no_grad():
            ref = hf_generate(a.new)
            for name, (_, gen) in sides.items():
                assert torch.equal(gen(a.new), ref), f"{name}: greedy tokens differ from transformers"
                ref_logits = lm(input_ids=ids, use_cache=False).logits
                got = sides[name][0]()
                err = float((got - ref_logits).abs().max() / ref_logits.abs().max())
                assert err < 1e-4, f"{name}: prefill rel err {err:.2e}"
            prefill = {k: [] for k in sides}
            decode = {k: [] for k in sides}
            for _ in range(a.repeats):
                for name, (pre, gen) in sides.items():
                    prefill[name].append(timed(pre) * 1e3)
                    one = timed(lambda: gen(1))
                    full = timed(lambda: gen(a.new + 1))
                    decode[name].append((full - one) * 1e3 / a.new)
    pm = {k: statistics.median(v) for k, v in prefill.items()}
    dm = {k: statistics.median(v) for k, v in decode.items()}
    base = "transformers eager"
    print(f"{a.preset}: prompt {a.prompt}, {a.new} decode steps, batch 1, float32, {a.threads} thread(s), "
          f"{a.repeats} repeats (medians); compile " + ", ".join(f"{b} {s:.1f} s" for b, s in compile_s.items()))
    print("| | prefill ms | prefill speed-up | decode ms/token | decode speed-up |\n|---|---|---|---|---|")
    for k in sides:
        print(f"| {k} | {pm[k]:.2f} | {pm[base] / pm[k]:.2f}x | {dm[k]:.2f} | {dm[base] / dm[k]:.2f}x |")


if __name__ == "__main__":
    main()
