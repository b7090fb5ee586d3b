"""What the engine benchmark scripts share: their command line (run as `python benchmarks/<script>.py`)."""
from __future__ import annotations

import argparse

import torch


def engine_bench_parser(description: str | None = None) -> argparse.ArgumentParser:
    """--preset, --prompt, --new (decode steps), --repeats, --threads; scripts add their own flags."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="bench-scout")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    return ap


def parse(ap: argparse.ArgumentParser) -> argparse.Namespace:
    """Parse and pin torch's thread count (ORT sessions take the same count, see backends/onnxruntime)."""
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    return a
