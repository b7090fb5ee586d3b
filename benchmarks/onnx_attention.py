"""What translating the attention ops to ONNX ourselves (l4compile.onnx.attention) buys, against the old path that
decomposed them into aten first and let torch.onnx translate that, on the same lowered program, in the same run.

    python benchmarks/onnx_attention.py [--preset bench-scout] [--layers 2,4,8] [--prompt 64] [--repeats 5]
                                        [--threads 1] [--json F]

Per layer count: the preset is lowered once (default passes, KV cache); each path exports and optimizes it
(seconds, node counts), then both graphs run under ONNX Runtime's CPU EP, alternately per repeat: a prefill of
--prompt tokens on empty caches and one decode step after it (medians, ms). The two paths' logits and caches must
agree (max relative difference, reported). The old path is the one this project shipped before the translation:
``l4compile.onnx``'s table without the attention entries, so ``onnx_program`` decomposes them again.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch


@contextlib.contextmanager
def attention_decomposed():
    """l4compile.onnx as it was before the attention translations: those ops are decomposed to aten."""
    import l4compile.onnx as lo

    saved = lo.TRANSLATIONS, lo.TRANSLATED_OPS
    attention = {torch.ops.l4.attention.default, torch.ops.l4.attention_cached.default}
    lo.TRANSLATIONS = {k: v for k, v in saved[0].items() if k not in attention}
    lo.TRANSLATED_OPS = saved[1] - attention
    try:
        yield
    finally:
        lo.TRANSLATIONS, lo.TRANSLATED_OPS = saved


def _feeds(session, prompt: int, vocab: int) -> tuple[dict, dict]:
    """(prefill feeds: prompt tokens at 0 on zero caches, a decode-step template: 1 token at position prompt)."""
    import numpy as np

    g = np.random.default_rng(0)
    ins = session.get_inputs()
    caches = {i.name: np.zeros([1 if isinstance(d, str) else d for d in i.shape], dtype=np.float32) for i in ins[2:]}
    prefill = {ins[0].name: g.integers(0, vocab, (1, prompt), dtype=np.int64),
               ins[1].name: np.zeros(1, dtype=np.int64), **caches}
    step = {ins[0].name: g.integers(0, vocab, (1, 1), dtype=np.int64), ins[1].name: np.array([prompt], np.int64)}
    return prefill, step


def measure(preset: str, layers: int, prompt: int, repeats: int) -> dict:
    import onnxruntime as ort
    from onnxscript import ir

    from l4compile.backends import onnxruntime as ort_backend
    from l4compile.compiler import lower
    from l4compile.config import CompileConfig
    from l4compile.progress import Progress

    config = CompileConfig(backend="onnxruntime", layers=layers, max_seq_len=prompt + 8, max_batch_size=1)
    low = lower(preset, config, progress=Progress(enabled=False))
    program = low.program
    vocab = int(program.model_config.vocab_size)
    row: dict = {"preset": preset, "layers": layers}
    sessions = {}
    for name in ("decomposed", "translated"):
        with attention_decomposed() if name == "decomposed" else contextlib.nullcontext():
            t = time.perf_counter()
            model = ort_backend.onnx_program(program).model
            row[f"{name}_export_s"] = round(time.perf_counter() - t, 2)
        row[f"{name}_nodes"] = len(list(model.graph))
        blob = ir.serde.serialize_model(model).SerializeToString()
        sessions[name] = ort.InferenceSession(blob, ort_backend.session_options(), providers=["CPUExecutionProvider"])
    prefill, step = _feeds(sessions["translated"], prompt, vocab)
    outs, times = {}, {n: {"prefill": [], "decode": []} for n in sessions}
    for rep in range(repeats + 1):                                  # repeat 0 warms up
        for name in (list(sessions) if rep % 2 else list(sessions)[::-1]):
            s = sessions[name]
            t = time.perf_counter()
            first = s.run(None, prefill)
            t1 = time.perf_counter()
            caches = dict(zip([i.name for i in s.get_inputs()[2:]], first[1:]))
            second = s.run(None, {**step, **caches})
            t2 = time.perf_counter()
            if rep:
                times[name]["prefill"].append((t1 - t) * 1e3)
                times[name]["decode"].append((t2 - t1) * 1e3)
            outs[name] = [torch.from_numpy(a) for a in first + second]
    rel = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
              for a, b in zip(outs["translated"], outs["decomposed"]))
    for name in sessions:
        for kind in ("prefill", "decode"):
            row[f"{name}_{kind}_ms"] = round(statistics.median(times[name][kind]), 3)
    row.update(export_ratio=round(row["decomposed_export_s"] / row["translated_export_s"], 2),
               decode_ratio=round(row["decomposed_decode_ms"] / row["translated_decode_ms"], 2),
               prefill_ratio=round(row["decomposed_prefill_ms"] / row["translated_prefill_ms"], 2),
               max_rel_diff=float(f"{rel:.3g}"))
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="bench-scout")
    ap.add_argument("--layers", default="2,4,8", help="comma-separated layer counts")
    ap.add_argument("--prompt", type=int, default=64, help="prefill length; the decode step runs after it")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, metavar="FILE", help="also write the rows here")
    a = ap.parse_args(argv)
    try:
        layer_counts = [int(x) for x in a.layers.split(",")]
        if any(n < 1 for n in layer_counts) or a.prompt < 1 or a.repeats < 1 or a.threads < 1:
            raise ValueError
    except ValueError:
        print("error: --layers takes positive integers separated by commas; --prompt, --repeats and --threads "
              "positive integers", file=sys.stderr)
        return 2
    torch.set_num_threads(a.threads)
    from l4compile.errors import L4Error

    print(f"{'layers':>6} {'nodes old/new':>13} {'export s old/new':>16} {'prefill ms old/new':>19} "
          f"{'decode ms old/new':>18} {'max rel diff':>12}")
    rows = []
    for n in layer_counts:
        try:
            r = measure(a.preset, n, a.prompt, a.repeats)
        except L4Error as e:            # an unknown preset, a bad --layers for it...
            print(f"error: {e}", file=sys.stderr)
            return 2
        rows.append(r)
        print(f"{n:>6} {r['decomposed_nodes']:>6}/{r['translated_nodes']:<6} "
              f"{r['decomposed_export_s']:>7}/{r['translated_export_s']:<8} "
              f"{r['decomposed_prefill_ms']:>9}/{r['translated_prefill_ms']:<9} "
              f"{r['decomposed_decode_ms']:>8}/{r['translated_decode_ms']:<9} {r['max_rel_diff']:>12}", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))
    return 1 if any(r["max_rel_diff"] > 1e-4 for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
