"""benchmarks/bench_decode_modes.py: loop vs the static-buffer step (CUDA graph replay on a GPU) of one engine."""
from __future__ import annotations

import json

from tests.conftest import load_benchmark


def _module():
    return load_benchmark("bench_decode_modes")


def test_measures_both_modes_on_one_engine(tiny_engine, tmp_path, capsys):
    out = tmp_path / "modes.json"
    rc = _module().main(["--engine", str(tiny_engine), "--batch-sizes", "1,2", "--prompt", "8", "--new", "6",
                         "--repeats", "2", "--out", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["mode"], r["batch"]) for r in rows] == [("loop", 1), ("static", 1), ("loop", 2), ("static", 2)]
    assert all(r["same_tokens_as_loop"] and len(r["samples"]) == 2 and r["decode_ms_per_token"] > 0 for r in rows)
    assert all(r["speedup_vs_loop"] == 1.0 for r in rows if r["mode"] == "loop")
    assert "| static | 2 |" in capsys.readouterr().out


def test_bad_arguments_are_one_error_line(tiny_engine, capsys):
    assert _module().main(["--engine", str(tiny_engine), "--new", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "--new" in err[0]
