# n decode steps
"""Where a decode step's GPU time goes (``l4compile bench --profile``): each kernel of an engine's decode steps, from
torch.profiler's device trace (CUPTI: the kernels of a replayed CUDA graph too).

    decode_profile(generate, ids, steps) -> {"steps", "step_us", "busy_us", "idle_fraction", "launches_per_step",
                                             "kernels": [{"name", "launches_per_step", "us_per_step", "share"}]}

Method: ``generate(ids, steps)`` and ``generate(ids, 1)`` (the same prefill, no decode step) run under the profiler,
each after a device sync. One decode step's share of a kernel is the difference of the two runs over ``steps - 1``
steps: its launches and its GPU microseconds a step. ``busy_us`` is the union of the kernels' intervals (overlapping
kernels count once); ``step_us`` the difference of the two runs' wall times over the same steps, so
``idle_fraction`` = 1 - busy / step is the part of a step in which the GPU ran no kernel: launch gaps, host work,
syncs. The profiler's own overhead inflates host-side work (loop decode) more than a replayed CUDA graph. A kernel's
``share`` is of the step's busy time. Names are the kernels' own (Triton kernels by function name, Inductor's
``triton_*``, cuBLAS's), cut at ``NAME_CHARS``.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Iterable

import torch

NAME_CHARS = 96
Event = tuple[str, float, float]            # (name, start us, end us)


def device_events(prof, device_type=None) -> list[Event]:
    """The device-side events (kernels, memcpy, memset) of a finished ``torch.profiler.profile``; ``device_type``
    (a ``torch.autograd.DeviceType``, default CUDA) picks whose."""
    from torch.autograd import DeviceType

    want = DeviceType.CUDA if device_type is None else device_type
    return [(e.name, float(e.time_range.start), float(e.time_range.end)) for e in prof.events()
            if e.device_type == want]


def busy_us(events: Iterable[Event]) -> float:
    """Length of the union of the events' intervals."""
    total, end = 0.0, float("-inf")
    for _, s, e in sorted(events, key=lambda ev: ev[1]):
        if e > end:
            total += e - max(s, end)
            end = e
    return total


def per_kernel(events: Iterable[Event]) -> dict[str, tuple[int, float]]:
    """name -> (launches, total us)."""
    out: dict[str, tuple[int, float]] = {}
    for name, s, e in events:
        n, us = out.get(name, (0, 0.0))
        out[name] = (n + 1, us + (e - s))
    return out


def summarize(run: list[Event], base: list[Event], steps: int, run_wall_us: float, base_wall_us: float) -> dict:
    """One decode step's kernels from a profiled generate of ``steps`` tokens (``run``) and one of 1 token
    (``base``), with their wall times (see the module docstring)."""
    n = steps - 1
    if n < 1:
        raise ValueError("a decode profile needs at least 2 new tokens (one decode step)")
    a, b = per_kernel(run), per_kernel(base)
    rows = []
    for name in a:
        launches = (a[name][0] - b.get(name, (0, 0.0))[0]) / n
        us = (a[name][1] - b.get(name, (0, 0.0))[1]) / n
        if launches > 0 and us > 0:
            rows.append({"name": name[:NAME_CHARS], "launches_per_step": round(launches, 2),
                         "us_per_step": round(us, 2)})
    busy = max(0.0, (busy_us(run) - busy_us(base)) / n)
    step = max(0.0, (run_wall_us - base_wall_us) / n)
    for r in rows:
        r["share"] = round(r["us_per_step"] / busy, 4) if busy else None
    rows.sort(key=lambda r: -r["us_per_step"])
    return {"steps": n, "step_us": round(step, 2), "busy_us": round(busy, 2),
            "idle_fraction": round(1 - busy / step, 4) if step > busy else 0.0,
            "launches_per_step": round(sum(r["launches_per_step"] for r in rows), 2), "kernels": rows}


def _profiled(fn: Callable[[], Any], device: str) -> tuple[list[Event], float]:
    """(device events, wall us) of one call of ``fn`` under the profiler."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA] if device == "cuda" else [ProfilerActivity.CPU]  # the device trace alone
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        fn()
        sync()
        wall = (time.perf_counter() - t0) * 1e6
    return device_events(prof), wall


def decode_profile(generate: Callable[[torch.Tensor, int], Any], ids: torch.Tensor, steps: int,
                   device: str = "cuda") -> dict[str, Any]:
    """Profile ``generate(ids, steps)`` against ``generate(ids, 1)``: one decode step's kernels (``summarize``)."""
    run, run_wall = _profiled(lambda: generate(ids, steps), device)
    if not run:         # CUPTI saw nothing (a graph replay it cannot trace, a profiler already running, ...)
        raise RuntimeError(f"the profiler recorded no {device} kernels in a generate of {steps} tokens")
    base, base_wall = _profiled(lambda: generate(ids, 1), device)
    return summarize(run, base, steps, run_wall, base_wall)
