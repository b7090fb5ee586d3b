"""GPU benchmark of issue 10 (fused MoE / Int4 / FP8 kernels) at Scout dimensions, through `l4compile bench`.

    python benchmarks/bench_gpu.py [--layers 4] [--parts decode,modes,context,prefill,full] [--repeats 5]
                                   [--out DIR]

Needs a CUDA GPU (H100 / H200) and a CUDA build of torch with triton; elsewhere it exits 2 with one `error:` line.
Each part is one `l4compile bench` run in its own process (so one part's GPU memory never inflates the next);
baselines are transformers eager / `torch.compile` of the transformers model, measured in the same run:

    decode   l4compile bench scout --layers N --device cuda --dtype bfloat16 --backends eager,torch-compile,inductor
                 --batch-sizes 1,8,32 --prompt-lens 128 --decode-steps 32 --quant {none,int4} --profile
             -> ms/token and the fraction of the HBM roofline (weights + KV read per step / peak bandwidth)
             and again with --layers N/2 --backends inductor, for the figure PER LAYER: (ms(N) - ms(N/2)) / (N - N/2)
             against the bytes one more layer reads (weights + KV), which leaves the lm_head, embedding and the
             step's fixed costs out (the issue's target is per layer)
    layer    l4compile bench scout --layers N --device cuda --dtype bfloat16 --quant int4 --backends inductor
                 --batch-sizes 1,8 --prompt-lens 128 --decode-steps 32 --profile, then --layers N/2 (no profile)
                 --pass-option quantize.quantize_lm_head=true
             -> the issue's first target alone: one Int4 layer's decode time and HBM roofline at batch 1 and 8 (as
             decode computes it), and each kernel of a step; two compiles, no baselines (--layers 2: ~a
             decode1-sized call of gpu_session.sh). The lm_head in Int4 (0.52 GB a step, not 2.07) leaves the
             difference of the two runs alone but shrinks the fixed part of each, and with it the noise of a
             ~50 us difference between two ~1 ms steps
    modes    python benchmarks/bench_decode_modes.py --model scout --layers N --quant int4 --dtype bfloat16
                 --device cuda --batch-sizes 1,8 --prompt 128 --new 64
             -> decode with one engine call per step against CUDA graph replay, same engine, same run
    context  l4compile bench scout --layers N --device cuda --dtype bfloat16 --quant int4 --backends inductor
                 --batch-sizes 1,8 --prompt-lens 128,4096 --decode-steps 32 --max-seq-len 8192
             -> decode in caches sized for 8K positions, as a deployment compiles them: near the start (prompt 128,
                which the decode part runs with a 160-slot cache) and half-way in; the attention kernel reads the
                visible positions only, so the first should match the decode part's figure
    prefill  l4compile bench scout --layers N --device cuda --dtype bfloat16 --backends torch-compile,inductor
                 --batch-sizes 1 --prompt-lens 2048,8192 --decode-steps 2, then --quant int4 --backends inductor
             -> TFLOP/s and the fraction of bf16 dense peak (Int4: its GEMMs on their prefill blocks)
    full     l4compile compile scout --backend inductor --device cuda --dtype bfloat16 --quant int4 --stream-weights
                 --max-seq-len 192 --max-batch-size 1 --out DIR/engine-scout-int4 --force
                                                                          (all 48 layers, random weights; streamed:
                 each bf16 weight is drawn on the GPU, quantized and dropped, so 218 GB of bf16 never exist)
                 (--lm-head-int4: also --pass-option quantize.quantize_lm_head=true)
             then l4compile bench DIR/engine-scout-int4 --batch-sizes 1 --prompt-lens 128 --decode-steps 64 --profile
             (full-compile and full-bench: either half alone, the engine at --engine-dir; the compile of 48 layers
             may take most of a 10-minute call)
             -> decode tokens/s at batch 1 and peak GPU memory; its MoE layers run l4::moe_q on CUDA as the
                fused Int4 Triton MoE l4::moe_q_fused, compiled into the engine. Two processes, so each fits a
                10-minute call on a lent GPU host (run them by hand if one call cannot take both).

(every run also gets --repeats R --force --out DIR/<part>). Reports (json/html/md per part) go under
``benchmarks/results/gpu-<device>/`` with ``SUMMARY.md`` collecting the figures the issue asks for.
Targets (issue 10): decode at batch 1 >= 80% of HBM roofline; full Scout Int4 >= 250 tokens/s at batch 1.
"""
# B batch, S prompt length
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("decode", "layer", "modes", "context", "prefill", "full", "full-compile", "full-bench")


def bench_commands(layers: int, repeats: int, out: Path, parts: tuple[str, ...],
                   lm_head_int4: bool = False, engine_dir: Path | None = None,
                   tune_kernels: bool = False) -> dict[str, list[str]]:
    """part name -> `l4compile bench` argv (without the interpreter prefix). ``lm_head_int4``: the full-Scout engine
    also quantizes its lm_head (2.07 GB of bf16 a token, 0.52 GB in Int4). ``full`` is ``full-compile`` then
    ``full-bench``, which may also run alone (two calls on a lent host, each within its time limit); the engine is
    ``engine_dir`` (default ``out``/engine-scout-int4). ``tune_kernels``: every inductor engine is compiled with
    --tune-kernels (its Int4 blocks timed on this GPU; cached, so each problem is timed once a host)."""
    tune = ["--tune-kernels"] if tune_kernels else []
    base = ["bench", "scout", "--device", "cuda", "--dtype", "bfloat16", "--repeats", str(repeats), "--force", *tune]
    scaled = ["--layers", str(layers)]
    cmds: dict[str, list[str]] = {}
    if "decode" in parts:
        for quant in ("none", "int4"):
            shape = ["--quant", quant, "--batch-sizes", "1,8,32", "--prompt-lens", "128", "--decode-steps", "32"]
            cmds[f"decode-{quant}"] = base + scaled + shape + ["--backends", "eager,torch-compile,inductor",
                                                               "--profile"]
            if layers >= 2:      # the per-layer figure: the same engine at half depth
                cmds[f"decode-{quant}-half"] = base + ["--layers", str(layers // 2)] + shape + ["--backends",
                                                                                                "inductor"]
    if "layer" in parts:     # the issue's first target alone: one Int4 layer at batch 1 and 8, and its kernels
        shape = ["--quant", "int4", "--batch-sizes", "1,8", "--prompt-lens", "128", "--decode-steps", "32",
                 "--backends", "inductor", "--pass-option", "quantize.quantize_lm_head=true"]   # see the docstring
        cmds["layer-int4"] = base + scaled + shape + ["--profile"]
        cmds["layer-int4-half"] = base + ["--layers", str(layers // 2)] + shape
    if "modes" in parts:
        cmds["modes-int4"] = [str(ROOT / "benchmarks" / "bench_decode_modes.py"), "--model", "scout", "--layers",
                              str(layers), "--quant", "int4", "--dtype", "bfloat16", "--device", "cuda",
                              "--batch-sizes", "1,8", "--prompt", "128", "--new", "64", "--repeats", str(repeats),
                              "--out", str(out / "modes-int4.json")]
    if "context" in parts:
        cmds["context-int4"] = base + scaled + ["--quant", "int4", "--backends", "inductor", "--batch-sizes", "1,8",
                                                "--prompt-lens", "128,4096", "--decode-steps", "32",
                                                "--max-seq-len", "8192"]
    if "prefill" in parts:
        shape = ["--batch-sizes", "1", "--prompt-lens", "2048,8192", "--decode-steps", "2"]
        cmds["prefill"] = base + scaled + ["--backends", "torch-compile,inductor", *shape]
        # and Int4, whose GEMMs run their prefill blocks at these lengths (layout.INT4_PREFILL_ROWS)
        cmds["prefill-int4"] = base + scaled + ["--quant", "int4", "--backends", "inductor", *shape]
    engine = engine_dir or out / "engine-scout-int4"
    if "full" in parts or "full-compile" in parts:
        lm_head = ["--pass-option", "quantize.quantize_lm_head=true"] if lm_head_int4 else []
        cmds["compile-scout-int4"] = ["compile", "scout", "--backend", "inductor", "--device", "cuda", "--dtype",
                                      "bfloat16", "--quant", "int4", "--stream-weights", "--max-seq-len", "192",
                                      "--max-batch-size", "1", "--force", *lm_head, *tune, "--out", str(engine)]
    if "full" in parts or "full-bench" in parts:
        cmds["full-scout-int4"] = ["bench", str(engine), "--repeats", str(repeats), "--force", "--batch-sizes", "1",
                                   "--prompt-lens", "128", "--decode-steps", "64", "--profile"]
    return {name: argv if argv[0] == "compile" or argv[0].endswith(".py") else argv + ["--out", str(out / name)]
            for name, argv in cmds.items()}


def per_layer_rows(quant: str, full: dict, half: dict) -> list[str]:
    """Markdown rows: decode ms and HBM fraction of ONE layer, from the inductor engine at N and N/2 layers."""
    def points(report):
        roof = {(r["backend"], r["batch"]): r for r in report.get("roofline") or []}
        return {r["batch"]: (r["decode_ms_per_token"]["median"], roof.get(("inductor", r["batch"]), {}))
                for r in report["summary"] if r["backend"] == "inductor"}

    n_full, n_half = (int(r["model"]["config"]["num_hidden_layers"]) for r in (full, half))
    a, b = points(full), points(half)
    rows = []
    for batch in sorted(set(a) & set(b)):
        (ms_a, roof_a), (ms_b, roof_b) = a[batch], b[batch]
        ms = (ms_a - ms_b) / (n_full - n_half)
        nbytes = ((roof_a.get("decode_bytes_per_step") or 0) - (roof_b.get("decode_bytes_per_step") or 0)) \
            / (n_full - n_half)                                          # one layer's weights and KV
        peak = roof_a.get("hbm_bytes_per_s_peak")
        frac = nbytes / (ms / 1e3) / peak if peak and ms > 0 and nbytes > 0 else None
        rows.append(f"| {quant} | {batch} | {ms * 1e3:.1f} | {nbytes / 2**20:.1f} | "
                    f"{'-' if frac is None else f'{100 * frac:.1f}%'} |")
    return rows


def summarize(name: str, report: dict) -> list[str]:
    """Markdown table rows: one per (backend, batch, prompt) of one report."""
    roof = {(r["backend"], r["batch"], r["prompt_len"]): r for r in report.get("roofline") or []}
    lines = []
    for r in report["summary"]:
        f = roof.get((r["backend"], r["batch"], r["prompt_len"]), {})
        pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
        num = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
        mem = r.get("peak_memory_bytes")
        lines.append(f"| {name} | {r['backend']} | {r['batch']} | {r['prompt_len']} | "
                     f"{r['decode_ms_per_token']['median']:.3f} | {num(r['decode_tokens_per_s'], '.1f')} | "
                     f"{pct(f.get('decode_hbm_fraction'))} | {r['prefill_ms']['median']:.2f} | "
                     f"{num(f.get('prefill_tflops'), '.1f')} | {pct(f.get('prefill_peak_fraction'))} | "
                     f"{num(r.get('speedup_decode_vs_torch_compile'), '.2f')} | "
                     f"{num(r.get('speedup_prefill_vs_torch_compile'), '.2f')} | "
                     f"{'-' if mem is None else f'{mem / 2**30:.1f}'} |")
    return lines


def profile_rows(name: str, report: dict, top: int = 6) -> list[str]:
    """Markdown lines for a report's ``--profile`` entries: per engine and batch, the step's GPU time, its idle share
    and its ``top`` kernels (the full tables are in the run's report.md)."""
    lines = []
    for p in report.get("profile") or []:
        head = f"- {name}, {p['backend']}, batch {p['batch']}: "
        if "error" in p:
            lines.append(head + f"profile failed ({p['error']})")
            continue
        kernels = "; ".join(f"`{k['name'][:48]}` {k['us_per_step']:.1f} us x{k['launches_per_step']:g}"
                            for k in p["kernels"][:top])
        lines.append(head + f"step {p['step_us']:.0f} us, kernels busy {p['busy_us']:.0f} us (idle "
                     f"{100 * p['idle_fraction']:.0f}%), {p['launches_per_step']:g} launches; {kernels}")
    return lines


def tuned_rows(name: str, report: dict) -> list[str]:
    """Markdown lines for the engines of a report compiled with --tune-kernels: per Int4 problem the blocks chosen
    and their time against layout's static choice (each candidate's time is in the tuning cache, tuning.json)."""
    lines = []
    for b in report.get("backends") or []:
        for k in b.get("kernel_blocks") or []:
            us = "-" if k["us"] is None else f"{k['us']:.1f} us"
            static = "failed" if k["static_us"] is None else f"{k['static_us']:.1f} us"
            lines.append(f"- {name}, {b['name']}: {k['problem']} (x{k['count']} a step): {k['blocks'] or 'none ran'} "
                         f"{us}, layout's {static}")
    return lines


def mode_table(rows: list[dict]) -> str:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_decode_modes import table
    return table(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4, help="decoder layers for the decode/prefill parts (default 4)")
    ap.add_argument("--parts", default=",".join(p for p in PARTS if p != "layer"),      # decode measures it too
                    help=f"comma-separated subset of {','.join(PARTS)} (default: all but layer)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None, help="report root (default benchmarks/results/gpu-<device name>)")
    ap.add_argument("--lm-head-int4", action="store_true",
                    help="full: quantize the lm_head too (--pass-option quantize.quantize_lm_head=true)")
    ap.add_argument("--tune-kernels", action="store_true",
                    help="compile every inductor engine with --tune-kernels (Int4 blocks timed on this GPU first)")
    ap.add_argument("--engine-dir", default=None,
                    help="full, full-compile, full-bench: the full-Scout engine directory (default "
                         "OUT/engine-scout-int4); full-bench needs one compiled there")
    a = ap.parse_args(argv)
    parts = tuple(p.strip() for p in a.parts.split(",") if p.strip())
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts or a.layers < 1 or a.repeats < 1:
        print(f"error: --parts takes {','.join(PARTS)}; --layers and --repeats must be >= 1", file=sys.stderr)
        return 2
    if "layer" in parts and a.layers < 2:
        print("error: the layer part times --layers N against N/2 layers: give --layers 2 or more", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print(f"error: bench_gpu.py needs a CUDA GPU and a CUDA build of torch (this is torch {torch.__version__} "
              "with no CUDA device); run it on an H100/H200 host", file=sys.stderr)
        return 2
    device = torch.cuda.get_device_name()
    out = Path(a.out) if a.out else ROOT / "benchmarks" / "results" / f"gpu-{re.sub(r'[^A-Za-z0-9]+', '-', device)}"
    out.mkdir(parents=True, exist_ok=True)
    failed = []
    rows = []
    notes = []
    reports = {}

    def run_one(name: str, cmd: list[str]) -> None:
        nonlocal rows, notes
        argv = [sys.executable, *cmd] if cmd[0].endswith(".py") else [sys.executable, "-m", "l4compile", *cmd]
        if cmd[0] == "bench" and any(f.startswith("compile-") for f in failed):
            failed.append(name)                                  # its engine was not built
            return
        print("$ " + ("python " if cmd[0].endswith(".py") else "l4compile ") + " ".join(cmd), flush=True)
        if subprocess.run(argv, cwd=ROOT).returncode != 0:
            failed.append(name)
            return
        if cmd[0].endswith(".py"):
            modes = json.loads((out / f"{name}.json").read_text())
            notes += [f"{name}: {modes['header']}", "", mode_table(modes["rows"]), ""]
            return
        if cmd[0] == "compile":
            m = json.loads((Path(cmd[-1]) / "manifest.json").read_text())
            size = sum(v["bytes"] for v in m["artifacts"].values())
            notes.append(f"{name}: compiled in {m['compile_seconds']:.0f} s (stages {m['stage_seconds']}), engine "
                         f"{size / 2**30:.1f} GiB on disk.")
            return
        reports[name] = json.loads((out / name / "report.json").read_text())
        rows += summarize(name, reports[name])

    def write_summary() -> None:
        """SUMMARY.md of the runs done so far: rewritten after every run, so a session cut off keeps them."""
        table = list(rows)
        layer_rows = [row for run, q in (("decode-none", "none"), ("decode-int4", "int4"), ("layer-int4", "int4"))
                      if run in reports and f"{run}-half" in reports
                      for row in per_layer_rows(q, reports[run], reports[f"{run}-half"])]
        header = ["# GPU benchmark (issue 10)", "", f"Device: {device}; torch {torch.__version__}; "
                  f"layers for decode/prefill: {a.layers}; repeats: {a.repeats}. Commands: see "
                  "benchmarks/bench_gpu.py.", "",
                  "| run | backend | batch | prompt | decode ms/token | decode tok/s | decode HBM roofline | "
                  "prefill ms | prefill TFLOP/s | of bf16 peak | decode x vs torch.compile | prefill x vs "
                  "torch.compile | peak GiB |", "|" + "---|" * 13]
        if failed:
            header[2] += f" FAILED runs: {', '.join(failed)}."
        if notes:
            header[3:3] = ["", *notes]
        if layer_rows:
            table += ["", "Per layer (inductor engine, decode; marginal time of one layer between --layers N and "
                      "N/2, weights and KV one layer reads at that batch). Target: >= 80% of the HBM roofline at "
                      "batch 1.", "", "| quant | batch | decode us/layer | MiB read/layer | HBM roofline |",
                      "|---|---|---|---|---|", *layer_rows]
        tuned = [line for name, rep in reports.items() for line in tuned_rows(name, rep)]
        if tuned:
            table += ["", "Int4 kernel blocks tuned on this GPU (--tune-kernels, a batch-1 decode step's shapes):", "",
                      *tuned]
        profiled = [line for name, rep in reports.items() for line in profile_rows(name, rep)]
        if profiled:
            table += ["", "Decode-step profiles (--profile; every kernel in each run's report.md):", "", *profiled]
        (out / "SUMMARY.md").write_text("\n".join(header + table) + "\n")

    engine_dir = Path(a.engine_dir) if a.engine_dir else None
    if "full-bench" in parts and "full" not in parts and "full-compile" not in parts:
        manifest = (engine_dir or out / "engine-scout-int4") / "manifest.json"
        if not manifest.is_file():
            print(f"error: full-bench needs a compiled full-Scout engine: no {manifest} (run full-compile first, "
                  "with the same --engine-dir)", file=sys.stderr)
            return 2
    for name, cmd in bench_commands(a.layers, a.repeats, out, parts, a.lm_head_int4, engine_dir,
                                    a.tune_kernels).items():
        run_one(name, cmd)
        write_summary()
    print(f"wrote {out / 'SUMMARY.md'}:\n" + (out / "SUMMARY.md").read_text())     # into a session's log too
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
