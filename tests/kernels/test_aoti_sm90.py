"""The AOTInductor engine ``--device cuda`` builds, generated here for an H100 without a GPU
(benchmarks/aoti_sm90.py): every l4 kernel compiles and is launched from the C++ wrapper, nothing runs through the
proxy executor, and each KV cache is read by its attention kernel before it is written in place, never copied. And
what the jit runtime compiles for CUDA instead (benchmarks/jit_sm90.py), where torch is a CUDA build."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "aoti_sm90.py"


def _tool():
    spec = importlib.util.spec_from_file_location("aoti_sm90", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)           # importing runs nothing (no torch, no environment changes)
    return mod


def _generate(tmp_path, quant: str, *extra: str, preset: str = "tiny") -> dict:
    """The tool's report for ``preset`` (tiny) at ``quant`` (bf16, 256 cache slots), the wrapper kept in tmp_path."""
    from l4compile.kernels import why_unavailable

    if why_unavailable():
        pytest.skip(why_unavailable())
    import torch
    import triton

    if torch.cuda.is_available():
        pytest.skip("a GPU host compiles real CUDA engines (tests/kernels/test_dispatch.py)")
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").is_file():
        pytest.skip("this triton has no NVIDIA backend binaries (ptxas)")
    out = tmp_path / "aoti.json"
    p = subprocess.run([sys.executable, str(SCRIPT), "--preset", preset, "--quant", quant, "--max-seq-len", "256",
                        "--json", str(out), "--out", str(tmp_path), *extra], capture_output=True, text=True, timeout=900,
                       cwd=ROOT, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return json.loads(out.read_text())


def test_tiny_int4_cuda_engine_generates_and_passes_its_checks(tmp_path):
    r = _generate(tmp_path, "int4")
    assert r["problems"] == {"kernels": [], "opaque": [], "caches": [], "program": []}
    assert 0 < r["program_bytes"] < 4 * 2**20                               # program.pt2: the graph, no weights
    assert r["caches"] == 8                                                 # 4 layers x (k, v)
    launches = r["launches"]
    assert launches["attention_partial_kernel"] == launches["attention_combine_kernel"] == 4
    assert launches["moe_route_kernel"] == launches["moe_int4_gate_up_kernel"] == launches["moe_int4_down_kernel"] == 4
    assert launches["moe_norm_kernel"] == r["graph_ops"]["l4.moe_q_fused_norm.default"] == 4
    # Inductor's own: 2: the first layer's input norm (with the embedding) and the zeroed counters that head the
    # step's chain (l4::attention_fused_chained). The attention kernel transforms q and writes the caches, each RoPE
    # layer's qkv GEMM transforms k (l4::int4_mm_rope; 3 launches of k's RoPE + qk-norm before),
    # add_rms_norm_router does the post-attention norm, and each MoE op the combine, the residual add after it and
    # the next norm (l4::moe_q_fused_norm; the last layer's: the final norm) (28 before the four: + q's RoPE or
    # temperature, a k and a v cache write and both norms a layer)
    assert sum(n for k, n in launches.items() if k.startswith("triton_")) <= 1 + 1
    assert r["graph_ops"]["l4.int4_mm_rope.default"] == 3                # the RoPE layers' qkv
    assert r["graph_ops"]["l4.attention_fused_chained.default"] == 4
    # 38 launch sites; a decode step skips the 4 route launches (the GEMMs map one token), the 4 moe_norm launches
    # (the down launches finish each token) and the global layer's combine (its splits merged in the partial kernel);
    # the 3 chunked layers (16 slots: one split) keep theirs, which writes the caches. At 2048 tokens the route and
    # moe_norm launches run and the global layer still splits (64 row blocks x 2)
    assert r["kernels_launched"] == 38 and r["launched_at"] == {"B=1 T=1": 29, "B=1 T=2048": 37}
    assert not [k for k in launches if "index_copy" in k or "index_put" in k]
    # the lm_head alone (cuBLAS): each layer's router is in its add_rms_norm_router launch, which also adds the
    # residual and norms the MoE's input (5 mm and 4 more Inductor norm kernels before)
    assert r["extern_calls"] == {"mm_out": 1}
    assert launches["add_rms_norm_router_kernel"] == 4
    assert launches["int4_mm_kernel"] == 8                                  # qkv (fuse_qkv) and o of 4 layers
    # chunked layers (16 slots < one 64-key block): 1 split; the global layer (256 slots): up to 4, from the rows
    one, expr = sorted(r["attention_split_grids"], key=len)
    assert one == "1L" and expr.startswith("std::max(static_cast<int64_t>(1L), static_cast<int64_t>(std::min(") \
        and "132L" in expr
    assert "call_attention_partial_kernel" in (tmp_path / "model.wrapper.cpp").read_text()
    # torch asks which arguments each traced kernel call writes (its TTIR, ~0.1 s an answer) in each of the compile's
    # traces (4 under torch 2.13): 28 launches x 4 here (9 kernel signatures), 1344 for full Scout; access_memo
    # answers all but the first ask of each signature
    memo = r["kernel_access_analyses"]
    assert memo["misses"] <= 12 and memo["hits"] >= 2 * 28, memo


@pytest.mark.slow
def test_split_int4_gemms_take_no_counter_fills(tmp_path):
    """bench-scout (Scout's widths, 2 layers) with every Int4 GEMM splitting K 4 ways: the qkv and o_proj launches
    (l4::int4_mm_chained) hand each other their zeroed counters, so the step has one counter fill in all, not one a
    GEMM (the unchained engine had 2 more Inductor kernels a layer), and no copy of a counter block (~60 s)."""
    r = _generate(tmp_path, "int4", "--int4-split-k", "4", "--layers", "2", preset="bench-scout")
    assert r["problems"] == {"kernels": [], "opaque": [], "caches": [], "program": []}
    ops = r["graph_ops"]                          # o_proj, and the qkv that transforms k (both layers are RoPE)
    assert ops["l4.int4_mm_chained.default"] == ops["l4.int4_mm_rope_chained.default"] == 2
    assert r["launches"]["int4_mm_kernel"] == 2 * 4          # each GEMM: its decode and its prefill blocks' launch
    # unsplit: 1 (the embedding's norm; k's RoPE + qk-norm is in the qkv GEMM, the post-attention norm in
    # add_rms_norm_router, the MoE's combine + residual + next norm in the MoE's launches), + the one fill; with a
    # fill a GEMM (and the MoE norms and k's transform as Inductor kernels) it was 9
    assert sum(n for k, n in r["launches"].items() if k.startswith("triton_")) == 1 + 1
    assert not [k for k in r["launches"] if "clone" in k or "fused_copy" in k]     # (_to_copy: a dtype cast)


@pytest.mark.slow
def test_attention_merge_can_be_turned_off(tmp_path, monkeypatch):
    """L4COMPILE_ATTENTION_MERGE=0 (gpu_session.sh attnmerge's baseline) builds the engine whose attention merges its
    key splits in the combine launch: l4::attention_fused_inplace, no counter chain, and a decode step that runs
    every combine launch. In tiny that costs nothing at decode (29 launches with work either way): only its global
    layer splits its keys (its chunked layers' 16-slot rings have one split, and their combine writes the caches),
    and the chain's fill is one launch more (38 -> 37 launch sites without it) (~45 s)."""
    monkeypatch.setenv("L4COMPILE_ATTENTION_MERGE", "0")
    r = _generate(tmp_path, "int4")
    assert r["problems"] == {"kernels": [], "opaque": [], "caches": [], "program": []}
    assert r["graph_ops"]["l4.attention_fused_inplace.default"] == 4
    assert "l4.attention_fused_chained.default" not in r["graph_ops"]
    assert r["kernels_launched"] == 37 and r["launched_at"] == {"B=1 T=1": 29, "B=1 T=2048": 37}


def test_int4_gemms_launch_prefill_blocks_past_their_decode_steps(tmp_path):
    """At Scout's proportions (bench-scout, bf16, group 128; one layer), each Int4 GEMM of the step is two launches,
    its decode blocks' and its prefill blocks' (layout.INT4_PREFILL_ROWS), and the MoE is two tilings (route,
    gate_up, down each); one launch of each pair has work at a decode step (B 1, T 1), the other at a 2048-token
    prefill, so a step runs as many launches as before and the checks hold (~45 s)."""
    r = _generate(tmp_path, "int4", "--layers", "1", preset="bench-scout")
    assert r["problems"] == {"kernels": [], "opaque": [], "caches": [], "program": []}
    ops, launches = r["graph_ops"], r["launches"]
    gemms = sum(n for op, n in ops.items() if op.startswith("l4.int4_mm"))
    moes = sum(n for op, n in ops.items() if op.startswith("l4.moe_q_fused"))
    assert gemms == 2 and moes == 1                                                 # qkv (+ k RoPE), o_proj; the MoE
    assert launches["int4_mm_kernel"] == 2 * gemms
    assert launches["moe_route_kernel"] == launches["moe_int4_gate_up_kernel"] == launches["moe_int4_down_kernel"] \
        == 2 * moes
    decode, prefill = (set(r["work_at"][shape]) for shape in ("B=1 T=1", "B=1 T=2048"))
    for kernel, n in (("int4_mm_kernel", gemms), ("moe_int4_gate_up_kernel", moes), ("moe_int4_down_kernel", moes)):
        ran = [{name for name in work if name.rsplit("_", 1)[0] == kernel} for work in (decode, prefill)]
        assert len(ran[0]) == len(ran[1]) == n and not ran[0] & ran[1], (kernel, ran)   # other compiled variants
    # the decode step skips both route launches (its GEMMs map the token), the prefill runs the prefill map's
    assert [len([w for w in work if w.startswith("moe_route_kernel")]) for work in (decode, prefill)] == [0, 1]
    assert r["launched_at"]["B=1 T=1"] == len(decode) and r["launched_at"]["B=1 T=2048"] == len(prefill)


@pytest.mark.slow
def test_tuned_kernel_blocks_are_the_engines(tmp_path):
    """A manifest's kernel_blocks (compile --tune-kernels on a GPU) generate the engine the compile would: the tuned
    qkv GEMM splits K and is chained (l4::int4_mm_rope_chained: its tiles widened to a head, its splits with them),
    o_proj, not in the table, keeps layout's unsplit blocks; the MoE's split down GEMM has its counters zeroed by
    the route kernel; every check stays ok (~60 s)."""
    import dataclasses

    from l4compile.kernels.layout import int4_blocks, moe_int4_blocks
    from l4compile.kernels.tuned_blocks import choice_to_json

    gu, dn = moe_int4_blocks(512, 1024, 128, 128)
    record = {"problems": [
        {"key": ["int4_mm", 768, 512, 128, "bfloat16"],
         "blocks": choice_to_json(dataclasses.replace(int4_blocks(768, 512, 128), split_k=4, num_warps=8))},
        {"key": ["moe_q", 16, 512, 1024, 128, 128, "bfloat16"],
         "blocks": choice_to_json((gu, dataclasses.replace(dn, split_k=2)))}]}
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"kernel_blocks": record}))
    r = _generate(tmp_path, "int4", "--kernel-blocks", str(manifest), "--layers", "2", preset="bench-scout")
    assert r["problems"] == {"kernels": [], "opaque": [], "caches": [], "program": []}
    assert r["graph_ops"]["l4.int4_mm_rope_chained.default"] == r["graph_ops"]["l4.int4_mm.default"] == 2
    assert "l4.int4_mm_chained.default" not in r["graph_ops"]
    # each with its prefill blocks' launch beside it (layout.INT4_PREFILL_ROWS)
    assert r["launches"]["int4_mm_kernel"] == 2 * 4 and r["launches"]["moe_int4_down_kernel"] == 2 * 2
    assert r["kernel_blocks"] == {"int4_mm 768 512 128 bfloat16": "BN64 BK128 SK4 NW8",
                                  "moe_q 16 512 1024 128 128 bfloat16": "BN64 BK128 SK1/2"}


def test_launches_with_work_evaluates_the_wrappers_grids():
    """``launches_with_work`` follows run_impl's integer assignments and names the launches whose grid has no 0: l4's
    kernels by their last three arguments, Inductor's by their xnumel; a grid it cannot evaluate gives None."""
    tool = _tool()
    lines = ["    auto arg9_1 = std::move(inputs[0]);", "    auto arg9_1_size = arg9_1.sizes();",
             "    int64_t s34 = arg9_1_size[0];", "    int64_t s7 = s34;", "    int64_t s70 = arg9_1_size[1];",
             "    int64_t triton_poi_0_xnumel = 5L*s7*s70;",
             "    call_triton_poi_0(buf0, triton_poi_0_xnumel, this->device_idx_, stream, kernels, this->cubin_dir_);",
             "    call_route_kernel_1(buf0, s70, std::min(static_cast<int64_t>(1L), static_cast<int64_t>((-1L) + "
             "s34*s70)), 1L, 1L, this->device_idx_, stream, kernels, this->cubin_dir_);",
             "    call_combine_kernel_2(buf0, c10::div_floor_integer(static_cast<int64_t>(15L + s70), "
             "static_cast<int64_t>(16L))*(1L - std::min(static_cast<int64_t>(1L), static_cast<int64_t>(s70 - 1L))), "
             "2L*s34, 1L, this->device_idx_, stream, kernels, this->cubin_dir_);"]
    assert tool.launches_with_work(lines, 1, 1) == ["triton_poi_0", "combine_kernel_2"]   # no route at one token
    assert tool.launches_with_work(lines, 1, 2048) == ["triton_poi_0", "route_kernel_1"]  # no combine past one
    assert len(tool.launches_with_work(lines, 2, 1)) == 3
    assert tool.launches_with_work([*lines, "    call_k_3(buf0, s99, 1L, 1L, this->device_idx_, stream);"], 1, 1) \
        is None


def test_kernel_blocks_file_that_is_no_record_is_one_error_line(tmp_path, capsys):
    tool = _tool()
    for text in ("not json", json.dumps({"kernel_blocks": None}), json.dumps([1, 2])):
        (tmp_path / "m.json").write_text(text)
        with pytest.raises(SystemExit) as e:
            tool.kernel_blocks(str(tmp_path / "m.json"))
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: --kernel-blocks ") and err.count("\n") == 1


@pytest.mark.slow
def test_tiny_fp8_cuda_engine_has_no_opaque_op(tmp_path):
    """FP8: the MoE is l4::moe_fp8_fused (its routing and two FP8 GEMM kernels), the projections torch._scaled_mm;
    nothing through the proxy executor, so CUDA graphs can capture the step (~80 s, hence slow)."""
    r = _generate(tmp_path, "fp8")
    assert r["problems"] == {"kernels": [], "opaque": [], "caches": [], "program": []}
    launches = r["launches"]
    assert launches["moe_route_kernel"] == launches["moe_fp8_gate_up_kernel"] == launches["moe_fp8_down_kernel"] == 4
    # the last layer's MoE takes the final norm; the others' next norms stay with their qkv's activation quantization
    assert launches["moe_norm_kernel"] == r["graph_ops"]["l4.moe_fp8_fused_norm.default"] == 1
    assert r["graph_ops"]["l4.moe_fp8_fused.default"] == 3
    # qkv + o of 4 layers; the lm_head (each router is in its layer's add_rms_norm_router launch)
    assert r["extern_calls"] == {"_scaled_mm_out": 8, "mm_out": 1}


RUN_IMPL = """void AOTInductorModel::run_impl(
    auto arg0_1 = std::move(inputs[0]);
    auto arg1_1 = std::move(inputs[1]);
    auto arg2_1 = std::move(inputs[2]);
    auto arg3_1 = std::move(inputs[3]);
    if ((reinterpret_cast<std::uintptr_t>(arg2_1.data_ptr()) & (16 -1)) != 0) {
        aoti_torch_clone_preserve_strides(arg2_1, &arg2_1_aligned);
    }
    call_int4_mm_kernel_0(buf0, w, s, buf1, 16, 1L, 1L, 1L, this->device_idx_, stream, kernels, this->cubin_dir_);
    {BEFORE}
    call_attention_partial_kernel_1(q, k, v, arg2_1, arg3_1, arg1_1, o, lse, out, cos, sin, s0, 16, 16, 2, 2, 16, std::max(1L, std::min(4L, 132L)), 0.25, 8192.0, 0.1, 1e-05, 1L, 1L, 1L, this->device_idx_, stream, kernels, this->cubin_dir_);
    call_attention_combine_kernel_2(o, lse, out, s0, 1L, 1L, 1L, this->device_idx_, stream, kernels, this->cubin_dir_);
    call_triton_poi_fused_index_copy_3(arg1_1, buf7, arg2_1, s0, this->device_idx_, stream, kernels, this->cubin_dir_);
    call_triton_poi_fused_index_copy_4(arg1_1, buf8, arg3_1, s0, this->device_idx_, stream, kernels, this->cubin_dir_);
    {AFTER}
"""
OPS = {"l4.attention_fused.default": 1, "l4.int4_mm.default": 1}


def _analyze(before: str = "", after: str = "", ops=None) -> dict:
    lines = RUN_IMPL.replace("{BEFORE}", before).replace("{AFTER}", after).splitlines()
    return _tool().analyze(lines, ops or OPS, ["k_cache_0", "v_cache_0"])


def test_analyze_accepts_a_sound_step():
    r = _analyze()
    assert r["problems"] == {"kernels": [], "opaque": [], "caches": []}     # the alignment clone is not a copy
    assert r["launches"] == {"attention_combine_kernel": 1, "attention_partial_kernel": 1, "int4_mm_kernel": 1,
                             "triton_poi_fused_index_copy": 2}
    assert r["attention_split_grids"] == ["std::max(1L, std::min(4L, 132L))"]   # N_SPLIT, commas inside kept


@pytest.mark.parametrize("before,after,check,says", [
    ("", "aoti_torch_clone(arg2_1, &buf9);", "caches", "k_cache_0 (arg2_1) copied"),
    ("", "AOTI_TORCH_ERROR_CODE_CHECK(aoti_torch_copy_(buf9, arg3_1, 0));", "caches", "v_cache_0 (arg3_1) copied"),
    ("call_triton_poi_fused_index_copy_5(arg1_1, buf7, arg3_1, this->device_idx_, stream, kernels, this->cubin_dir_);",
     "", "caches", "v_cache_0 (arg3_1): first used at"),                      # written before its attention read
    ("", "AOTI_TORCH_ERROR_CODE_CHECK(aoti_torch_proxy_executor_call_function(proxy_executor, 0, 2, x));", "opaque",
     "aoti_torch_proxy_executor_call_function"),
])
def test_analyze_reports_what_would_cost_a_gpu_session(before, after, check, says):
    problems = _analyze(before, after)["problems"]
    assert len(problems[check]) == 1 and says in problems[check][0], problems
    assert not any(v for k, v in problems.items() if k != check)


IN_PLACE = {"l4.attention_fused_inplace.default": 1, "l4.int4_mm.default": 1}
COMBINE = next(ln for ln in RUN_IMPL.splitlines() if "call_attention_combine_kernel" in ln)
INDEX_COPIES = [ln for ln in RUN_IMPL.splitlines() if "index_copy" in ln]


def _analyze_in_place(run_impl: str) -> dict:
    return _tool().analyze(run_impl.splitlines(), IN_PLACE, ["k_cache_0", "v_cache_0"])


def test_analyze_in_place_attention_writes_its_caches_from_the_combine_launch():
    """With l4::attention_fused_inplace each cache is read by the partial launch and written by the combine launch of
    its op, and by nothing else: a cache still written by Inductor's index_copy kernels is reported."""
    sound = RUN_IMPL.replace(COMBINE, COMBINE.replace("(o, lse, out, ", "(o, lse, out, k, v, arg2_1, arg3_1, arg1_1, "))
    for line in INDEX_COPIES:
        sound = sound.replace(line + "\n", "")
    assert len(INDEX_COPIES) == 2 and "index_copy" not in sound and "arg3_1, arg1_1, s0" in sound
    r = _analyze_in_place(sound.replace("{BEFORE}", "").replace("{AFTER}", ""))
    assert r["problems"] == {"kernels": [], "opaque": [], "caches": []}
    problems = _analyze_in_place(RUN_IMPL.replace("{BEFORE}", "").replace("{AFTER}", ""))["problems"]["caches"]
    assert problems == [f"{n} written by ['triton_poi_fused_index_copy'], not by its attention's own launches alone"
                        for n in ("k_cache_0 (arg2_1)", "v_cache_0 (arg3_1)")]


def test_analyze_reports_a_kernel_op_without_its_launches():
    problems = _analyze(ops={**OPS, "l4.moe_q_fused.default": 1})["problems"]
    assert problems["kernels"] == [f"l4.moe_q_fused.default x1 in the graph, {k} launched 0x (at most 2x with "
                                   "prefill blocks)"
                                   for k in ("moe_route_kernel", "moe_int4_gate_up_kernel", "moe_int4_down_kernel")]
    # an Int4 op launches its kernels once, or twice with its prefill blocks' launch beside the decode blocks'
    tool, moe = _tool(), {"l4.moe_q_fused.default": 1, "l4.int4_mm.default": 2}
    kernels = ("moe_route_kernel", "moe_int4_gate_up_kernel", "moe_int4_down_kernel")
    assert tool.kernel_problems({**dict.fromkeys(kernels, 2), "int4_mm_kernel": 3}, moe) == []
    assert tool.kernel_problems({**dict.fromkeys(kernels, 1), "int4_mm_kernel": 5}, moe) == [
        "l4.int4_mm.default x2 in the graph, int4_mm_kernel launched 5x (at most 4x with prefill blocks)"]
    assert tool.kernel_problems({"attention_partial_kernel": 2, "attention_combine_kernel": 1},
                                {"l4.attention_fused.default": 1}) == [
        "l4.attention_fused.default x1 in the graph, attention_partial_kernel launched 2x"]


def test_bad_preset_is_one_error_line():
    from l4compile.kernels import why_unavailable

    if why_unavailable():
        pytest.skip(why_unavailable())
    p = subprocess.run([sys.executable, str(SCRIPT), "--preset", "nope"], capture_output=True, text=True,
                       timeout=300, cwd=ROOT)
    assert p.returncode == 2 and p.stderr.strip().startswith("error: unknown preset 'nope'")
    assert len(p.stderr.strip().splitlines()) == 1


def test_inductor_config_overrides_are_parsed_or_refused_in_one_line(capsys):
    tool = _tool()
    assert tool.inductor_configs(["combo_kernels=True", "triton.cudagraphs=false"]) == {
        "combo_kernels": True, "triton.cudagraphs": False}
    for bad, needle in (("combo_kernels", "'combo_kernels': expected KEY=VALUE"),
                        ("combo_kernels=yes please", "combo_kernels must be true or false"),
                        ("no_such_config=1", "no_such_config: not an Inductor setting"),
                        ("aot_inductor.package_constants_in_so=True", "l4compile sets it")):
        with pytest.raises(SystemExit) as e:
            tool.inductor_configs([bad])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: --inductor-config ") and needle in err, err
        assert err.count("\n") == 1


def _jit_sm90(tmp_path, *args: str) -> dict:
    """benchmarks/jit_sm90.py's report for the tiny Int4 engine (``args`` after its preset and quant); skips where
    it cannot run (Triton missing; a GPU, or a CPU build of torch: it needs ``make test-host-torch``'s)."""
    import torch

    from l4compile.kernels import why_unavailable

    if why_unavailable():
        pytest.skip(why_unavailable())
    if torch.cuda.is_available() or torch.version.cuda is None:
        pytest.skip("needs a CUDA build of torch without a GPU (make test-host-torch)")
    out = tmp_path / "jit.json"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "jit_sm90.py"), "--preset", "tiny", "--quant",
                        "int4", *args, "--json", str(out)], capture_output=True, text=True, timeout=900, cwd=ROOT,
                       env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_tiny_int4_jit_runtime_generates_for_sm90(tmp_path):
    """What the jit runtime compiles for CUDA (benchmarks/jit_sm90.py: program.pt2's module through Inductor, Python
    wrapper), generated for sm_90a at a decode step of one sequence (B 1, T 1): every kernel module imports, every
    l4 kernel op launches its kernels, none runs opaque. Before in_place_module dropped export's guards, this step
    failed them (T > 1, B != 1). Needs a CUDA build of torch: make test-host-torch (torch 2.11)."""
    r = _jit_sm90(tmp_path)
    assert (r["batch"], r["tokens"]) == (1, 1) and not any(r["problems"].values()), r["problems"]
    assert r["symbolic_sizes"] == [], r["symbolic_sizes"]            # decode at a batch of one: static
    launches = r["launches"]
    # 4 layers: qkv + o_proj each (int4_mm_kernel, the RoPE layers' with the k epilogue), one fused MoE each
    assert launches["int4_mm_kernel"] == 8 and launches["moe_int4_gate_up_kernel"] == 4, launches
    assert launches["attention_partial_kernel"] == launches["add_rms_norm_router_kernel"] == 4, launches
    assert launches.get("triton_*", 0) <= 2, launches                # Inductor's own: the embedding's norm, a fill


@pytest.mark.slow
def test_tiny_int4_jit_runtime_generates_a_dynamic_prefill_for_sm90(tmp_path):
    """The jit runtime's prefill graph of a batch (B and T symbolic, as its torch.compile sees them: sizes > 1 marked
    dynamic on a shape class's first call) generated for sm_90a: the wrapper reads both sizes from its inputs and
    launches the same kernels as a static step. Needs a CUDA build of torch: make test-host-torch."""
    r = _jit_sm90(tmp_path, "--batch", "2", "--tokens", "64", "--dynamic")
    assert r["dynamic"] and not any(r["problems"].values()), r["problems"]
    assert len(r["symbolic_sizes"]) == 2, r["symbolic_sizes"]
    assert r["launches"]["int4_mm_kernel"] == 8 and r["launches"]["moe_int4_down_kernel"] == 4, r["launches"]
