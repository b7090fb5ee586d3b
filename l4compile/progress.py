"""Stage progress for long commands: names and times on stderr when it is a terminal, silent otherwise."""
from __future__ import annotations

import contextlib
import sys
import time
from typing import Iterator


class Progress:
    def __init__(self, enabled: bool | None = None, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.t0 = time.perf_counter()
        self.stages: dict[str, float] = {}

    def note(self, text: str) -> None:
        if self.enabled:
            print(f"[{time.perf_counter() - self.t0:7.1f}s] {text}", file=self.stream, flush=True)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.note(f"{name} ...")
        t = time.perf_counter()
        yield
        self.stages[name] = round(time.perf_counter() - t, 3)
        self.note(f"{name} done in {self.stages[name]:.1f}s")
