"""`l4compile bench`: report schema, HTML/Markdown rendering (fake samples), roofline figures (fake GPU numbers),
user errors, compare, and one small real run on the `tiny` preset."""
from __future__ import annotations

import html
import json
import re

import pytest
import torch

from l4compile import cli
from l4compile.bench import cli as bench_cli
from l4compile.bench import report as rep
from l4compile.bench import roofline
from l4compile.bench.runner import BackendStatus, BenchConfig
from l4compile.errors import L4Error

TINY_CFG = dict(vocab_size=512, hidden_size=64, intermediate_size=128, intermediate_size_mlp=256, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=1,
                interleave_moe_layer_step=1, moe_layers=[0, 1, 2, 3], no_rope_layers=[1, 1, 1, 0],
                attention_chunk_size=16, max_position_embeddings=512, attention_bias=False)


def parse(*argv: str):
    ap = cli._Parser(prog="l4compile")
    bench_cli.add_parser(ap.add_subparsers(dest="cmd", required=True, parser_class=cli._Parser))
    return ap.parse_args(list(argv))


def fake_result(device: str = "cpu") -> dict:
    cfg = BenchConfig("tiny", backends=("eager", "torch-compile", "inductor", "tensorrt"), device=device,
                      prompt_lens=(16, 64), batch_sizes=(1, 2), decode_steps=8, repeats=3)
    base = {"eager": 10.0, "torch-compile": 6.0, "inductor": 4.0}
    samples = []
    for r in range(3):
        for b in cfg.batch_sizes:
            for p in cfg.prompt_lens:
                for i, (name, ms) in enumerate(base.items()):
                    pre = ms * b * p / 16 * (1 + 0.1 * r)
                    gen = pre + 7 * (ms / 2) * (1 + 0.05 * r)          # 8 new tokens: 7 decode steps
                    samples.append({"backend": name, "batch": b, "prompt_len": p, "repeat": r,
                                    "prefill_ms": round(pre, 4), "generate_ms": round(gen, 4),
                                    "decode_ms_per_token": round((gen - pre) / 7, 4),
                                    "memory_before_bytes": 100 << 20, "peak_memory_bytes": (120 + i) << 20})
    gpu = {"name": "NVIDIA H100 80GB HBM3", "memory_bytes": 80 << 30, "count": 1, "capability": "9.0",
           "cuda": "12.8"} if device == "cuda" else None
    env = {"python": "3.11", "platform": "Linux", "l4compile": "0.1.0", "torch": "2.13.0", "transformers": "5.24",
           "onnxruntime": None, "tensorrt": None, "gpu": gpu,
           "cpu": {"model": "Fake CPU", "logical_cpus": 2, "usable_cpus": 2, "torch_threads": 2}}
    backends = [BackendStatus("eager", "baseline", "ok", compile_seconds=0.0, warmup_seconds=1.0, decode_method="hf"),
                BackendStatus("torch-compile", "baseline", "ok", compile_seconds=40.0, warmup_seconds=40.0,
                              decode_method="hf compiled"),
                BackendStatus("inductor", "engine", "ok", compile_seconds=20.0, warmup_seconds=0.1,
                              decode_method="Engine.generate, recomputing the whole prefix every step",
                              engine_config_hash="0123456789abcdef"),
                BackendStatus("tensorrt", "engine", "skipped", reason="backend 'tensorrt' is not available <yet>")]
    return {"config": cfg, "environment": env, "model_source": {"kind": "preset", "name": "tiny", "seed": 0},
            "model_config": dict(TINY_CFG), "backends": backends, "samples": samples,
            "matches_eager": {}, "memory_method": "fake", "engine_max_seq_len": 72}


def summary_cells(page: str) -> dict[tuple[str, int, int], dict[str, tuple[str, str]]]:
    """(backend, batch, prompt) -> {key: (data-value, shown text)} from the HTML summary table."""
    table = page[page.index('<table id="summary">'):]
    table = table[:table.index("</table>")]
    out = {}
    for m in re.finditer(r'<tr data-backend="([^"]+)" data-batch="(\d+)" data-prompt="(\d+)">(.*?)</tr>', table, re.S):
        cells = {k: (v, html.unescape(re.sub(r"<br>.*", "", t, flags=re.S)).strip())
                 for k, v, t in re.findall(r'<td data-key="([^"]+)" data-value="([^"]*)"[^>]*>(.*?)</td>', m[4], re.S)}
        out[(m[1], int(m[2]), int(m[3]))] = cells
    return out


def check_schema(report: dict) -> None:
    assert rep.validate(report) == []
    try:
        import jsonschema
    except ImportError:
        return
    jsonschema.validate(report, rep.schema())


def test_schema_rejects_bad_reports():
    report = rep.build_report(fake_result())
    check_schema(report)
    bad = json.loads(json.dumps(report))
    bad["samples"][0]["prefill_ms"] = "fast"
    del bad["environment"]["torch"]
    bad["summary"][0]["extra"] = 1
    problems = rep.validate(bad)
    assert any("prefill_ms" in p for p in problems) and any("'torch'" in p for p in problems)
    assert any("extra" in p for p in problems)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_render_fake_report(tmp_path, device):
    report = rep.build_report(fake_result(device))
    check_schema(report)
    paths = rep.write_report(report, tmp_path)
    on_disk = json.loads(paths["json"].read_text())
    assert on_disk == report
    page = paths["html"].read_text()
    assert "<script" not in page and "<link" not in page                           # self-contained
    assert not re.search(r'(src|href)="(https?:|//)', page)
    n_svg = page.count("<svg")
    assert n_svg == (4 if device == "cuda" else 3), n_svg
    assert len(set(re.findall(r'id="([^"]+)"', page))) == len(re.findall(r'id="([^"]+)"', page))  # ids unique
    for t in ("summary", "backends", "samples"):
        assert f'<table id="{t}">' in page
    assert ('<table id="roofline">' in page) == (device == "cuda")
    assert "backend &#39;tensorrt&#39; is not available &lt;yet&gt;" in page      # skipped reason, escaped
    cells = summary_cells(page)
    assert len(cells) == len(report["summary"]) == 12
    for row in report["summary"]:
        c = cells[(row["backend"], row["batch"], row["prompt_len"])]
        for key in ("prefill_ms", "decode_ms_per_token"):
            assert float(c[key][0]) == row[key]["median"]
            assert c[key][1] == rep.fmt_ms(row[key]["median"])
        for key in ("decode_tokens_per_s", "speedup_decode_vs_eager", "speedup_prefill_vs_torch_compile"):
            assert float(c[key][0]) == row[key]
        assert int(c["peak_memory_bytes"][0]) == row["peak_memory_bytes"]
        if row["backend"] == "inductor":
            assert c["speedup_prefill_vs_eager"][1] == rep.fmt_ratio(row["speedup_prefill_vs_eager"])
    ind = next(r for r in report["summary"] if r["backend"] == "inductor" and r["batch"] == 1 and r["prompt_len"] == 16)
    assert ind["speedup_prefill_vs_eager"] == 2.5 and ind["speedup_decode_vs_torch_compile"] == 1.5
    assert ind["prefill_ms"] == {"median": 4.4, "p10": 4.08, "p90": 4.72}
    md = paths["md"].read_text()
    assert "| inductor | 1 | 16 | 4.40 (4.08 to 4.72) |" in md and "2.50×" in md and "| eager | 1 | 16 |" in md
    assert "tensorrt (backend 'tensorrt' is not available <yet>)" in md
    if device == "cuda":
        f = next(x for x in report["roofline"] if x["backend"] == "inductor" and x["batch"] == 1)
        step_s = ind["decode_ms_per_token"]["median"] / 1e3                      # 2.1 ms
        assert f["gpu_peak"] == "H100 SXM"
        assert f["decode_hbm_fraction"] == pytest.approx(f["decode_bytes_per_step"] / step_s / 3.35e12)
        assert f["decode_bytes_per_step"] == f["decode_weight_bytes_per_step"] + f["decode_kv_bytes_per_step"]
        assert f["decode_position"] == 16 + (report["config"]["decode_steps"] - 2) // 2
        assert f["decode_kv_bytes_per_step"] > 0
        assert "Roofline" in md
    else:
        assert report["roofline"] is None and "Roofline" not in page and "Roofline" not in md


def test_roofline_counts_match_the_model():
    from l4compile import frontend

    lm = frontend.load("tiny-maverick", meta=True).model                 # dense/MoE interleave, 8 experts
    c = lm.config
    counted = 0
    for name, p in lm.named_parameters():
        if "embed_tokens" in name or "norm" in name:
            continue
        if ".experts." in name:
            counted += p.numel() * c.num_experts_per_tok // c.num_local_experts
        else:
            counted += p.numel()
    assert roofline.active_params(c) == counted
    assert roofline.param_counts(c, tokens=10**6)["routed_experts"] == pytest.approx(
        sum(p.numel() for n, p in lm.named_parameters() if ".experts." in n))


def test_roofline_fake_numbers():
    cfg = dict(TINY_CFG)
    assert roofline.gpu_peak("NVIDIA H200").hbm_bytes_per_s == 4.8e12
    assert roofline.gpu_peak("NVIDIA H100 80GB HBM3").bf16_flops == 989e12
    assert roofline.gpu_peak("Fake GPU") is None
    f = roofline.roofline_figures(cfg, dtype="bfloat16", quant="none", gpu_name="NVIDIA H100 80GB HBM3", batch=1,
                                  prompt_len=64, prefill_ms=1.0, decode_ms_per_step=0.01)
    active = roofline.active_params(cfg)
    # KV at position 64: 3 chunked layers (chunk 16) see 64 mod 16 = 0 cached positions, the NoPE layer all 64;
    # k and v, 2 kv heads x head_dim 16, bf16
    kv = 64 * 2 * 2 * 16 * 2
    assert f["decode_weight_bytes_per_step"] == active * 2 and f["decode_kv_bytes_per_step"] == kv
    assert f["decode_hbm_fraction"] == pytest.approx((active * 2 + kv) / 1e-5 / 3.35e12)
    at = roofline.roofline_figures(cfg, dtype="bfloat16", quant="none", gpu_name=None, batch=3, prompt_len=64,
                                   prefill_ms=None, decode_ms_per_step=None, decode_position=70)
    assert at["decode_kv_bytes_per_step"] == 3 * (3 * 6 + 70) * 2 * 2 * 16 * 2      # 70 mod 16 = 6 in a chunk
    assert f["prefill_tflops"] == pytest.approx(roofline.prefill_flops(cfg, 1, 64) / 1e-3 / 1e12)
    # chunk 16, 3 RoPE layers + 1 NoPE layer over 64 tokens
    assert roofline.attention_pairs(cfg, 64) == 3 * 4 * (16 * 17 // 2) + 64 * 65 // 2
    q = roofline.roofline_figures(cfg, dtype="float32", quant="int4", gpu_name=None, batch=1, prompt_len=4,
                                  prefill_ms=1.0, decode_ms_per_step=1.0)
    assert q["decode_hbm_fraction"] is None
    head = roofline.param_counts(cfg)["lm_head"]                  # the lm_head stays float32: 4 bytes
    int4 = 0.5 + 2 / 128                                          # two weights a byte, a bf16 scale per 128
    assert q["decode_weight_bytes_per_step"] == (active - head) * int4 + head * 4
    q = roofline.roofline_figures(cfg, dtype="float32", quant="int4", gpu_name=None, batch=1, prompt_len=4,
                                  prefill_ms=1.0, decode_ms_per_step=1.0, lm_head_quantized=True)
    assert q["decode_weight_bytes_per_step"] == active * int4             # quantize.quantize_lm_head=true engines


@pytest.mark.parametrize("argv, needle", [
    (["tiny", "--prompt-lens", "1,x"], "--prompt-lens: 'x' is not a positive integer"),
    (["tiny", "--batch-sizes", "0"], "--batch-sizes: '0' is not a positive integer"),
    (["tiny", "--backends", "eager,fast"], "unknown backend 'fast'"),
    (["tiny", "--backends", "eager,eager"], "lists a backend twice"),
    (["tiny", "--repeats", "0"], "--repeats must be at least 1"),
    (["tiny", "--decode-steps", "1"], "--decode-steps must be at least 2"),
    (["tiny", "--quant", "int3"], "unknown --quant 'int3'"),
    (["tiny", "--prompt-lens", "60", "--decode-steps", "8", "--max-seq-len", "32"], "below the longest prompt"),
    (["tiny", "--prompt-lens", "600", "--backends", "eager"], "exceeds the model's max_position_embeddings 512"),
    (["compare", "nope/report.json", "other/report.json"], "'nope/report.json' does not exist"),
    (["compare", "only-one"], "takes two reports"),
    (["tiny", "stray"], "unexpected argument"),
    (["tiny", "--backends", "eager", "--inductor-config", "cpp.simdlen=0"], "--backends lists neither (eager)"),
    (["tiny", "--inductor-config", "cpp.simdlen=x"], "cpp.simdlen must be an integer or null"),
    (["tiny", "--backends", "eager,torch-compile", "--pass-option", "kv_cache.ring_buffers=false"], "baselines only"),
    (["tiny", "--pass-option", "kv_cache.nope=1"], "no option 'nope'"),
])
def test_user_errors(tmp_path, argv, needle):
    with pytest.raises(L4Error, match=re.escape(needle)) as e:
        bench_cli.run(parse("bench", *argv, "--out", str(tmp_path / "r")))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "r").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="asserts the refusal on a machine without CUDA")
def test_cuda_bench_on_a_machine_without_cuda(tmp_path):
    """The device check runs first, with one clear line (it once raised UnboundLocalError on every machine)."""
    with pytest.raises(L4Error, match=re.escape("--device cuda needs a CUDA GPU")):
        bench_cli.run(parse("bench", "tiny", "--device", "cuda", "--backends", "eager", "--out", str(tmp_path / "r")))
    assert not (tmp_path / "r").exists()


def _tensorrt_usable() -> bool:
    import importlib.util

    import torch
    return torch.cuda.is_available() and importlib.util.find_spec("tensorrt") is not None


@pytest.mark.skipif(_tensorrt_usable(), reason="asserts the no-GPU skip of the tensorrt backend")
def test_small_real_run_and_compare(tmp_path, capsys):
    """eager for real (tiny preset, tiny prompts, 1 repeat); tensorrt reports why it is skipped (no GPU here)."""
    out = tmp_path / "run"
    argv = ["bench", "tiny", "--backends", "eager,tensorrt", "--prompt-lens", "4,8", "--batch-sizes", "1",
            "--decode-steps", "2", "--repeats", "1", "--out", str(out)]
    assert bench_cli.run(parse(*argv)) == 0
    report = json.loads((out / "report.json").read_text())
    check_schema(report)
    assert [(b["name"], b["status"]) for b in report["backends"]] == [("eager", "ok"), ("tensorrt", "skipped")]
    assert "CUDA GPU" in report["backends"][1]["reason"]
    assert len(report["samples"]) == 2 and all(s["backend"] == "eager" for s in report["samples"])
    for s in report["samples"]:   # 2 new tokens: the prefill's and ONE decode step
        assert abs(s["decode_ms_per_token"] - (s["generate_ms"] - s["prefill_ms"])) < 2e-4, s
    assert report["environment"]["torch"] and report["environment"]["cpu"]["torch_threads"] >= 1
    assert "DynamicCache" in report["methods"]["decode_by_backend"]["eager"]
    page = (out / "report.html").read_text()
    cells = summary_cells(page)
    for row in report["summary"]:
        assert float(cells[("eager", 1, row["prompt_len"])]["prefill_ms"][0]) == row["prefill_ms"]["median"]
    assert page.count("<svg") == 2                                      # no speed-up chart with eager alone
    with pytest.raises(L4Error, match="--force"):
        bench_cli.run(parse(*argv))
    # compare against a fake report: deltas for the common rows
    other = tmp_path / "fake"
    rep.write_report(rep.build_report(fake_result()), other)
    capsys.readouterr()
    assert bench_cli.run(parse("bench", "compare", str(other / "report.json"), str(out))) == 0
    text = capsys.readouterr().out
    assert "different settings" in text and "no (backend, batch, prompt) in common" in text
    assert bench_cli.run(parse("bench", "compare", str(other), str(other))) == 0
    text = capsys.readouterr().out
    assert re.search(r"inductor\s+1\s+16\s+4\.40\s+4\.40\s+\+0\.0%", text), text
    (tmp_path / "junk.json").write_text("{}")
    with pytest.raises(L4Error, match="not an l4compile bench report"):
        bench_cli.run(parse("bench", "compare", str(tmp_path / "junk.json"), str(other)))


def test_bench_an_engine_directory_as_compiled(tiny_engine, tmp_path):
    """An ENGINE directory is measured as it was compiled (no recompile, no baselines); options that contradict it
    or only mean something to a compile are refused."""
    out = tmp_path / "run"
    argv = ["bench", str(tiny_engine), "--prompt-lens", "8", "--batch-sizes", "1,2", "--decode-steps", "2",
            "--repeats", "1", "--threads", "1", "--out", str(out)]
    agree = ["--inductor-config", "cpp.simdlen=0", "--pass-option", "kv_cache.ring_buffers=true"]   # as compiled
    assert bench_cli.run(parse(*argv, *agree)) == 0
    report = json.loads((out / "report.json").read_text())
    check_schema(report)
    assert not {"inductor_configs", "pass_options"} & set(report["config"])     # the engine's own: its config hash
    assert [(b["name"], b["status"], b["compile_seconds"]) for b in report["backends"]] == [("inductor", "ok", None)]
    assert report["config"]["quant"] == "none" and report["config"]["dtype"] == "float32"
    assert report["model"]["source"]["engine"] == str(tiny_engine)
    assert sorted((s["batch"], s["prompt_len"]) for s in report["samples"]) == [(1, 8), (2, 8)]
    for extra, needle in ((["--backends", "eager,inductor"], "benchmarked as it was compiled"),
                          (["--quant", "int4"], "was compiled with none"), (["--layers", "2"], "compiled already"),
                          (["--stream-weights"], "compiled already"),
                          (["--inductor-config", "cpp.simdlen=8"], "compiled with cpp.simdlen=0"),
                          (["--pass-option", "kv_cache.ring_buffers=false"],
                           "compiled with kv_cache.ring_buffers=true")):
        with pytest.raises(L4Error, match=re.escape(needle)):
            bench_cli.run(parse(*argv, "--force", *extra))
    with pytest.raises(L4Error, match="max sequence length 128"):
        bench_cli.run(parse(*argv, "--force", "--prompt-lens", "200"))
    with pytest.raises(L4Error, match="max batch size 2"):
        bench_cli.run(parse(*argv, "--force", "--batch-sizes", "3"))


def test_build_options_reach_the_engines_and_the_torch_compile_baseline(monkeypatch, tmp_path):
    """--inductor-config builds the inductor engine and the torch-compile baseline alike; --pass-option every engine;
    both are in the report (wiring: the engine compile and torch.compile are stubbed)."""
    import l4compile

    compiled, traced = [], []

    def fake_compile(model, **kw):
        compiled.append(kw)
        raise L4Error("stubbed compile")

    def fake_torch_compile(fn, options=None):
        traced.append(options)
        return fn
    monkeypatch.setattr(l4compile, "compile", fake_compile)
    monkeypatch.setattr(torch, "compile", fake_torch_compile)
    out = tmp_path / "run"
    assert bench_cli.run(parse("bench", "tiny", "--backends", "eager,torch-compile,inductor,onnxruntime",
                               "--prompt-lens", "4", "--batch-sizes", "1", "--decode-steps", "2", "--repeats", "1",
                               "--inductor-config", "cpp.simdlen=0", "--inductor-config", "cpu_gpu_bw=2",
                               "--pass-option", "kv_cache.ring_buffers=false", "--out", str(out))) == 0
    settings = {"cpp.simdlen": 0, "cpu_gpu_bw": 2.0}          # an int for a float setting: a float, as torch wants
    assert traced == [settings]
    assert [(kw["backend"], kw["inductor_configs"]) for kw in compiled] == [("inductor", settings),
                                                                           ("onnxruntime", None)]
    assert all(kw["pass_options"] == {"kv_cache": {"ring_buffers": False}} for kw in compiled)
    report = json.loads((out / "report.json").read_text())
    check_schema(report)
    assert report["config"]["inductor_configs"] == [["cpp.simdlen", 0], ["cpu_gpu_bw", 2.0]]
    assert report["config"]["pass_options"] == [["kv_cache", [["ring_buffers", False]]]]
    tc = next(b for b in report["backends"] if b["name"] == "torch-compile")
    assert "Inductor settings cpp.simdlen=0, cpu_gpu_bw=2.0" in tc["decode_method"]
    md = (out / "report.md").read_text()
    assert "`cpp.simdlen=0`, `cpu_gpu_bw=2.0`" in md and "`kv_cache.ring_buffers=false`" in md
    assert "<code>kv_cache.ring_buffers=false</code>" in (out / "report.html").read_text()
    api = BenchConfig("tiny", backends=("inductor",), pass_options={"kv_cache": {"ring_buffers": False}},
                      inductor_configs={"cpp.simdlen": 0})           # the Python API may hand dicts
    assert api.to_dict()["pass_options"] == report["config"]["pass_options"]
    assert api.to_dict()["inductor_configs"] == [["cpp.simdlen", 0]]
    with pytest.raises(L4Error, match="inductor_configs .key, value. pairs"):
        BenchConfig("tiny", inductor_configs="abc")
    plain = BenchConfig("tiny", backends=("eager",))       # without build options: the report's config as before
    assert not {"inductor_configs", "pass_options"} & set(plain.to_dict())


def test_engine_decode_method_names_the_runtime():
    """An Inductor engine's decode_method says which runtime ran it (L4COMPILE_INDUCTOR_RUNNER: aoti or jit)."""
    from types import SimpleNamespace

    from l4compile.bench.runner import _runner_for

    for runtime in ("aoti", "jit", None):
        eng = SimpleNamespace(kv_cache={}, decode_mode="graph", cuda_graph_error=None, runtime=runtime,
                              manifest={}, prefill=None, generate=None)
        method = _runner_for(eng, "inductor", 1.0).describe()
        assert method.startswith("Engine.generate with the engine's KV cache") and "decode mode graph" in method
        assert method.endswith(f"; runtime {runtime}") if runtime else "runtime" not in method, method


def test_tuned_kernel_blocks_in_the_report():
    """An engine compiled with --tune-kernels reports, per Int4 problem, the blocks chosen and their time against
    layout's (from its manifest's kernel_blocks); engines without it report as before."""
    import dataclasses

    from l4compile.bench import runner

    manifest_record = {"device": "NVIDIA H100 80GB HBM3 sm_90", "tokens": [1], "problems": [
        {"key": ["int4_mm", 7168, 5120, 128, "bfloat16"], "count": 48, "tokens": [1], "label": "BN64 BK128 SK4",
         "us": 14.2, "static_us": 31.0, "blocks": {}, "candidates": []},
        {"key": ["moe_q", 16, 5120, 8192, 128, 128, "bfloat16"], "count": 48, "tokens": [1], "label": None,
         "us": None, "static_us": None, "blocks": None, "candidates": []}]}
    result = fake_result("cuda")
    result["config"] = dataclasses.replace(result["config"], tune_kernels=True)
    result["backends"] = [dataclasses.replace(b, kernel_blocks=runner._tuned(manifest_record))
                          if b.name == "inductor" else b for b in result["backends"]]
    report = rep.build_report(result)
    check_schema(report)
    assert report["config"]["tune_kernels"] is True
    ind = next(b for b in report["backends"] if b["name"] == "inductor")
    assert ind["kernel_blocks"][0] == {"problem": "int4_mm 7168x5120 G128", "blocks": "BN64 BK128 SK4", "us": 14.2,
                                       "static_us": 31.0, "count": 48, "tokens": [1]}
    md = rep.render_md(report)
    assert "| int4_mm 7168x5120 G128 | 48 | BN64 BK128 SK4 | 14.2 | 31.0 |" in md
    assert "| moe_q E16 H5120 I8192 | 48 | - | - | - |" in md
    assert "kernel_blocks" not in next(b for b in report["backends"] if b["name"] == "eager")
    ind["kernel_blocks"][0]["us"] = "fast"
    assert rep.validate(report)
    assert runner._tuned(None) is None and "tune_kernels" not in BenchConfig("tiny").to_dict()
