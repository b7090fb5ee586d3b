"""benchmarks/bench_attention.py: the grouped-query attention step against K/V expanded per query head."""
from __future__ import annotations

import json

from tests.conftest import load_benchmark


def test_both_variants_agree_and_are_timed(tmp_path, capsys):
    out = tmp_path / "attention.json"
    rc = load_benchmark("bench_attention").main(["--contexts", "16,40", "--positions", "full,7,20", "--repeats", "2",
                                                 "--out", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())["rows"]
    cases = [(16, 15), (16, 7), (40, 39), (40, 7), (40, 20)]                    # 20 lies past a 16-slot cache
    assert [(r["context"], r["position"], r["variant"], r["mode"]) for r in rows] == [
        (c, p, v, m) for c, p in cases for v in ("expanded", "grouped") for m in ("eager", "inductor")]
    assert all(r["ms"] > 0 and r["max_abs_diff_vs_expanded_eager"] < 1e-5 for r in rows)
    assert all(r["speedup_vs_expanded"] == 1.0 for r in rows if r["variant"] == "expanded")
    assert rows[0]["read_bytes"] == 2 * 8 * 16 * 128 * 4                          # k and v, 8 kv heads, float32
    assert rows[4]["read_bytes"] == 2 * 8 * 8 * 128 * 4                           # position 7: 8 visible keys
    assert "| 40 | 20 | grouped | inductor |" in capsys.readouterr().out


def test_bad_arguments_are_one_error_line(capsys):
    assert load_benchmark("bench_attention").main(["--contexts", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "contexts" in err[0]


def test_positions_outside_every_context_are_refused(capsys):
    assert load_benchmark("bench_attention").main(["--contexts", "16", "--positions", "30", "--eager-only"]) == 2
    assert capsys.readouterr().err.strip() == "error: no --positions inside the --contexts"
