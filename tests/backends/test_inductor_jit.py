"""The jit runtime of Inductor engines (L4COMPILE_INDUCTOR_RUNNER=jit): program.pt2 + weights.safetensors compiled
in-process by torch.compile must give what the AOTInductor package gives, through the same Engine API."""
import json

import pytest
import torch

import l4compile
from l4compile.errors import L4Error
from tests.backends.parity_checks import rel_err


@pytest.fixture(scope="module")
def both(tiny_engine):
    """(aoti engine, jit engine) of the same directory."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("L4COMPILE_INDUCTOR_RUNNER", raising=False)
        aoti = l4compile.load_engine(tiny_engine)
        mp.setenv("L4COMPILE_INDUCTOR_RUNNER", "jit")
        jit = l4compile.load_engine(tiny_engine)
    return aoti, jit


def test_jit_runtime_matches_the_package(both):
    """One prompt shape and the decode step: the jit runtime compiles two graphs (~1 minute here)."""
    aoti, jit = both
    assert (aoti.runtime, jit.runtime) == ("aoti", "jit")
    prompt = torch.randint(0, aoti.vocab_size, (2, 9), generator=torch.Generator().manual_seed(5))
    want = aoti.prefill(prompt)
    assert want.shape == (2, 9, aoti.vocab_size)
    assert rel_err(jit.prefill(prompt), want) < 1e-5
    want = aoti.generate(prompt, max_new_tokens=8)
    assert jit.generate(prompt, max_new_tokens=8).tolist() == want.tolist()
    jit.decode_mode = "static"        # the steps a CUDA graph would capture: the caches are written in place
    assert jit.generate(prompt, max_new_tokens=8).tolist() == want.tolist()


def test_jit_runtime_compiles_a_prompt_length_once(both):
    """The prefill graph is dynamic in T from its first compile, as the package is: later prompt lengths reuse it
    (and the decode graph). Left to automatic dynamic, the first prompt length's graph would be static and the next
    length would compile again."""
    from torch._dynamo.utils import counters

    aoti, jit = both
    gen = torch.Generator().manual_seed(6)
    first = torch.randint(0, aoti.vocab_size, (2, 7), generator=gen)
    assert jit.generate(first, max_new_tokens=2).tolist() == aoti.generate(first, max_new_tokens=2).tolist()
    graphs = counters["stats"]["unique_graphs"]
    for shape in ((2, 12), (2, 3)):
        prompt = torch.randint(0, aoti.vocab_size, shape, generator=gen)
        assert rel_err(jit.prefill(prompt), aoti.prefill(prompt)) < 1e-5
        assert jit.generate(prompt, max_new_tokens=3).tolist() == aoti.generate(prompt, max_new_tokens=3).tolist()
    assert counters["stats"]["unique_graphs"] == graphs


def test_jit_weights_are_the_engine_file_tensors(both):
    """The compiled program reads weights.safetensors' tensors, loaded once; program.pt2 holds no weights."""
    _, jit = both
    meta = torch.export.load(jit.path / "program.pt2")
    tensors = {k: v for k, v in {**meta.state_dict, **meta.constants}.items() if isinstance(v, torch.Tensor)}
    assert tensors and all(v.device.type == "meta" for v in tensors.values())
    assert set(tensors) <= set(jit._runner.weights)


def test_bad_runtime_and_old_engine_are_one_line_errors(tiny_engine, monkeypatch, tmp_path):
    from backends.inductor import _load_jit

    monkeypatch.setenv("L4COMPILE_INDUCTOR_RUNNER", "tensorrt")
    with pytest.raises(L4Error, match=r"L4COMPILE_INDUCTOR_RUNNER='tensorrt' .*choose one of: aoti, jit"):
        l4compile.load_engine(tiny_engine)
    manifest = json.loads((tiny_engine / "manifest.json").read_text())
    del manifest["backend_info"]["program"]                      # an engine compiled before program.pt2 existed
    with pytest.raises(L4Error, match="has no program.pt2 .*recompile it, or load it with "
                                      "L4COMPILE_INDUCTOR_RUNNER=aoti"):
        _load_jit(tiny_engine, manifest, 0)

