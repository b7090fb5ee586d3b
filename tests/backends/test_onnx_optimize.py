"""l4compile.onnx.optimize against onnxscript's optimizer (what torch.onnx.export(optimize=True) runs): the same
optimized graph and outputs on a real Llama 4 export, without the whole-graph walk per node that made onnxscript's
quadratic in the node count."""
from __future__ import annotations

import logging
from collections import Counter

import pytest
import torch

pytest.importorskip("onnx", reason="needs onnx (pip install 'l4compile[onnx]')")
pytest.importorskip("onnxruntime", reason="needs onnxruntime (pip install 'l4compile[onnx]')")
pytest.importorskip("onnxscript", reason="needs onnxscript (pip install 'l4compile[onnx]')")

import onnxruntime as ort  # noqa: E402
from onnxscript import ir, optimizer, rewriter  # noqa: E402

from l4compile.backends import onnxruntime as ort_backend  # noqa: E402
from l4compile.compiler import lower  # noqa: E402
from l4compile.config import CompileConfig  # noqa: E402
from l4compile.onnx import optimize as l4_optimize  # noqa: E402
from l4compile.progress import Progress  # noqa: E402
from tests.conftest import save_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> bytes:
    """A 2-layer, 4-expert checkpoint with its KV cache, exported unoptimized (serialized: each test takes a copy)."""
    ckpt = save_checkpoint(tmp_path_factory.mktemp("opt") / "ckpt", num_hidden_layers=2)
    config = CompileConfig(backend="onnxruntime", max_seq_len=32, max_batch_size=1)
    program = lower(str(ckpt), config, progress=Progress(enabled=False)).program
    model = ort_backend.onnx_program(program, optimize=False).model
    return ir.serde.serialize_model(model).SerializeToString()


def fresh(blob: bytes) -> ir.Model:
    import onnx

    return ir.serde.deserialize_model(onnx.load_from_string(blob))


def ops(model: ir.Model) -> Counter:
    return Counter(n.op_type for n in model.graph)


def run(model: ir.Model) -> list:
    """The model on ONNX Runtime: a 5-token prompt at position 0 into zero caches."""
    sess = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(0)
    feeds = {}
    for i in sess.get_inputs():
        if i.name == "input_ids":
            feeds[i.name] = torch.randint(0, 320, (1, 5), generator=g).numpy()
        elif i.name == "start_pos":
            feeds[i.name] = torch.zeros(1, dtype=torch.int64).numpy()
        else:                                                # k/v caches [batch, Hkv, L, D]; batch 1
            feeds[i.name] = torch.zeros([d if isinstance(d, int) else 1 for d in i.shape]).numpy()
    return sess.run(None, feeds)


class GraphWalks:
    """Counts iterations over a whole graph (``for node in graph``) while active."""

    def __init__(self, monkeypatch):
        self.n = 0
        orig = ir.Graph.__iter__

        def counted(graph):
            self.n += 1
            return orig(graph)
        monkeypatch.setattr(ir.Graph, "__iter__", counted)


def test_rules_are_onnxscripts_single_output_ones():
    rules = l4_optimize.rewrite_rules()
    default = rewriter._DEFAULT_REWRITE_RULES
    multi = [r for r in default if not r._target_pattern.has_single_output_node]      # onnxscript 0.7: SlicesSplit
    assert set(rules) == set(default) - set(multi) and len(rules) == len(default) - len(multi)
    assert all(r._target_pattern.has_single_output_node for r in rules)


def test_same_graph_and_outputs_as_onnxscripts_optimizer(exported, monkeypatch):
    """Same op counts, initializers and logits/caches as onnxscript's own optimizer, with a fixed number of graph
    walks where onnxscript's walks the graph once per node and rewrite round."""
    theirs, ours = fresh(exported), fresh(exported)
    nodes = len(list(theirs.graph))
    walks = GraphWalks(monkeypatch)
    optimizer.optimize_ir(theirs)
    walks_theirs, walks.n = walks.n, 0
    l4_optimize.optimize(ours)
    walks_ours = walks.n
    monkeypatch.undo()
    print(f"\n{nodes} nodes -> {len(list(ours.graph))}; graph walks: onnxscript {walks_theirs}, ours {walks_ours}")
    assert ops(ours) == ops(theirs) and len(list(ours.graph)) < nodes
    assert sorted(ours.graph.initializers) == sorted(theirs.graph.initializers)
    assert walks_ours < 64           # a fixed number of passes, against nodes x rounds walks for a multi-output rule
    for a, b in zip(run(ours), run(theirs), strict=True):
        assert a.shape == b.shape and abs(a - b).max() <= 1e-6


def test_onnxscript_without_default_rules_runs_its_optimizer(exported, monkeypatch, caplog):
    """An onnxscript that does not expose its rules as 0.7 does: its optimizer runs unchanged, with a warning."""
    want = ops(l4_optimize.optimize(fresh(exported)))
    monkeypatch.setattr(l4_optimize, "rewrite_rules", lambda: None)
    with caplog.at_level(logging.WARNING, logger="l4compile.onnx.optimize"):
        got = ops(l4_optimize.optimize(fresh(exported)))
    assert got == want
    assert "running its optimizer as is" in caplog.text


def test_benchmark_script_times_both_optimizers(tmp_path, capsys):
    """benchmarks/onnx_optimize.py: a row per layer count, both optimizers on the same graph (same ops), onnxscript's
    skipped above --upstream-max-nodes, exit 2 on bad input."""
    import json

    from tests.conftest import load_benchmark

    bench = load_benchmark("onnx_optimize")
    rows_file = tmp_path / "rows.json"
    assert bench.main(["--preset", "tiny", "--layers", "2", "--json", str(rows_file)]) == 0
    (two,) = json.loads(rows_file.read_text())
    assert two["layers"] == 2 and two["same_ops"] is True and two["ratio"] > 0 and two["nodes_optimized"] < two["nodes"]
    assert bench.main(["--preset", "tiny", "--layers", "1", "--upstream-max-nodes", "0", "--json",
                       str(rows_file)]) == 0
    (one,) = json.loads(rows_file.read_text())
    assert one["onnxscript_s"] is None and one["same_ops"] is None and one["ours_s"] >= 0
    assert one["nodes"] < two["nodes"]
    capsys.readouterr()
    assert bench.main(["--layers", "2,x"]) == 2 and "--layers takes positive integers" in capsys.readouterr().err
    assert bench.main(["--preset", "no-such-preset", "--layers", "1"]) == 2
    assert capsys.readouterr().err.startswith("error: ")
