"""benchmarks/bench_attention.py: the grouped-query attention step against K/V expanded per query head."""
from __future__ import annotations

import json

from tests.conftest import load_benchmark


def test_both_variants_agree_and_are_timed(tmp_path, capsys):
    out = tmp_path / "attention.json"
    rc = load_benchmark("bench_attention").main(["--contexts", "16,40", "--repeats", "2", "--out", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["context"], r["variant"], r["mode"]) for r in rows] == [
        (c, v, m) for c in (16, 40) for v in ("expanded", "grouped") for m in ("eager", "inductor")]
    assert all(r["ms"] > 0 and r["max_abs_diff_vs_expanded_eager"] < 1e-5 for r in rows)
    assert all(r["speedup_vs_expanded"] == 1.0 for r in rows if r["variant"] == "expanded")
    assert rows[0]["cache_bytes"] == 2 * 8 * 16 * 128 * 4                         # k and v, 8 kv heads, float32
    assert "| 40 | grouped | inductor |" in capsys.readouterr().out


def test_bad_arguments_are_one_error_line(capsys):
    assert load_benchmark("bench_attention").main(["--contexts", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "contexts" in err[0]
