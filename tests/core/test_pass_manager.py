"""Pass registry and manager: ordering from declarations, user and entry-point passes, lint, verify, dump-ir."""
from __future__ import annotations

import re
import sys
import textwrap

import pytest
import torch

from l4compile import frontend
from l4compile.config import CompileConfig
from l4compile.errors import L4Error
from l4compile.passes import PassResult, order_passes, register_pass
from l4compile.passes._registry import _REGISTRY, PassSpec
from l4compile.pipeline import run_passes, select_passes
from l4compile.program import CausalLMHarness, trace


def spec(name, **kw) -> PassSpec:
    return PassSpec(name=name, fn=lambda gm, ctx: PassResult(gm), description="", **kw)


def test_order_comes_from_declarations_not_registration_order():
    specs = [spec("c", after=("b",)), spec("b", requires=("x",)), spec("a", guarantees=("x",)),
             spec("d", before=("a",))]
    assert [s.name for s in order_passes(specs)] == ["d", "a", "b", "c"]
    assert [s.name for s in order_passes(list(reversed(specs)))] == ["d", "a", "b", "c"]


def test_cycle_and_unmet_requirement_are_errors():
    with pytest.raises(L4Error, match="cycle"):
        order_passes([spec("a", after=("b",)), spec("b", after=("a",))])
    with pytest.raises(L4Error, match="requires 'moe_fused'"):
        order_passes([spec("q", requires=("moe_fused",))])


def test_options_must_be_frozen_dataclass():
    from dataclasses import dataclass

    @dataclass
    class Opts:
        x: int = 1

    with pytest.raises(TypeError, match="frozen"):
        register_pass("bad_opts", options=Opts)


@pytest.fixture
def program():
    lm = frontend.load("tiny").model
    prog = trace(lm, max_batch=2, max_seq=64)
    with torch.no_grad():
        ref = CausalLMHarness(lm)(*prog.example_inputs)
    return prog, ref


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    src = textwrap.dedent('''
        import torch
        from l4compile.passes import PassResult, register_pass

        def count_linears(gm, ctx):
            """Count aten.linear nodes (changes nothing)."""
            n = sum(1 for x in gm.graph.nodes if x.target == torch.ops.aten.linear.default)
            return PassResult(gm, changed=False, stats={"linears": n})

        @register_pass("scale_logits_test", after=("kv_cache",))
        def scale_logits(gm, ctx):
            """Multiply the logits by 1.01: a pass that drifts."""
            out = next(n for n in gm.graph.nodes if n.op == "output")
            val = out.args[0][0] if isinstance(out.args[0], (tuple, list)) else out.args[0]   # the logits
            with gm.graph.inserting_before(out):
                m = gm.graph.call_function(torch.ops.aten.mul.Tensor, (val, 1.01))
            out.replace_input_with(val, m)
            return PassResult(gm, stats={"scaled": 1})
    ''')
    (tmp_path / "l4_user_passes.py").write_text(src)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "l4_user_passes"
    sys.modules.pop("l4_user_passes", None)
    for k in ("count_linears", "scale_logits_test"):
        _REGISTRY.pop(k, None)


def test_user_pass_runs_last_with_stats(program, user_module):
    prog, ref = program
    cfg = CompileConfig(passes=(f"{user_module}:count_linears",))
    records = run_passes(prog, cfg, reference=ref)
    assert records[-1].name == "count_linears"
    # fuse_moe took the router and shared-expert linears, fuse_qkv made q/k/v one: 4 layers x (qkv, o) + lm_head
    assert [r.name for r in records] == ["fuse_moe", "lower_irope", "eliminate_dead_code", "kv_cache",
                                         "quantize", "fuse_qkv", "count_linears"]
    assert records[-1].stats["linears"] == 4 * 2 + 1
    # float32 rounding only (~1e-6 of the logits' range after 4 layers; torch 2.11 and 2.13 differ there); the
    # scale_logits_test pass below drifts 1e-2
    assert all(r.drift is not None and r.drift < 1e-5 for r in records)


def test_verify_names_the_pass_that_drifted(program, user_module):
    prog, ref = program
    cfg = CompileConfig(passes=(f"{user_module}:scale_logits",))
    with pytest.raises(L4Error, match="pass 'scale_logits_test' changed the model's output"):
        run_passes(prog, cfg, reference=ref)


def test_skip_pass_and_bad_user_pass_refs(user_module):
    names = [s.name for s in select_passes(skip=("eliminate_dead_code",))]
    assert "eliminate_dead_code" not in names
    for ref, needle in [("nomodule_xyz:f", "cannot import"), (f"{user_module}:nofunc", "no function"),
                        ("justaname", "MODULE:FUNC")]:
        with pytest.raises(L4Error, match=needle):
            select_passes(user=(ref,))


@pytest.mark.parametrize("kw", [{"passes": "mypasses:strip"}, {"skip_passes": "quantize"}])
def test_compile_refuses_a_bare_string_for_a_pass_tuple(kw, tmp_path):
    import l4compile

    with pytest.raises(L4Error, match=r"takes a tuple of strings, got the string .*; write \("):
        l4compile.compile("tiny", out=tmp_path / "e", **kw)
    assert not (tmp_path / "e").exists()


def test_dump_ir_writes_graph_before_and_after_each_pass(program, tmp_path):
    prog, _ = program
    records = run_passes(prog, CompileConfig(), dump_ir=tmp_path / "ir")
    files = sorted(p.name for p in (tmp_path / "ir").iterdir())
    assert files[0] == "00-traced.txt" and len(files) == len(records) + 1
    assert "aten.topk" in (tmp_path / "ir" / "00-traced.txt").read_text()


def test_lint_catches_dangling_weight(program):
    prog, _ = program
    from l4compile.pipeline import lint

    node = next(n for n in prog.gm.graph.nodes if n.op == "get_attr")
    node.target = "lm.no.such.weight"
    with pytest.raises(L4Error, match="bad_pass.*malformed.*lm.no.such.weight"):
        lint(prog.gm, "bad_pass")


def test_entry_point_passes_are_loaded(tmp_path, monkeypatch):
    pkg = tmp_path / "l4_plugin_mod.py"
    pkg.write_text(textwrap.dedent('''
        from l4compile.passes import PassResult, register_pass

        @register_pass("plugin_noop", after=("eliminate_dead_code",))
        def plugin_noop(gm, ctx):
            """A pass installed by another package."""
            return PassResult(gm, changed=False)
    '''))
    dist = tmp_path / "l4_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: l4-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[l4compile.passes]\nplugin_noop = l4_plugin_mod:plugin_noop\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        names = [s.name for s in select_passes()]
        assert names.index("plugin_noop") > names.index("eliminate_dead_code")
        assert _REGISTRY["plugin_noop"].description == "A pass installed by another package."
    finally:
        _REGISTRY.pop("plugin_noop", None)
        sys.modules.pop("l4_plugin_mod", None)


def test_passes_command_lists_every_pass(capsys):
    from l4compile.cli import main

    from l4compile.passes import registered_passes

    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    for name in ("eliminate_dead_code",):
        assert name in out
    for spec in registered_passes().values():   # its ordering, then at least two spaces, then its description
        assert re.search(rf" {re.escape(spec.ordering())} {{2,}}{re.escape(spec.description)}", out), spec.name
