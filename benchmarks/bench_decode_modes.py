"""Decode modes of one engine, measured in one run: one engine call per step ("loop") against the same steps on
static buffers replayed as a CUDA graph ("graph"; on a CPU, "static", the same steps without capture).

    python benchmarks/bench_decode_modes.py [--model scout --layers 2 --quant int4 --dtype bfloat16 --device cuda]
                                            [--engine DIR] [--batch-sizes 1,8] [--prompt 128] [--new 64]
                                            [--repeats 5] [--out FILE.json]

Compiles MODEL (or loads --engine DIR), then per repeat and batch size times ``Engine.generate`` in every mode,
alternating the order; decode ms/token = (generate - prefill of the same repeat) / (new - 1 steps). The mode's
setup (building its buffers, capturing the graph) happens in a warm-up generate and is reported apart. Prints a
Markdown table (median ms/token, tokens/s, ratio vs loop, same tokens as loop) and writes the figures as JSON.
"""
# B batch, S prompt length
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _ms(fn, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - t0) * 1e3


def measure(eng, batch_sizes: list[int], prompt: int, new: int, repeats: int, seed: int = 0) -> list[dict]:
    """Rows per (mode, batch): decode ms/token samples, setup ms, tokens equal to loop's."""
    modes = ["loop", "graph" if eng.device.type == "cuda" else "static"]
    g = torch.Generator().manual_seed(seed)
    rows = []
    for b in batch_sizes:
        ids = torch.randint(3, eng.vocab_size, (b, prompt), generator=g)
        tokens, setup, samples = {}, {}, {m: [] for m in modes}
        for m in modes:                                   # warm-up: builds / captures the mode's decoder
            eng.decode_mode = m
            t0 = time.perf_counter()
            eng.prepare_decode(b)
            _sync(eng.device)
            setup[m] = (time.perf_counter() - t0) * 1e3
            tokens[m] = eng.generate(ids, max_new_tokens=new).cpu()
            if eng.decode_mode != m:                      # capture failed: the engine fell back to loop
                setup[m] = None
        for rep in range(repeats):
            for m in (modes if rep % 2 == 0 else modes[::-1]):
                eng.decode_mode = m if m == "loop" or eng.cuda_graph_error is None else "loop"
                p_ms = _ms(lambda: eng.prefill(ids), eng.device)
                g_ms = _ms(lambda: eng.generate(ids, max_new_tokens=new), eng.device)
                samples[m].append((g_ms - p_ms) / max(1, new - 1))
        base = statistics.median(samples["loop"])
        for m in modes:
            med = statistics.median(samples[m])
            rows.append({"mode": m, "batch": b, "decode_ms_per_token": med, "samples": samples[m],
                         "tokens_per_s": 1e3 * b / med, "speedup_vs_loop": base / med, "setup_ms": setup[m],
                         "same_tokens_as_loop": bool(torch.equal(tokens[m], tokens["loop"])),
                         "cuda_graph_error": eng.cuda_graph_error if m == "graph" else None})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| mode | batch | decode ms/token | tokens/s | vs loop | setup ms | same tokens as loop |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        setup = "-" if r["setup_ms"] is None else f"{r['setup_ms']:.0f}"
        lines.append(f"| {r['mode']} | {r['batch']} | {r['decode_ms_per_token']:.3f} | {r['tokens_per_s']:.1f} | "
                     f"{r['speedup_vs_loop']:.2f}x | {setup} | {r['same_tokens_as_loop']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import l4compile
    from l4compile.bench.runner import parse_int_list
    from l4compile.errors import L4Error

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="preset or checkpoint to compile (ignored with --engine)")
    ap.add_argument("--engine", default=None, help="an existing engine directory instead of compiling")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--quant", default="none")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-sizes", default="1")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None, metavar="FILE.json")
    a = ap.parse_args(argv)
    try:
        batches = list(parse_int_list("--batch-sizes", a.batch_sizes))
        if min(a.prompt, a.new, a.repeats) < 1 or a.new < 2:
            raise L4Error("--prompt and --repeats must be >= 1 and --new >= 2 (one decode step at least)")
        with tempfile.TemporaryDirectory(prefix="l4modes-") as tmp:
            t0 = time.perf_counter()
            if a.engine:
                eng = l4compile.load_engine(a.engine)
            else:
                eng = l4compile.compile(a.model, out=Path(tmp) / "e", quant=a.quant, dtype=a.dtype, device=a.device,
                                        layers=a.layers, max_seq_len=a.prompt + a.new, max_batch_size=max(batches))
            build_s = time.perf_counter() - t0
            rows = measure(eng, batches, a.prompt, a.new, a.repeats)
    except L4Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = torch.cuda.get_device_name() if eng.device.type == "cuda" else "cpu"
    head = (f"engine: {a.engine or a.model} ({eng.manifest['dtype']}, quant {eng.manifest.get('quant')}, "
            f"{eng.manifest['model_config']['num_hidden_layers']} layers) on {device}; prompt {a.prompt}, "
            f"{a.new} new tokens, {a.repeats} repeats; built/loaded in {build_s:.1f} s")
    print(head)
    print(table(rows))
    if a.out:
        Path(a.out).write_text(json.dumps({"header": head, "rows": rows, "torch": torch.__version__}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
