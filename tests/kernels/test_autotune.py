"""``compile --tune-kernels``: the Int4 problems of a graph, their candidates checked and timed, the table that
engines then launch (``tuned_blocks``), its cache, and the refusals off a GPU. The timing itself needs a GPU; here
the kernels run under the CPU interpreter and a scripted timer stands in for ``timing.graph_timer``."""
# N out features, K in features, G group, E experts, H hidden, I expert width
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from backends.qkv_rope_fused import rope_qkv_match
from l4compile.errors import L4Error
from l4compile.kernels import autotune, tuned_blocks
from l4compile.kernels.layout import Int4Blocks, int4_blocks, moe_int4_blocks
from l4compile.kernels.tuned_blocks import int4_key, moe_key
from l4compile.ops.quant import _linear_int4_impl, _moe_q_impl
from l4compile.quant import quantize_int4

from .conftest import TOL, rel_err, require_interpreter

KEY = int4_key(48, 256, 128, torch.bfloat16)          # l4::int4_mm on [48, 256/2] packed, bf16 scales


def scripted(times_ms):
    """A timer that returns ``times_ms`` in turn (one per timed candidate) and counts its calls."""
    it = iter(times_ms)

    def timer(fn):
        timer.calls += 1
        return next(it)
    timer.calls = 0
    return timer


def test_problems_of_a_lowered_int4_program():
    """Every distinct Int4 GEMM and Int4 MoE of the graph once, keyed by shape, group and scale dtype, with the
    number of nodes that run it (2 layers: each twice); the router, a bf16 linear, is not one."""
    from l4compile.compiler import lower
    from l4compile.config import CompileConfig
    from l4compile.progress import Progress

    low = lower("tiny", CompileConfig(quant="int4", dtype="bfloat16", layers=2, text_only=True),
                progress=Progress(enabled=False))
    cfg = low.program.model_config
    hd = cfg.hidden_size // cfg.num_attention_heads if not getattr(cfg, "head_dim", None) else cfg.head_dim
    h, i, e = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts
    qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * hd
    found = {p.key: p for p in autotune.problems(low.program.gm)}
    assert set(found) == {int4_key(qkv, h, h, torch.bfloat16), int4_key(h, cfg.num_attention_heads * hd, h,
                                                                        torch.bfloat16),
                          moe_key(e, h, i, h, i, torch.bfloat16)}
    assert all(p.count == 2 for p in found.values())
    assert found[moe_key(e, h, i, h, i, torch.bfloat16)].top_k == 1


def test_rope_qkv_problems_are_marked_and_timed_as_engines_run_them():
    """With ``rope_qkv`` (a CUDA engine that transforms k in its qkv GEMMs), the qkv problem of tiny's RoPE layers
    carries (head_dim, the keys' columns, qk_norm); o_proj and the MoE do not. Its candidates are one per launch
    the widening makes (at D 16 layout's BN 64 narrows to 32, which the BN 32 candidate is already: timed once),
    each checked against the plain GEMM followed by the aten k transform, then timed; the record and its summary
    say so."""
    require_interpreter()
    from l4compile.compiler import lower
    from l4compile.config import CompileConfig
    from l4compile.progress import Progress

    low = lower("tiny", CompileConfig(quant="int4", dtype="bfloat16", layers=2, text_only=True),
                progress=Progress(enabled=False))
    plain = autotune.problems(low.program.gm)
    marked = autotune.problems(low.program.gm, rope_qkv=rope_qkv_match)
    assert all(p.rope is None for p in plain)
    (qkv,) = [p for p in marked if p.rope is not None]
    assert qkv.rope == (16, 0, 96, True) and qkv.count == qkv.rope_count == 2      # q and k: columns 0 .. 95
    assert qkv.key == int4_key(128, 64, 64, torch.bfloat16)
    assert [p.key for p in marked] == [p.key for p in plain]
    # Scout's qkv: BN 64 split 2 and BN 32 unsplit are both BN 128 split 4, timed once
    scout = autotune.Problem(int4_key(7168, 5120, 128, torch.bfloat16), rope=(128, 0, 6144, True))
    widened = autotune.candidates(scout, torch.float32)
    assert len(widened) == len(autotune.int4_candidates(scout.key, torch.float32)) - 1
    assert Int4Blocks(16, 32, 128, True) not in widened
    cands = autotune.candidates(qkv, torch.float32)
    assert len(cands) == len(autotune.int4_candidates(qkv.key, torch.float32)) - 1
    assert Int4Blocks(16, 32, 64, True) not in cands
    res = autotune.tune([qkv], "cpu", torch.float32, timer=scripted([3.0, 1.0, 2.0, 2.0, 2.0]), cache=False)
    (rec,) = res["problems"]
    assert rec["rope"] == [16, 0, 96, True] and rec["rope_count"] == 2 and rec["label"] == "BN64 BK64 SK2"
    assert all(c["error"] is None and c["rel_err"] < 1e-3 for c in rec["candidates"]), rec["candidates"]
    assert autotune.summary(rec).startswith("int4_mm 128x64 G64 (rope): ")


def test_a_qkv_shape_that_nope_layers_share_is_timed_in_both_forms(monkeypatch):
    """tiny's 4 layers: 3 RoPE and 1 NoPE qkv of one shape. Each candidate is timed as int4_mm_rope and as the plain
    GEMM, weighted 3 : 1 (no candidate is dropped as a duplicate launch: the plain form tells them apart), and the
    count of rope nodes reaches the tuning process."""
    require_interpreter()
    from l4compile.compiler import lower
    from l4compile.config import CompileConfig
    from l4compile.progress import Progress

    low = lower("tiny", CompileConfig(quant="int4", dtype="bfloat16", text_only=True), progress=Progress(enabled=False))
    (qkv,) = [p for p in autotune.problems(low.program.gm, rope_qkv=rope_qkv_match) if p.rope is not None]
    assert (qkv.count, qkv.rope_count) == (4, 3)
    assert autotune.candidates(qkv, torch.float32) == autotune.int4_candidates(qkv.key, torch.float32)
    static = autotune.int4_candidates(qkv.key, torch.float32)[0]
    monkeypatch.setattr(autotune, "int4_candidates", lambda key, dtype: [static, dataclasses.replace(static,
                                                                                                     split_k=2)])
    timer = scripted([4.0, 1.0, 2.0, 3.0])             # rope form: static, SK2; then the plain GEMM: static, SK2
    (rec,) = autotune.tune([qkv], "cpu", torch.float32, timer=timer, cache=False)["problems"]
    assert timer.calls == 4 and rec["rope_count"] == 3
    assert [c["us"] for c in rec["candidates"]] == [3500.0, 1500.0]            # 0.75 rope + 0.25 plain
    assert rec["label"] == "BN64 BK64 SK2" and rec["static_us"] == 3500.0


def test_candidates_start_with_layouts_choice_and_are_distinct():
    cands = autotune.int4_candidates(KEY, torch.bfloat16)
    assert cands[0] == int4_blocks(48, 256, 128) and len(set(cands)) == len(cands) >= 5
    assert any(c.split_k == 4 for c in cands) and all(c.block_m == 16 for c in cands)
    moe = autotune.moe_candidates(moe_key(4, 64, 128, 64, 128, torch.bfloat16), torch.bfloat16)
    assert moe[0] == moe_int4_blocks(64, 128, 64, 128) and len(set(moe)) == len(moe) >= 5
    assert all(gu.block_m == dn.block_m for gu, dn in moe)      # one tile map
    # odd groups gather their scales per element: nothing to choose from
    assert autotune.int4_candidates(int4_key(16, 96, 12, torch.float32), torch.float32) == [int4_blocks(16, 96, 12)]


def test_tune_picks_the_fastest_correct_candidate(monkeypatch):
    """Each candidate is checked against the reference, then timed; the fastest wins; one that cannot run (the
    bf16x2 PTX unpack under the interpreter) is recorded with its error and never timed."""
    require_interpreter()
    static = int4_blocks(48, 256, 128)
    cands = [static, dataclasses.replace(static, split_k=2), dataclasses.replace(static, block_n=16),
             dataclasses.replace(static, bf16x2=True)]
    monkeypatch.setattr(autotune, "int4_candidates", lambda key, dtype: cands)
    timer = scripted([2.0, 1.0, 1.5])
    res = autotune.tune([autotune.Problem(KEY, count=3)], "cpu", torch.float32, timer=timer, cache=False)
    (rec,) = res["problems"]
    assert timer.calls == 3
    assert rec["blocks"] == tuned_blocks.choice_to_json(cands[1]) and rec["label"] == "BN32 BK128 SK2"
    assert (rec["us"], rec["static_us"], rec["count"], rec["tokens"]) == (1000.0, 2000.0, 3, [1])
    assert [c["us"] for c in rec["candidates"]] == [2000.0, 1000.0, 1500.0, None]
    assert "bf16x2" in rec["candidates"][3]["error"] and all(c["error"] is None for c in rec["candidates"][:3])
    assert all(c["rel_err"] < 1e-3 for c in rec["candidates"][:3])
    assert tuned_blocks.table_of(res) == {KEY: cands[1]}
    assert autotune.summary(rec) == "int4_mm 48x256 G128: BN32 BK128 SK2, 1000.0 us at 1 tokens (2.00x layout's)"


def test_a_gain_within_the_noise_keeps_layouts_choice(monkeypatch):
    require_interpreter()
    static = int4_blocks(48, 256, 128)
    monkeypatch.setattr(autotune, "int4_candidates", lambda key, dtype: [static, dataclasses.replace(static,
                                                                                                     split_k=2)])
    res = autotune.tune([autotune.Problem(KEY)], "cpu", torch.float32, timer=scripted([1.0, 0.99]), cache=False)
    assert res["problems"][0]["blocks"] == tuned_blocks.choice_to_json(static)


def test_tune_moe_over_two_token_counts(monkeypatch):
    """The MoE is timed whole (route + gate_up + down), candidates as (gate_up, down) pairs, summed over the token
    counts asked for."""
    require_interpreter()
    key = moe_key(4, 64, 128, 64, 128, torch.bfloat16)
    gu, dn = moe_int4_blocks(64, 128, 64, 128)
    cands = [(gu, dn), (gu, dataclasses.replace(dn, split_k=2))]
    monkeypatch.setattr(autotune, "moe_candidates", lambda key, dtype: cands)
    timer = scripted([3.0, 1.0, 3.0, 1.0])
    res = autotune.tune([autotune.Problem(key)], "cpu", torch.float32, tokens=(1, 3), timer=timer, cache=False)
    (rec,) = res["problems"]
    assert timer.calls == 4 and rec["us"] == 2000.0 and rec["static_us"] == 6000.0
    assert tuned_blocks.table_of(res) == {key: cands[1]}


def test_tune_results_are_cached_per_problem(tmp_path, monkeypatch):
    require_interpreter()
    static = int4_blocks(48, 256, 128)
    monkeypatch.setattr(autotune, "int4_candidates", lambda key, dtype: [static, dataclasses.replace(static,
                                                                                                     split_k=2)])
    cache = tmp_path / "tuning.json"
    first = autotune.tune([autotune.Problem(KEY)], "cpu", torch.float32, timer=scripted([2.0, 1.0]), cache=cache)
    never = scripted([])                                  # a second tune must not time anything
    again = autotune.tune([autotune.Problem(KEY, count=5)], "cpu", torch.float32, timer=never, cache=cache)
    assert never.calls == 0 and again["problems"][0]["cached"] and not first["problems"][0]["cached"]
    assert again["problems"][0]["blocks"] == first["problems"][0]["blocks"] and again["problems"][0]["count"] == 5
    # another token count (or candidate list, GPU, versions) is another entry
    autotune.tune([autotune.Problem(KEY)], "cpu", torch.float32, tokens=(2,), timer=scripted([2.0, 1.0]), cache=cache)
    assert len(json.loads(cache.read_text())) == 2
    cache.write_text("not json")                          # unreadable: tuned again, and rewritten
    autotune.tune([autotune.Problem(KEY)], "cpu", torch.float32, timer=scripted([2.0, 1.0]), cache=cache)
    assert len(json.loads(cache.read_text())) == 1


def test_the_active_table_decides_what_the_ops_launch():
    """Inside ``tuned_blocks.use`` the Int4 ops launch the table's blocks for their problem (a split-K GEMM is then
    chained in CUDA engines: ``int4_mm_splits``), outside it layout's; results stay the reference's."""
    require_interpreter()
    from l4compile.kernels import ops
    from l4compile.kernels.dispatch import int4_mm_splits

    g = torch.Generator().manual_seed(0)
    wp, ws = quantize_int4(torch.randn(48, 256, generator=g), 128)
    x = torch.randn(2, 256, generator=g)
    split = dataclasses.replace(int4_blocks(48, 256, 128), split_k=2, block_n=16)
    with tuned_blocks.use({int4_key(48, 256, 128, ws.dtype): split}):
        assert ops.default_int4_blocks(wp, ws) == split and int4_mm_splits(wp, ws)
        out = torch.ops.l4.int4_mm(x, wp, ws)
        with tuned_blocks.use({int4_key(48, 256, 128, torch.float16): int4_blocks(48, 256, 128)}):
            assert ops.default_int4_blocks(wp, ws) == split          # another dtype's entry: not this problem
    assert ops.default_int4_blocks(wp, ws) == int4_blocks(48, 256, 128) and not int4_mm_splits(wp, ws)
    assert rel_err(out, _linear_int4_impl(x, wp, ws)) < TOL[torch.float32]

    e, h, i = 4, 64, 128
    w = [t for shape in ((e, 2 * i, h), (e, h, i), (i, h), (i, h), (h, i))
         for t in quantize_int4(torch.randn(*shape, generator=g) * 0.1, 128)]
    router = torch.randn(e, h, generator=g)
    xm = torch.randn(3, h, generator=g)
    gu, dn = moe_int4_blocks(h, i, h, i)
    pair = (dataclasses.replace(gu, split_k=2), dataclasses.replace(dn, split_k=2))
    with tuned_blocks.use({moe_key(e, h, i, h, i, w[3].dtype): pair}):
        assert ops.default_moe_int4_blocks(w[2], w[1], w[3]) == pair
        out = torch.ops.l4.moe_q_fused(xm, router, *w, 1)
    assert ops.default_moe_int4_blocks(w[2], w[1], w[3]) == (gu, dn)
    assert rel_err(out, _moe_q_impl(xm, router, *w, 1)) < TOL[torch.float32]


def test_table_round_trips_through_the_manifest_record():
    a = Int4Blocks(16, 32, 128, True, 4, False, None, 8)
    pair = (Int4Blocks(16, 64, 128, True), Int4Blocks(16, 64, 128, True, 2))
    mkey = moe_key(16, 5120, 8192, 128, 128, torch.bfloat16)
    record = {"problems": [{"key": list(KEY), "blocks": tuned_blocks.choice_to_json(a)},
                           {"key": list(mkey), "blocks": tuned_blocks.choice_to_json(pair)},
                           {"key": list(int4_key(8, 8, 8, torch.bfloat16)), "blocks": None}]}
    assert tuned_blocks.table_of(json.loads(json.dumps(record))) == {KEY: a, mkey: pair}
    assert tuned_blocks.table_of(None) == {}
    for bad in ({"problems": [{"key": list(KEY), "blocks": {"block_n": 32}}]},
                {"problems": [{"key": list(mkey), "blocks": tuned_blocks.choice_to_json(a)}]},
                {"problems": [{"key": ["conv", 1], "blocks": {}}]}):
        with pytest.raises(ValueError):
            tuned_blocks.table_of(bad)


def test_jit_runtime_calls_with_the_engines_table():
    """The jit runtime traces the kernel ops' bodies when it is first called: each call runs inside the engine's
    table, as its AOTInductor package was built; a manifest whose kernel_blocks are not a record is refused."""
    from backends.inductor import _with_kernel_blocks

    a = Int4Blocks(16, 32, 128, True, 4)
    seen = []
    fn = _with_kernel_blocks(lambda *xs: seen.append(tuned_blocks.lookup(KEY)) or len(xs),
                             {"kernel_blocks": {"problems": [{"key": list(KEY),
                                                              "blocks": tuned_blocks.choice_to_json(a)}]}})
    assert fn(1, 2) == 2 and seen == [a] and tuned_blocks.lookup(KEY) is None

    def plain(*xs):
        return None
    assert _with_kernel_blocks(plain, {"kernel_blocks": None}) is plain
    with pytest.raises(L4Error, match="kernel_blocks"):
        _with_kernel_blocks(plain, {"kernel_blocks": {"problems": [{"key": list(KEY), "blocks": 3}]}})


@pytest.mark.parametrize("argv", [
    ["compile", "tiny", "--quant", "int4", "--tune-kernels"],
    ["compile", "tiny", "--quant", "int4", "--device", "cuda", "--backend", "onnxruntime", "--tune-kernels"],
    ["bench", "tiny", "--backends", "inductor", "--quant", "int4", "--tune-kernels"],
])
def test_cli_refuses_tune_kernels_without_a_cuda_inductor_engine(argv, capsys, tmp_path):
    from l4compile.cli import main

    assert main([*argv, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --tune-kernels") and "--device cuda" in err and err.count("\n") == 1
    assert not (tmp_path / "x").exists()


def test_config_hash_unchanged_without_tune_kernels():
    """Engines and reports built before the option existed keep their config hashes (these two were computed by
    the CompileConfig of 9cf20f3, before it); with the option on, the hash changes."""
    from l4compile.config import CompileConfig

    assert CompileConfig().stable_hash() == "ba995ba1a482eea5"
    cuda = dict(quant="int4", dtype="bfloat16", device="cuda")
    assert CompileConfig(**cuda).stable_hash() == "71aff7d1c46321af"
    assert CompileConfig(**cuda, tune_kernels=True).stable_hash() != "71aff7d1c46321af"
    with pytest.raises(L4Error, match="--tune-kernels"):
        CompileConfig(tune_kernels=True)
