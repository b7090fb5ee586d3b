"""GPU benchmark of issue 10 (fused MoE / Int4 / FP8 kernels) at Scout dimensions, through `l4compile bench`.

    python benchmarks/bench_gpu.py [--layers 4] [--parts decode,prefill,full] [--repeats 5] [--out DIR]

Needs a CUDA GPU (H100 / H200) and a CUDA build of torch with triton; elsewhere it exits 2 with one `error:` line.
Each part is one `l4compile bench` run in its own process (so one part's GPU memory never inflates the next);
baselines are transformers eager / `torch.compile` of the transformers model, measured in the same run:

    decode   l4compile bench scout --layers N --device cuda --dtype bfloat16 --backends eager,torch-compile,inductor
                 --batch-sizes 1,8,32 --prompt-lens 128 --decode-steps 32 --quant {none,int4}
             -> ms/token and the fraction of the HBM roofline (weights read per step / peak bandwidth)
    prefill  l4compile bench scout --layers N --device cuda --dtype bfloat16 --backends torch-compile,inductor
                 --batch-sizes 1 --prompt-lens 2048,8192 --decode-steps 1
             -> TFLOP/s and the fraction of bf16 dense peak
    full     l4compile compile scout --backend inductor --device cuda --dtype bfloat16 --quant int4 --stream-weights
                 --max-seq-len 192 --max-batch-size 1 --out DIR/engine-scout-int4 --force
                                                                          (all 48 layers, random weights; streamed:
                 each bf16 weight is drawn on the GPU, quantized and dropped, so 218 GB of bf16 never exist)
             then l4compile bench DIR/engine-scout-int4 --batch-sizes 1 --prompt-lens 128 --decode-steps 64
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
PARTS = ("decode", "prefill", "full")


def bench_commands(layers: int, repeats: int, out: Path, parts: tuple[str, ...]) -> dict[str, list[str]]:
    """part name -> `l4compile bench` argv (without the interpreter prefix)."""
    base = ["bench", "scout", "--device", "cuda", "--dtype", "bfloat16", "--repeats", str(repeats), "--force"]
    scaled = ["--layers", str(layers)]
    cmds: dict[str, list[str]] = {}
    if "decode" in parts:
        for quant in ("none", "int4"):
            cmds[f"decode-{quant}"] = base + scaled + [
                "--quant", quant, "--backends", "eager,torch-compile,inductor", "--batch-sizes", "1,8,32",
                "--prompt-lens", "128", "--decode-steps", "32"]
    if "prefill" in parts:
        cmds["prefill"] = base + scaled + ["--backends", "torch-compile,inductor", "--batch-sizes", "1",
                                           "--prompt-lens", "2048,8192", "--decode-steps", "1"]
    if "full" in parts:
        engine = out / "engine-scout-int4"
        cmds["compile-scout-int4"] = ["compile", "scout", "--backend", "inductor", "--device", "cuda", "--dtype",
                                      "bfloat16", "--quant", "int4", "--stream-weights", "--max-seq-len", "192",
                                      "--max-batch-size", "1", "--force", "--out", str(engine)]
        cmds["full-scout-int4"] = ["bench", str(engine), "--repeats", str(repeats), "--force", "--batch-sizes", "1",
                                   "--prompt-lens", "128", "--decode-steps", "64"]
    return {name: argv if argv[0] == "compile" else argv + ["--out", str(out / name)] for name, argv in cmds.items()}


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4, help="decoder layers for the decode/prefill parts (default 4)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None, help="report root (default benchmarks/results/gpu-<device name>)")
    a = ap.parse_args(argv)
    parts = tuple(p.strip() for p in a.parts.split(",") if p.strip())
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts or a.layers < 1 or a.repeats < 1:
        print(f"error: --parts takes {','.join(PARTS)}; --layers and --repeats must be >= 1", file=sys.stderr)
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
    for name, cmd in bench_commands(a.layers, a.repeats, out, parts).items():
        argv = [sys.executable, "-m", "l4compile", *cmd]
        if cmd[0] == "bench" and any(f.startswith("compile-") for f in failed):
            failed.append(name)                                  # its engine was not built
            continue
        print("$ l4compile " + " ".join(cmd), flush=True)
        if subprocess.run(argv, cwd=ROOT).returncode != 0:
            failed.append(name)
            continue
        if cmd[0] == "compile":
            m = json.loads((Path(cmd[-1]) / "manifest.json").read_text())
            size = sum(v["bytes"] for v in m["artifacts"].values())
            notes.append(f"{name}: compiled in {m['compile_seconds']:.0f} s (stages {m['stage_seconds']}), engine "
                         f"{size / 2**30:.1f} GiB on disk.")
            continue
        rows += summarize(name, json.loads((out / name / "report.json").read_text()))
    header = ["# GPU benchmark (issue 10)", "", f"Device: {device}; torch {torch.__version__}; "
              f"layers for decode/prefill: {a.layers}; repeats: {a.repeats}. Commands: see benchmarks/bench_gpu.py.",
              "", "| run | backend | batch | prompt | decode ms/token | decode tok/s | decode HBM roofline | "
              "prefill ms | prefill TFLOP/s | of bf16 peak | decode x vs torch.compile | prefill x vs torch.compile "
              "| peak GiB |", "|" + "---|" * 13]
    if failed:
        header[2] += f" FAILED runs: {', '.join(failed)}."
    if notes:
        header[3:3] = ["", *notes]
    (out / "SUMMARY.md").write_text("\n".join(header + rows) + "\n")
    print(f"wrote {out / 'SUMMARY.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
