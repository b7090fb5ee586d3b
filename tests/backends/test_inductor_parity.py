"""Inductor engines against transformers eager (float32): logits rel < 1e-4 and identical greedy tokens."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import Llama4ForCausalLM

import l4compile
from l4compile.cli import main
from tests.backends.parity_checks import TOL, check_run_matches_eager, rel_err
from tests.conftest import DEFAULT_INDUCTOR_VARIANT, QUICK_INDUCTOR, VARIANTS

QUICK_VARIANT = "maverick-top2-odd"     # compiled with QUICK_INDUCTOR (scalar C++ kernels)

def test_cli_compile_reports_fusion_and_lowering(checkpoints, tmp_path, capsys):
    ckpt = checkpoints["maverick-top2-odd"]
    capsys.readouterr()
    # the summary comes from the pass pipeline, the same for every backend; ONNX Runtime builds quickest
    assert main(["compile", str(ckpt), "--backend", "onnxruntime", "--out", str(tmp_path / "e"),
                 "--max-seq-len", "64"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    cfg = Llama4ForCausalLM.config_class.from_pretrained(ckpt)
    assert summary["passes"]["fuse_moe"]["matches"] == len(cfg.moe_layers) == 2   # dense layers left alone
    assert summary["passes"]["lower_irope"]["matches"] == cfg.num_hidden_layers
    assert summary["engine_bytes"] > 0


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_run_matches_eager(variant, checkpoints, engines, tmp_path, capsys):
    """`l4compile run --logits-out` on a prompt crossing 5 chunks, then 32 greedy tokens through the cache."""
    check_run_matches_eager(engines[variant], checkpoints[variant], tmp_path, capsys)


@pytest.mark.slow   # an extra AOTI compile; keeps the default suite inside its 15-minute budget
def test_skip_fuse_moe_still_matches(checkpoints, tmp_path):
    """The reference (every expert for every token) path stays available for comparison."""
    from l4compile import frontend

    ckpt = checkpoints["maverick-top2-odd"]
    eng = l4compile.compile(str(ckpt), out=tmp_path / "e", max_seq_len=64, skip_passes=("fuse_moe",))
    assert "fuse_moe" not in [p["name"] for p in eng.manifest["passes"]]
    lm = frontend.load(str(ckpt)).model
    ids = torch.randint(0, eng.vocab_size, (2, 37), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert rel_err(eng.prefill(ids), lm(ids).logits) < TOL


def test_engine_serves_every_length_and_batch(checkpoints, engines):
    """One engine, no recompiles: lengths 1..max and batches 1..max all match eager."""
    eng = l4compile.load_engine(engines[DEFAULT_INDUCTOR_VARIANT])
    lm = Llama4ForCausalLM.from_pretrained(checkpoints[DEFAULT_INDUCTOR_VARIANT]).eval()
    g = torch.Generator().manual_seed(2)
    for b, s in [(1, 1), (2, 1), (1, 17), (2, 33), (1, eng.max_seq_len)]:
        ids = torch.randint(0, eng.vocab_size, (b, s), generator=g)
        with torch.no_grad():
            assert rel_err(eng.prefill(ids), lm(ids).logits) < TOL, (b, s)


def _package_cpu_isa(engine_dir) -> str:
    """The vector ISA AOTInductor generated the package's C++ kernels for (its wrapper_metadata.json)."""
    import zipfile

    with zipfile.ZipFile(engine_dir / "model.pt2") as z:
        name = next(n for n in z.namelist() if n.endswith("wrapper_metadata.json"))
        return json.loads(z.read(name))["AOTI_CPU_ISA"]


def test_inductor_configs_reach_the_package(engines):
    """The QUICK_INDUCTOR engines (cpp.simdlen=0: scalar kernels) record those settings in their manifests; the
    engine compiled with Inductor's defaults is vectorized for this CPU."""
    for name, path in engines.items():
        manifest = json.loads((path / "manifest.json").read_text())
        configs = dict(map(tuple, manifest["compile_config"]["inductor_configs"]))
        if name == DEFAULT_INDUCTOR_VARIANT:
            assert configs == {} and _package_cpu_isa(path) != "INVALID_VEC_ISA"
        else:
            assert configs == QUICK_INDUCTOR and _package_cpu_isa(path) == "INVALID_VEC_ISA"


def test_scalar_package_loads_without_an_isa_warning(engines):
    """torch warns at load that a scalar package's ISA is not this CPU's; scalar code runs anywhere, so the engine
    drops that one warning (and only that one)."""
    import logging

    from backends.inductor import _PACKAGE_LOGGER, ScalarPackageIsaFilter

    def record(*args):
        return logging.LogRecord(_PACKAGE_LOGGER, logging.WARNING, __file__, 1, "mismatch for %s: %s vs %s", args, None)
    f = ScalarPackageIsaFilter()
    assert not f.filter(record("AOTI_CPU_ISA", "AVX512", "INVALID_VEC_ISA"))
    assert f.filter(record("AOTI_CPU_ISA", "AVX2", "AVX512")) and f.filter(record("AOTI_DEVICE_KEY", "cpu", "cuda"))

    seen = []

    class Keep(logging.Handler):
        def emit(self, r):
            seen.append(r.getMessage())
    logger, handler = logging.getLogger(_PACKAGE_LOGGER), Keep(logging.WARNING)
    logger.addHandler(handler)
    try:
        l4compile.load_engine(engines[QUICK_VARIANT])
    finally:
        logger.removeHandler(handler)
    assert not [m for m in seen if "AOTI_CPU_ISA" in m], seen


def test_parity_command(checkpoints, engines, tmp_path, capsys):
    report = tmp_path / "parity.json"
    rc = main(["parity", str(checkpoints[QUICK_VARIANT]), "--engine", str(engines[QUICK_VARIANT]), "--steps", "8",
               "--json", str(report)])
    out = capsys.readouterr().out
    assert rc == 0, out
    d = json.loads(report.read_text())
    assert d["status"] == "pass" and d["max_rel_error"] < TOL and d["token_agreement"] == 1.0
    assert len(d["prompts"]) == 3 and "pass" in out


def test_multimodal_checkpoint_uses_its_text_model(tmp_path):
    """A `llama4` (Llama4ForConditionalGeneration) checkpoint loads as its text model with the same logits."""
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    from l4compile import frontend
    from tests.conftest import BASE

    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                  vision_output_dim=64, projector_input_dim=64, projector_output_dim=64, image_size=56, patch_size=14)
    torch.manual_seed(0)
    mm = Llama4ForConditionalGeneration(Llama4Config(text_config=dict(BASE), vision_config=vision)).eval()
    mm.save_pretrained(tmp_path / "mm")
    lm = frontend.load(str(tmp_path / "mm")).model
    ids = torch.randint(0, BASE["vocab_size"], (1, 20))
    with torch.no_grad():
        assert rel_err(lm(ids).logits, mm.language_model(input_ids=ids).logits) < 1e-6
