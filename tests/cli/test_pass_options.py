"""--pass-option PASS.KEY=VALUE reaches the pass it names, through the real command line, on ONNX Runtime engines
(the quickest backend to build): full caches instead of ring buffers give the same tokens and logits, and an Int4
engine quantizes its lm_head in groups of 64 when asked."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx

from l4compile.bench.runner import lm_head_quantized
from tests.conftest import run_cli

PROMPT = ",".join(str(i) for i in range(3, 23))        # 20 tokens, + 40 new: crosses the tiny preset's chunk 16 3x


def _compile(out, *extra: str) -> dict:
    p = run_cli("compile", "tiny", "--backend", "onnxruntime", "--out", str(out), "--max-seq-len", "64", *extra)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads((out / "manifest.json").read_text())


def _run(engine, tmp_path) -> tuple[list[int], np.ndarray]:
    logits = tmp_path / f"{engine.name}-logits.npy"
    p = run_cli("run", str(engine), "--prompt-ids", PROMPT, "--max-new-tokens", "40", "--logits-out", str(logits))
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout.strip().splitlines()[-1])["generated_ids"], np.load(logits)


def test_full_caches_match_ring_buffers(tmp_path):
    rings = _compile(tmp_path / "rings")
    full = _compile(tmp_path / "full", "--pass-option", "kv_cache.ring_buffers=false")
    assert rings["kv_cache"]["ring_bytes"] > 0 and {x["slots"] for x in rings["kv_cache"]["layers"]} == {16, 64}
    assert {x["slots"] for x in full["kv_cache"]["layers"]} == {64} and not full["kv_cache"]["ring_bytes"]
    assert dict(full["compile_config"]["pass_options"]) == {"kv_cache": [["ring_buffers", False]]}
    ids_r, logits_r = _run(tmp_path / "rings", tmp_path)
    ids_f, logits_f = _run(tmp_path / "full", tmp_path)
    assert ids_f == ids_r and len(ids_f) == 40
    assert np.abs(logits_f - logits_r).max() / np.abs(logits_r).max() < 1e-5


def test_quantize_options_reach_the_engine(tmp_path):
    """Both quantize options at once (one Int4 compile): groups of 64 and the lm_head quantized; the pass-level
    test (tests/passes/test_quantize.py) covers each option alone."""
    m = _compile(tmp_path / "q", "--quant", "int4", "--pass-option", "quantize.group_size=64",
                 "--pass-option", "quantize.quantize_lm_head=true")
    stats = next(p["stats"] for p in m["passes"] if p["name"] == "quantize")
    layers = m["model_config"]["num_hidden_layers"]
    assert stats["scheme"]["group_size"] == 64 and stats["scheme"]["quantize_lm_head"] is True
    assert stats["linears"] == 4 * layers + 1                                 # q, k, v, o per layer + lm_head
    ops = Counter(m["backend_info"]["op_counts"])                             # + per MoE block: shared gate, up,
    per_moe = 3 + 2 * m["model_config"]["num_local_experts"]                  # down and each expert's gate_up, down
    # fuse_qkv: q/k/v are one MatMulNBits, so 2 a layer (qkv, o), + the lm_head's
    assert ops["com.microsoft::MatMulNBits"] == 2 * layers + stats["moe_blocks"] * per_moe + 1
    model = onnx.load(str(tmp_path / "q" / "model.onnx"), load_external_data=False)
    assert {a.i for n in model.graph.node if n.op_type == "MatMulNBits" for a in n.attribute
            if a.name == "block_size"} == {64}
    ids, logits = _run(tmp_path / "q", tmp_path)
    assert len(ids) == 40 and np.isfinite(logits).all()
    assert lm_head_quantized(m) is True                  # what `l4compile bench ENGINE`'s roofline counts it at
    off = {"passes": [{"name": "quantize", "stats": {"scheme": dict(stats["scheme"], quantize_lm_head=False)}}]}
    assert lm_head_quantized(off) is False and lm_head_quantized({"passes": []}) is False
