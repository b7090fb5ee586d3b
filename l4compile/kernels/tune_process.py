"""``compile --tune-kernels`` in a child process, so a candidate that breaks the GPU cannot break the compile.

Most candidates ``autotune`` measures have never run on the GPU at hand (split-K's chained reduction, the inline-PTX
unpack). One that faults leaves the CUDA context unusable for the rest of the process (CUDA errors are sticky), one
that kills the process takes the compile with it, and one that never finishes holds it until an outer timeout. The
compile's process also holds the engine's weights on the GPU (~58 GB for full Scout Int4), which a restart would
have to place again. So ``tune_isolated`` runs ``autotune.tune`` in ``python -m l4compile.kernels.tune_process JOB``
and watches it:

    - the child appends each record to a file as it is known, and before each candidate a progress line naming it;
    - it exits 0 when done; on a sticky CUDA error (``autotune.ContextLost``) it writes the error and exits 3;
    - it is killed when its progress file stalls for ``stall_s`` seconds (a hang; ``startup_s`` before its first
      line: importing torch, Triton and initializing CUDA);
    - when it dies, the candidate it was running is excluded with the reason (recorded as that candidate's error, as a
      refused configuration is) and a new child measures the problems not yet recorded. A problem whose own tensors
      or reference killed it is recorded with no blocks (layout's choice stays). Every exclusion removes a candidate,
      so restarts end. Only when the first child reaches no problem at all (a GPU in exclusive-process mode gives
      it no context) does this process tune, unprotected, rather than fail the compile (``isolated`` False).

Problems found in the cache are answered here without starting a process. The child writes the cache as ``tune``
does, so what it measured before dying is kept.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .autotune import (ContextLost, Problem, _cache_key, _device_name, _read_cache, cached_record, problem_name,
                       resolve_cache, resolve_device, summary, tune)
from .tuned_blocks import Key

STALL_S = 120.0      # a candidate (compile + check + CUDA-graph timing) that runs this long without progress: hung
STARTUP_S = 300.0    # the child's imports and CUDA initialization, before its first progress line
LOST_EXIT = 3        # the child's exit status after a sticky CUDA error (its progress file says which candidate)


def tune_isolated(probs: list[Problem], device: str | torch.device, dtype: torch.dtype,
                  tokens: tuple[int, ...] = (1,), cache: Path | None | bool = True,
                  log: Callable[[str], None] | None = None, stall_s: float = STALL_S, startup_s: float = STARTUP_S,
                  command: list[str] | None = None) -> dict[str, Any]:
    """``autotune.tune``'s result, measured in child processes (``command`` + [job file]; default this module run by
    this interpreter) -> plus ``restarts``: one entry per child that died (``problem``, ``label``, ``reason``), and
    ``isolated``: False where the first child never reached a problem and this process tuned instead."""
    from l4compile.errors import L4Error

    device = resolve_device(device)
    path = resolve_cache(cache)
    log = log or (lambda line: None)
    t0 = time.perf_counter()
    done: dict[Key, dict[str, Any]] = {}
    stored = _read_cache(path) if path else {}
    for p in probs:
        rec = cached_record(stored, _cache_key(p, device, dtype, tokens), p)
        if rec is not None:
            done[p.key] = rec
            log("tuned " + summary(rec))
    excluded: dict[tuple[Key, str], str] = {}
    restarts: list[dict[str, Any]] = []
    isolated = True
    with tempfile.TemporaryDirectory(prefix="l4compile-tune-") as tmp:
        while pending := [p for p in probs if p.key not in done]:
            count = {p.key: p.count for p in pending}
            run = _Child(Path(tmp) / f"run{len(restarts)}", pending, device, dtype, tokens, path, excluded, command)
            status = run.wait(stall_s, startup_s)
            for rec in run.records():
                done[tuple(rec["key"])] = dict(rec, count=count[tuple(rec["key"])])
                log("tuned " + summary(rec))
            if all(p.key in done for p in pending):
                break
            if status == 0:
                raise L4Error("the kernel tuning process ended without measuring "
                              + ", ".join(problem_name(p.key) for p in pending if p.key not in done))
            where, reason = run.failure(status)
            if where is None and not restarts:
                # the first child got to no problem (a GPU in exclusive-process mode refuses it a context, a broken
                # environment): tune here instead, without the protection, rather than fail the compile
                log(f"tune kernels: the tuning process did not start ({reason}); tuning in this process")
                res = tune(pending, device, dtype, tokens, cache=path or False, log=log)
                done.update((tuple(rec["key"]), rec) for rec in res["problems"])
                isolated = False
                break
            if where is None:
                raise L4Error(f"a kernel tuning process failed before it measured anything: {reason}")
            key, label = where
            if key in done:          # it died between a record and the next problem's first line: that problem
                key, label = next(p.key for p in pending if p.key not in done), None
            restarts.append({"problem": list(key), "label": label, "reason": reason})
            if label is None:       # the problem's own tensors or reference: nothing of it can be measured
                done[key] = {"key": list(key), "count": count[key], "tokens": list(tokens), "blocks": None,
                             "label": None, "us": None, "static_us": None, "candidates": [], "cached": False,
                             "error": reason}
                log(f"tune kernels: {problem_name(key)} could not be set up ({reason}); layout's blocks stay")
            else:
                excluded[(key, label)] = reason
                log(f"tune kernels: {problem_name(key)} {label} {reason}; measuring the rest without it")
    return {"device": _device_name(device), "tokens": list(tokens), "dtype": str(dtype).removeprefix("torch."),
            "seconds": round(time.perf_counter() - t0, 3), "problems": [done[p.key] for p in probs],
            "isolated": isolated, "restarts": restarts}


class _Child:
    """One tuning process: its job file, progress file, records file and output."""

    def __init__(self, work: Path, probs: list[Problem], device: torch.device, dtype: torch.dtype,
                 tokens: tuple[int, ...], cache: Path | None, excluded: dict[tuple[Key, str], str],
                 command: list[str] | None):
        work.mkdir()
        self.progress, self.out, self.log = work / "progress.jsonl", work / "records.jsonl", work / "output.txt"
        job = {"problems": [{"key": list(p.key), "count": p.count, "top_k": p.top_k,
                             "rope": list(p.rope) if p.rope else None, "rope_count": p.rope_count} for p in probs],
               "device": str(device), "dtype": str(dtype).removeprefix("torch."), "tokens": list(tokens),
               "cache": str(cache) if cache else None, "progress": str(self.progress), "records": str(self.out),
               "excluded": [[list(k), label, why] for (k, label), why in excluded.items()], "parent": os.getpid()}
        (work / "job.json").write_text(json.dumps(job))
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])          # this l4compile, first on the child's path
        env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
        with open(self.log, "wb") as sink:
            self.proc = subprocess.Popen([*(command or [sys.executable, "-m", __name__]), str(work / "job.json")],
                                         stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.started = time.monotonic()
        self.killed_after: float | None = None

    def wait(self, stall_s: float, startup_s: float) -> int | None:
        """The child's exit status, or None when it stalled and was killed (as it is when this wait is interrupted)."""
        try:
            while (status := self.proc.poll()) is None:
                seen = self.progress.stat().st_mtime if self.progress.exists() else None
                idle = time.time() - seen if seen is not None else time.monotonic() - self.started
                limit = stall_s if seen is not None else startup_s
                if idle > limit:
                    self.killed_after = limit
                    return None
                time.sleep(0.1)
            return status
        finally:
            if self.proc.poll() is None:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:      # it ended in between
                    pass
                self.proc.wait()

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in _lines(self.out)]

    def failure(self, status: int | None) -> tuple[tuple[Key, str | None] | None, str]:
        """(problem key, candidate label or None: its set-up) the child was running when it died, and why."""
        events = [json.loads(line) for line in _lines(self.progress)]
        running = next((e for e in reversed(events) if "key" in e), None)
        where = (tuple(running["key"]), running["label"]) if running else None
        lost = next((e["error"] for e in reversed(events) if "error" in e), None)
        if status is None:
            reason = f"made no progress for {self.killed_after:g} s (the tuning process was killed)"
        elif status == LOST_EXIT and lost:
            reason = f"left the GPU unusable ({lost})"
        elif status < 0:
            try:
                reason = f"killed the tuning process ({signal.Signals(-status).name})"
            except ValueError:
                reason = f"killed the tuning process (signal {-status})"
        else:
            tail = _lines(self.log)[-1:] or ["no output"]
            reason = f"ended the tuning process with status {status} ({tail[0].strip()[:200]})"
        return where, reason


def _lines(path: Path) -> list[str]:
    """The complete lines of a file the child may have died writing (a torn last line is dropped)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    return [line for line in text.split("\n")[:-1] if line.strip()]


def _append(path: Path, obj: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(obj) + "\n")


def _exit_with(parent: int) -> None:
    """End this process as soon as ``parent`` (the compile) has ended: it runs in a session of its own (so that a
    hang can be killed with what it started), out of reach of the signals a timeout sends the compile's process
    group, and a tuning process left behind would hold the GPU through whatever runs next."""
    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)
    threading.Thread(target=watch, daemon=True, name="l4compile-tune-parent").start()


def main(argv: list[str] | None = None) -> int:
    """The child: ``python -m l4compile.kernels.tune_process JOB.json`` (written by ``tune_isolated``)."""
    job = json.loads(Path((argv if argv is not None else sys.argv[1:])[0]).read_text())
    _exit_with(job["parent"])
    from .dispatch import load_triton_ops

    load_triton_ops()
    progress = Path(job["progress"])
    _append(progress, {"started": os.getpid()})
    probs = [Problem(tuple(p["key"]), p["count"], p["top_k"], tuple(p["rope"]) if p.get("rope") else None,
                     p.get("rope_count")) for p in job["problems"]]
    excluded = {(tuple(k), label): why for k, label, why in job["excluded"]}
    try:
        tune(probs, job["device"], getattr(torch, job["dtype"]), tuple(job["tokens"]),
             cache=Path(job["cache"]) if job["cache"] else False, excluded=excluded,
             progress=lambda key, label: _append(progress, {"key": list(key), "label": label}),
             on_record=lambda rec: _append(Path(job["records"]), rec))
    except ContextLost as e:
        _append(progress, {"key": list(e.key), "label": e.label, "error": e.error})
        return LOST_EXIT
    return 0


if __name__ == "__main__":
    sys.exit(main())
