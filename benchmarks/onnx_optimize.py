"""How the ONNX graph optimizer's time grows with the model: l4compile.onnx.optimize against onnxscript's own optimizer
(what torch.onnx.export(optimize=True) runs), on the same exported graph, in the same run.

    python benchmarks/onnx_optimize.py [--preset bench-scout] [--layers 2,4,8] [--upstream-max-nodes 8000] [--json F]

For each layer count the preset is lowered (default passes, KV cache) and exported to ONNX unoptimized once; each
optimizer then runs on its own copy of that graph. onnxscript's is quadratic in the node count (its multi-output
rewrite patterns walk the whole graph per node), so it is skipped above --upstream-max-nodes. The two optimized
graphs must have the same op counts. Only the node count matters here, so small hidden sizes stand in for real
ones: bench-scout has Scout's 16 experts per layer, bench-maverick Maverick's 128 on every other layer.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch


def measure(preset: str, layers: int, upstream_max_nodes: int) -> dict:
    import onnx
    from onnxscript import ir, optimizer

    from l4compile.backends import onnxruntime as ort_backend
    from l4compile.compiler import lower
    from l4compile.config import CompileConfig
    from l4compile.onnx.optimize import optimize
    from l4compile.progress import Progress

    config = CompileConfig(backend="onnxruntime", layers=layers, max_seq_len=64, max_batch_size=1)
    program = lower(preset, config, progress=Progress(enabled=False)).program
    t = time.perf_counter()
    exported = ort_backend.onnx_program(program, optimize=False).model
    export_s = time.perf_counter() - t
    nodes = len(list(exported.graph))
    blob = ir.serde.serialize_model(exported).SerializeToString()
    del exported

    def run(fn) -> tuple[float, Counter]:
        model = ir.serde.deserialize_model(onnx.load_from_string(blob))
        t = time.perf_counter()
        fn(model)
        return time.perf_counter() - t, Counter(n.op_type for n in model.graph)

    ours_s, ours_ops = run(optimize)
    row = {"preset": preset, "layers": layers, "nodes": nodes, "nodes_optimized": sum(ours_ops.values()),
           "export_s": round(export_s, 2), "ours_s": round(ours_s, 2), "onnxscript_s": None, "ratio": None,
           "same_ops": None}
    if nodes <= upstream_max_nodes:
        theirs_s, theirs_ops = run(optimizer.optimize_ir)
        row.update(onnxscript_s=round(theirs_s, 2), ratio=round(theirs_s / ours_s, 1), same_ops=theirs_ops == ours_ops)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="bench-scout")
    ap.add_argument("--layers", default="2,4,8", help="comma-separated layer counts")
    ap.add_argument("--upstream-max-nodes", type=int, default=8000,
                    help="skip onnxscript's optimizer on graphs above this many nodes (it is quadratic)")
    ap.add_argument("--json", default=None, metavar="FILE", help="also write the rows here")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    try:
        layer_counts = [int(x) for x in a.layers.split(",")]
        if any(n < 1 for n in layer_counts):
            raise ValueError
    except ValueError:
        print(f"error: --layers takes positive integers separated by commas, got {a.layers!r}", file=sys.stderr)
        return 2
    torch.set_num_threads(a.threads)
    rows = []
    print(f"{'layers':>6} {'nodes':>7} {'optimized':>9} {'export s':>8} {'ours s':>7} {'onnxscript s':>12} "
          f"{'ratio':>6}  same ops")
    from l4compile.errors import L4Error

    for n in layer_counts:
        try:
            r = measure(a.preset, n, a.upstream_max_nodes)
        except L4Error as e:            # an unknown preset, a bad --layers for it...
            print(f"error: {e}", file=sys.stderr)
            return 2
        rows.append(r)
        fmt = (lambda v: "-" if v is None else str(v))
        print(f"{n:>6} {r['nodes']:>7} {r['nodes_optimized']:>9} {r['export_s']:>8} {r['ours_s']:>7} "
              f"{fmt(r['onnxscript_s']):>12} {fmt(r['ratio']):>6}  {fmt(r['same_ops'])}", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))
    return 1 if any(r["same_ops"] is False for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
