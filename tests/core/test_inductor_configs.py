"""`compile --inductor-config KEY=VALUE` / `compile(inductor_configs=...)`: parsed, checked against this torch's
Inductor settings before anything is traced, and handed to AOTInductor (the package itself is checked in
tests/backends/test_inductor_parity.py)."""
from __future__ import annotations

import pytest

from l4compile import compiler, inductor_configs as settings
from l4compile.cli import main
from l4compile.errors import L4Error


def test_values_read_as_json_then_python_literal_then_string():
    assert settings.parse_cli(["max_autotune=true", "combo_kernels=True", "cpp.simdlen=0",
                               "aot_inductor.compile_wrapper_opt_level=O0", "cpp.cxx=['a', 'b']"]) == {
        "max_autotune": True, "combo_kernels": True, "cpp.simdlen": 0,
        "aot_inductor.compile_wrapper_opt_level": "O0", "cpp.cxx": ["a", "b"]}


@pytest.mark.parametrize("items, needle", [
    (["max_autotune"], "expected KEY=VALUE"),
    (["=1"], "expected KEY=VALUE"),
    (["cpp.simdlen=0", "cpp.simdlen=8"], "cpp.simdlen is given twice"),
])
def test_bad_cli_items(items, needle):
    with pytest.raises(L4Error, match=needle):
        settings.parse_cli(items)


def test_check_returns_sorted_pairs_and_nothing_for_none():
    assert settings.check(None, "onnxruntime") == () and settings.check({}, "inductor") == ()
    assert settings.check({"max_autotune": True, "cpp.simdlen": 0}, "inductor") == (
        ("cpp.simdlen", 0), ("max_autotune", True))
    assert settings.check({"cpp.min_chunk_size": 256}, "inductor") == (("cpp.min_chunk_size", 256),)
    # settings typed by their annotation: `int | None`, and a Literal takes its own values
    assert settings.check({"cpp.simdlen": None}, "inductor") == (("cpp.simdlen", None),)
    assert settings.check({"max_autotune_gemm_search_space": "EXHAUSTIVE"}, "inductor") == (
        ("max_autotune_gemm_search_space", "EXHAUSTIVE"),)


def test_an_integer_for_a_float_setting_is_handed_over_as_a_float():
    """torch.compile(options=...) (bench's torch-compile baseline) refuses an int for a float setting."""
    import torch
    import torch._inductor.config as inductor_config

    key = next(k for k, v in inductor_config.get_config_copy().items() if type(v) is float)
    with pytest.raises(RuntimeError, match="should be float"):
        torch.compile(lambda x: x, options={key: 3})
    ((k, v),) = settings.check({key: 3}, "inductor")
    assert k == key and type(v) is float and v == 3.0
    torch.compile(lambda x: x, options={k: v})
    assert settings.check({"cpp.simdlen": 8}, "inductor") == (("cpp.simdlen", 8),)     # an int setting stays int


def test_engine_contradiction_compares_with_the_manifest_or_the_default():
    """parity --engine / bench ENGINE: a setting the engine's manifest lacks had this torch's default."""
    recorded = [["cpp.simdlen", 0], ["cpp.cxx", [None, "g++"]]]
    agree = (("cpp.cxx", (None, "g++")), ("cpp.simdlen", 0), ("max_autotune", False))
    assert settings.engine_contradiction(agree, recorded) is None
    assert settings.engine_contradiction((), recorded) is None
    assert settings.engine_contradiction((("cpp.simdlen", 8),), recorded) == ("cpp.simdlen", 8, 0)
    assert settings.engine_contradiction((("max_autotune", True),), []) == ("max_autotune", True, False)
    assert settings.engine_contradiction((("cpp.simdlen", None),), None) is None      # its default is None


def test_every_setting_takes_its_own_default():
    """No false refusal: each Inductor setting of this torch (but l4compile's own) passes the check at its default."""
    import torch._inductor.config as inductor_config

    defaults = inductor_config.get_config_copy()
    keys = [k for k in defaults if not k.startswith(settings._OWNED_PREFIXES)]
    assert len(keys) > 400
    for key in keys:
        assert settings.check({key: defaults[key]}, "inductor") == ((key, defaults[key]),), key


@pytest.mark.parametrize("configs, backend, needles", [
    ({"max_autotune": True}, "onnxruntime", ("applies to --backend inductor only", "onnxruntime")),
    ({"simdlen": 0}, "inductor", ("simdlen: not an Inductor setting", "did you mean cpp.simdlen?")),
    ({"no_such_setting": 1}, "inductor", ("no_such_setting: not an Inductor setting",)),
    ({"max_autotune": "yes"}, "inductor", ("max_autotune must be true or false", "'yes'")),
    ({"cpp.min_chunk_size": True}, "inductor", ("cpp.min_chunk_size must be an integer",)),
    ({"cpp.simdlen": "abc"}, "inductor", ("cpp.simdlen must be an integer or null", "default is None", "'abc'")),
    ({"max_autotune_gemm_search_space": "exhaustive"}, "inductor",
     ("max_autotune_gemm_search_space must be one of 'DEFAULT', 'EXHAUSTIVE'", "got 'exhaustive'")),
    ({"aot_inductor.package_constants_in_so": True}, "inductor", ("l4compile sets it",)),
    ({"aot_inductor.output_path": "/tmp/x"}, "inductor", ("l4compile sets it",)),
    ({1: True}, "inductor", ("must map Inductor setting names",)),
])
def test_check_refuses_in_one_line(configs, backend, needles):
    with pytest.raises(L4Error) as e:
        settings.check(configs, backend)
    msg = str(e.value)
    assert all(n in msg for n in needles) and "\n" not in msg, msg


@pytest.mark.parametrize("argv, needle", [
    (["--inductor-config", "max_autotune"], "expected KEY=VALUE"),
    (["--inductor-config", "bogus.key=1"], "bogus.key: not an Inductor setting"),
    (["--inductor-config", "cpp.simdlen=0", "--backend", "onnxruntime"], "applies to --backend inductor only"),
])
def test_cli_refuses_before_tracing_and_writes_nothing(argv, needle, tmp_path, capsys):
    out = tmp_path / "e"
    assert main(["compile", "tiny", "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err and err.count("\n") == 1, err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_cli_hands_the_settings_to_compile(monkeypatch, tmp_path, capsys):
    seen = {}

    class Stop(Exception):
        pass

    def fake_build(model, **kw):
        seen.update(kw)
        raise Stop
    monkeypatch.setattr(compiler, "build", fake_build)       # what `l4compile compile` calls (it loads nothing)
    with pytest.raises(Stop):
        main(["compile", "tiny", "--out", str(tmp_path / "e"), "--inductor-config", "cpp.simdlen=0",
              "--inductor-config", "aot_inductor.compile_wrapper_opt_level=O0"])
    assert seen["inductor_configs"] == {"cpp.simdlen": 0, "aot_inductor.compile_wrapper_opt_level": "O0"}
