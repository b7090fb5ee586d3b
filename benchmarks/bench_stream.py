"""Host memory of the compile front half (frontend -> trace -> passes -> place) in memory vs --stream-weights.

    python benchmarks/bench_stream.py [--preset scout] [--layers 1,2] [--dtype bfloat16] [--quant int4]

Each (mode, layers) runs in its own child process, which reports its peak resident set (``ru_maxrss``), the stage
times and the bytes its graph holds at the end; the backend is left out (it builds from the same graph either way).
Two layer counts give the cost of one decoder layer in each mode, and the script extrapolates both to the preset's
full depth (``num_hidden_layers``): the figure that says whether full Scout Int4 can be compiled on one host.
"""
# L layers
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

MODES = ("memory", "stream")


def child(preset: str, layers: int, dtype: str, quant: str, mode: str) -> dict:
    import torch

    from l4compile.compiler import lower
    from l4compile.config import CompileConfig
    from l4compile.progress import Progress

    torch.set_num_threads(2)
    cfg = CompileConfig(quant=quant, dtype=dtype, layers=layers, max_seq_len=128, max_batch_size=1,
                        stream_weights=mode == "stream")
    progress = Progress(enabled=False)
    t0 = time.perf_counter()
    low = lower(preset, cfg, progress=progress)
    held = sum(t.numel() * t.element_size() for t in low.program.gm.state_dict().values())
    return {"mode": mode, "layers": layers, "seconds": round(time.perf_counter() - t0, 1),
            "stages": {k: round(v, 1) for k, v in progress.stages.items()},
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "graph_bytes": held}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="scout")
    ap.add_argument("--layers", default="1,2", help="two (or more) layer counts, comma-separated")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--quant", default="int4")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        mode, layers = a.child.split(":")
        print(json.dumps(child(a.preset, int(layers), a.dtype, a.quant, mode)))
        return 0
    from l4compile.presets import get_preset

    depth = get_preset(a.preset).text_config_kwargs()["num_hidden_layers"]
    counts = [int(x) for x in a.layers.split(",")]
    rows = []
    for mode in MODES:
        for n in counts:
            cmd = [sys.executable, __file__, "--preset", a.preset, "--dtype", a.dtype, "--quant", a.quant,
                   "--child", f"{mode}:{n}"]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                print(f"{mode} L={n}: failed\n{res.stderr[-2000:]}", file=sys.stderr)
                return 1
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{mode:6s} L={n}: peak RSS {r['peak_rss_bytes'] / 2**30:6.2f} GiB, graph {r['graph_bytes'] / 2**30:6.2f} "
                  f"GiB, {r['seconds']:6.1f} s  {r['stages']}", flush=True)
    gib = 2**30
    print(f"\n{a.preset} {a.dtype} --quant {a.quant}: per decoder layer and extrapolated to {depth} layers")
    for mode in MODES:
        rs = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["layers"])
        lo, hi = rs[0], rs[-1]
        d = hi["layers"] - lo["layers"]
        slope = (hi["peak_rss_bytes"] - lo["peak_rss_bytes"]) / d
        held = (hi["graph_bytes"] - lo["graph_bytes"]) / d
        full = hi["peak_rss_bytes"] + slope * (depth - hi["layers"])
        print(f"  {mode:6s}: +{slope / gib:.2f} GiB peak RSS per layer (graph +{held / gib:.2f} GiB); "
              f"{depth} layers ~{full / gib:.0f} GiB peak")
    return 0


if __name__ == "__main__":
    sys.exit(main())
