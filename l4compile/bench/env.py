"""The environment a benchmark ran in: library versions, CPU, threads, GPU. Nothing here imports the optional
backends (onnxruntime, tensorrt): their versions come from package metadata."""
from __future__ import annotations

import importlib.metadata
import os
import platform
from typing import Any


def _version(*dists: str) -> str | None:
    for d in dists:
        try:
            return importlib.metadata.version(d)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str = "cpu") -> dict[str, Any]:
    import torch
    import transformers

    import l4compile

    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = os.cpu_count()
    gpu = None
    if device == "cuda" and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(torch.cuda.current_device())
        gpu = {"name": p.name, "memory_bytes": int(p.total_memory), "count": torch.cuda.device_count(),
               "capability": f"{p.major}.{p.minor}", "cuda": torch.version.cuda}
    return {
        "python": platform.python_version(), "platform": platform.platform(), "l4compile": l4compile.__version__,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "onnxruntime": _version("onnxruntime", "onnxruntime-gpu"), "tensorrt": _version("tensorrt", "torch-tensorrt"),
        "cpu": {"model": cpu_model(), "logical_cpus": os.cpu_count(), "usable_cpus": affinity,
                "torch_threads": torch.get_num_threads()},
        "gpu": gpu,
    }
