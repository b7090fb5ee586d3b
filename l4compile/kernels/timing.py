"""Device time of one kernel call, as engines launch it: what ``autotune`` picks blocks by and
``benchmarks/bench_kernels.py`` reports.

    graph_timer()(fn) -> ms     CUDA: ``calls`` x (flush L2, fn) captured in one CUDA graph, minus the same graph of
                                flushes alone; an engine launches its kernels from C++ or from a captured decode step,
                                so the Python launch path of a ``triton_op`` wrapper (100-200 us a call on the
                                2026-12-04 H200, whatever the kernel) is left out
    eager_ms(fn) -> ms          CUDA: ``triton.testing.do_bench`` (events, L2 flushed), the launch path included
    wall_timer()(fn) -> ms      anywhere: median wall clock (the CPU interpreter: for the mechanics, not the figures)

Each is ``fn -> float`` with an ``eager`` attribute: True where a CUDA timer fell back to eager events (a function
a CUDA graph cannot capture: a host sync, an allocation the graph cannot hold), so its figure includes the launch.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def eager_ms(fn: Callable[[], object]) -> float:
    """Median milliseconds of ``fn`` launched eagerly on a GPU (CUDA events, L2 flushed before every call)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


eager_ms.eager = True


def graph_timer(calls: int = 10, replays: int = 7, flush_bytes: int = 256 << 20):
    """fn -> ms per call: ``calls`` x (flush L2, fn) captured in one CUDA graph, minus the same graph of flushes alone,
    median of ``replays`` replays each; ``eager_ms`` where the capture is refused (``.eager`` set then)."""
    flush = torch.empty(flush_bytes, dtype=torch.int8, device="cuda")

    def replay_ms(body) -> float:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):        # warm-up off the capture (allocator pools, lazy init)
            body()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            body()
        samples = []
        for _ in range(replays):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        del graph
        return statistics.median(samples)

    def flushes():
        for _ in range(calls):
            flush.zero_()

    def timed(fn) -> float:
        fn()                                    # compile outside the capture
        torch.cuda.synchronize()

        def body():
            for _ in range(calls):
                flush.zero_()
                fn()
        try:
            ms = max(replay_ms(body) - replay_ms(flushes), 0.0) / calls
            timed.eager = False
        except Exception:                       # not capturable: eager events (includes Python launch cost)
            torch.cuda.synchronize()
            ms = eager_ms(fn)
            timed.eager = True
        return ms
    timed.eager = False
    return timed


def wall_timer(repeats: int = 3):
    """fn -> median wall-clock milliseconds of ``repeats`` calls after one warm-up call."""
    def timed(fn) -> float:
        fn()
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(samples)
    timed.eager = False
    return timed
