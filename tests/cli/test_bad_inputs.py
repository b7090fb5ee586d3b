"""Every user error exits 2 with one `error:` line on stderr, no traceback, and loses nothing."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from l4compile.cli import main
from tests.conftest import run_cli, save_checkpoint


def expect_error(capsys, argv: list[str], *needles: str) -> str:
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def good_ckpt(tmp_path_factory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("good") / "ckpt")


def copy_ckpt(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_path(capsys, tmp_path):
    expect_error(capsys, ["compile", str(tmp_path / "nope"), "--out", str(tmp_path / "e")], "does not exist")


def test_other_model_type(capsys, tmp_path, good_ckpt):
    ck = copy_ckpt(good_ckpt, tmp_path / "ck")
    cfg = json.loads((ck / "config.json").read_text())
    cfg["model_type"] = "llama"
    (ck / "config.json").write_text(json.dumps(cfg))
    expect_error(capsys, ["compile", str(ck), "--out", str(tmp_path / "e")], "'llama'", "llama4_text")


def test_unreadable_config(capsys, tmp_path, good_ckpt):
    ck = copy_ckpt(good_ckpt, tmp_path / "ck")
    (ck / "config.json").write_text("{not json")
    expect_error(capsys, ["compile", str(ck), "--out", str(tmp_path / "e")], "cannot read", "config.json")


def test_bad_config_field(capsys, tmp_path, good_ckpt):
    ck = copy_ckpt(good_ckpt, tmp_path / "ck")
    cfg = json.loads((ck / "config.json").read_text())
    cfg["num_experts_per_tok"] = 9
    (ck / "config.json").write_text(json.dumps(cfg))
    expect_error(capsys, ["compile", str(ck), "--out", str(tmp_path / "e")], "num_experts_per_tok")


def test_truncated_safetensors_names_tensor(capsys, tmp_path, good_ckpt):
    ck = copy_ckpt(good_ckpt, tmp_path / "ck")
    f = ck / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    line = expect_error(capsys, ["compile", str(ck), "--out", str(tmp_path / "e")], "truncated", "tensor '")
    assert not (tmp_path / "e").exists()
    assert "model.safetensors" in line


def test_mismatched_safetensors_names_tensor(capsys, tmp_path, good_ckpt):
    from safetensors.torch import load_file, save_file

    ck = copy_ckpt(good_ckpt, tmp_path / "ck")
    sd = load_file(ck / "model.safetensors")
    name = "model.layers.1.self_attn.q_proj.weight"
    sd[name] = sd[name][:-1].contiguous()
    save_file(sd, ck / "model.safetensors", metadata={"format": "pt"})
    expect_error(capsys, ["compile", str(ck), "--out", str(tmp_path / "e")], name, "shape")


def test_missing_tensor_is_named(capsys, tmp_path, good_ckpt):
    from safetensors.torch import load_file, save_file

    ck = copy_ckpt(good_ckpt, tmp_path / "ck")
    sd = load_file(ck / "model.safetensors")
    del sd["model.norm.weight"]
    save_file(sd, ck / "model.safetensors", metadata={"format": "pt"})
    expect_error(capsys, ["compile", str(ck), "--out", str(tmp_path / "e")], "model.norm.weight")


def test_pickle_only_checkpoint_is_refused(capsys, tmp_path, good_ckpt):
    ck = copy_ckpt(good_ckpt, tmp_path / "ck")
    (ck / "model.safetensors").rename(ck / "pytorch_model.bin")
    expect_error(capsys, ["compile", str(ck), "--out", str(tmp_path / "e")], "never unpickles")


@pytest.mark.parametrize("flag,value,needle", [("--backend", "tvm", "unknown backend 'tvm'"),
                                               ("--quant", "int3", "unknown quant 'int3'"),
                                               ("--dtype", "float8", "unknown dtype 'float8'")])
def test_unknown_options(capsys, tmp_path, flag, value, needle):
    expect_error(capsys, ["compile", "tiny", "--out", str(tmp_path / "e"), flag, value], needle)


@pytest.mark.parametrize("model,extra,needles", [
    ("tiny", ["--verify"], ("--stream-weights", "--verify")),
    ("tiny", ["--plan", "plan.json"], ("--stream-weights", "--plan")),
    ("tiny-vision", [], ("--stream-weights", "--text-only")),
])
def test_stream_weights_refuses_what_it_cannot_do(capsys, tmp_path, model, extra, needles):
    out = tmp_path / "e"
    expect_error(capsys, ["compile", model, "--out", str(out), "--stream-weights", *extra], *needles)
    assert not out.exists()


@pytest.mark.parametrize("options,needles", [
    (["quantize"], ("expected PASS.KEY=VALUE",)),
    (["nope.x=1"], ("'nope' is not a registered pass", "quantize")),
    (["quantize.groupsize=64"], ("no option 'groupsize'", "group_size")),
    (["quantize.quantize_lm_head=yes"], ("quantize.quantize_lm_head must be true or false", "'yes'")),
    (["quantize.group_size=6.5"], ("quantize.group_size must be an integer or null",)),
    (["eliminate_dead_code.x=1"], ("'eliminate_dead_code' takes no options",)),
    (["shard_experts.world_size=2"], ("'shard_experts' is skipped or does not run",)),
    (["quantize.group_size=64", "quantize.group_size=32"], ("quantize.group_size is given twice",)),
])
def test_bad_pass_options(capsys, tmp_path, options, needles):
    out = tmp_path / "e"
    expect_error(capsys, ["compile", "tiny", "--out", str(out), *[f"--pass-option={o}" for o in options]], *needles)
    assert not out.exists()


def test_pass_option_for_a_skipped_pass(capsys, tmp_path):
    expect_error(capsys, ["compile", "tiny", "--out", str(tmp_path / "e"), "--skip-pass", "kv_cache",
                          "--pass-option", "kv_cache.ring_buffers=false"], "'kv_cache' is skipped")


@pytest.mark.skipif(torch.cuda.is_available(), reason="asserts the refusal on a machine without CUDA")
def test_cuda_compile_on_a_machine_without_cuda(capsys, tmp_path):
    expect_error(capsys, ["compile", "tiny", "--device", "cuda", "--out", str(tmp_path / "e")],
                 "--device cuda needs a CUDA GPU")
    assert not (tmp_path / "e").exists()


def test_unknown_preset(capsys, tmp_path):
    expect_error(capsys, ["compile", "tinyy", "--out", str(tmp_path / "e")], "unknown preset 'tinyy'", "tiny-maverick")


def test_unknown_skip_pass(capsys, tmp_path):
    expect_error(capsys, ["compile", "tiny", "--out", str(tmp_path / "e"), "--skip-pass", "nope"], "'nope'")


def test_existing_out_is_left_untouched(capsys, tmp_path):
    out = tmp_path / "e"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    expect_error(capsys, ["compile", "tiny", "--out", str(out)], "already exists", "--force")
    assert [p.name for p in out.iterdir()] == ["precious.txt"] and (out / "precious.txt").read_text() == "keep me"


def test_run_on_non_engine(capsys, tmp_path):
    expect_error(capsys, ["run", str(tmp_path), "--prompt-ids", "1,2"], "not an l4compile engine")


@pytest.mark.parametrize("ids,needle", [("1,99999", "token id 99999 is outside the vocabulary"),
                                        ("1,-3", "token id -3"),
                                        ("1,x,3", "'x' is not an integer"),
                                        ("", "--prompt-ids is empty")])
def test_bad_prompt_ids(capsys, tiny_engine, ids, needle):
    expect_error(capsys, ["run", str(tiny_engine), "--prompt-ids", ids], needle)


@pytest.mark.parametrize("args,needles", [
    (["--prompt", "hello"], ("has no tokenizer", "--prompt-ids")),
    (["--prompt", "hello", "--prompt-ids", "1,2"], ("give --prompt or --prompt-ids, not both",)),
    ([], ("give the prompt as --prompt-ids 1,2,3 or as --prompt TEXT",)),
    (["--prompt-ids", "1,2", "--top-k", "5"], ("top_k only apply when sampling", "temperature above 0")),
    (["--prompt-ids", "1,2", "--temperature", "-1"], ("temperature must be a finite number >= 0",)),
    (["--prompt-ids", "1,2", "--temperature", "inf"], ("temperature must be a finite number",)),
    (["--prompt-ids", "1,2", "--temperature", "1", "--top-p", "1.5"], ("top_p must be a number in (0, 1]",)),
    (["--prompt-ids", "1,2", "--temperature", "hot"], ("invalid float value: 'hot'",)),
    (["--prompt-ids", "1,2", "--stop-ids", "eos"], ("has no end-of-sequence ids", "--stop-ids")),
    (["--prompt-ids", "1,2", "--stop-ids", "1,none"], ("none alone",)),
    (["--prompt-ids", "1,2", "--stop-ids", ","], ("none alone",)),
    (["--prompt-ids", "1,2", "--stop-ids", "x"], ("'x' is not a token id, eos or none",)),
    (["--prompt-ids", "1,2", "--stop-ids", "5,99999"], ("--stop-ids: token id 99999 is outside the vocabulary",)),
])
def test_bad_generation_options(capsys, tiny_engine, args, needles):
    """Prompt, sampling and stop options are checked before the engine loads."""
    expect_error(capsys, ["run", str(tiny_engine), *args], *needles)


def test_prompt_longer_than_engine_max(capsys, tiny_engine):
    ids = ",".join(["5"] * 129)
    expect_error(capsys, ["run", str(tiny_engine), "--prompt-ids", ids], "129 tokens", "max sequence length 128")


def test_prompt_plus_new_tokens_over_max(capsys, tiny_engine):
    ids = ",".join(["5"] * 120)
    expect_error(capsys, ["run", str(tiny_engine), "--prompt-ids", ids, "--max-new-tokens", "20"],
                 "max sequence length 128")


def test_tampered_engine(capsys, tiny_engine, tmp_path):
    eng = shutil.copytree(tiny_engine, tmp_path / "eng")
    with (eng / "model.pt2").open("r+b") as f:
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 0xFF]))
    expect_error(capsys, ["run", str(eng), "--prompt-ids", "1,2"], "model.pt2", "checksum")


@pytest.mark.parametrize("where", ["data", "header"])
def test_tampered_weights(capsys, tiny_engine, tmp_path, where):
    """weights.safetensors is verified while it loads (data a safe parser reads): a changed byte in its data (which
    loads fine) or in its header (which the loader rejects) is reported as the checksum error, and nothing runs."""
    eng = shutil.copytree(tiny_engine, tmp_path / "eng")
    with (eng / "weights.safetensors").open("r+b") as f:
        f.seek(-5 if where == "data" else 12, 2 if where == "data" else 0)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))
    expect_error(capsys, ["run", str(eng), "--prompt-ids", "1,2"], "weights.safetensors", "checksum")


def test_corrupt_manifest(capsys, tiny_engine, tmp_path):
    eng = shutil.copytree(tiny_engine, tmp_path / "eng")
    (eng / "manifest.json").write_text("{")
    expect_error(capsys, ["run", str(eng), "--prompt-ids", "1,2"], "manifest", "corrupt")


def test_real_process_exit_code_and_single_line(tmp_path):
    """Through a real process: exit code 2, one stderr line, nothing else."""
    r = run_cli("compile", str(tmp_path / "missing"), "--out", str(tmp_path / "e"))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and r.stderr.startswith("error: ")
    r = run_cli("compile", "tiny")  # argparse errors follow the same rule
    assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1


def test_sigkill_mid_compile_leaves_no_engine(tmp_path):
    out = tmp_path / "eng"
    argv = ["compile", "tiny", "--out", str(out), "--max-seq-len", "64", "--backend", "onnxruntime"]  # the quickest
    proc = subprocess.Popen([sys.executable, "-m", "l4compile", *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob(".eng.l4tmp-*")):  # backend build has started
        time.sleep(0.2)
    assert list(tmp_path.glob(".eng.l4tmp-*")), "compile never reached the backend stage"
    time.sleep(2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    assert all(not (p / "manifest.json").exists() for p in tmp_path.glob(".eng.l4tmp-*"))
    r = run_cli(*argv)
    assert r.returncode == 0, r.stderr
    assert (out / "manifest.json").is_file() and not list(tmp_path.glob(".eng.l4tmp-*"))


@pytest.mark.parametrize("where,needle", [("missing/x.npy", "is not an existing directory"),
                                          ("a_file/x.npy", "is not an existing directory"),
                                          (".", "is a directory")])
def test_bad_output_files_are_refused_before_the_run(capsys, tiny_engine, tmp_path, where, needle):
    """--logits-out (run) and --json (parity) name a file to write: refused before any compute, not after it."""
    (tmp_path / "a_file").write_text("keep me")
    target = str(tmp_path / where)
    expect_error(capsys, ["run", str(tiny_engine), "--prompt-ids", "1,2", "--logits-out", target],
                 "--logits-out", needle)
    expect_error(capsys, ["parity", "tiny", "--engine", str(tiny_engine), "--json", target], "--json", needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]
    assert (tmp_path / "a_file").read_text() == "keep me"


@pytest.mark.parametrize("opts,needle", [(["--device", "cuda"], "--device cuda contradicts engine"),
                                         (["--dtype", "bfloat16"], "compiled with --dtype float32"),
                                         (["--quant", "int4"], "compiled with --quant none"),
                                         (["--backend", "onnxruntime"], "compiled with --backend inductor"),
                                         (["--seed", "3"], "compiled with --seed 0"),
                                         (["--max-seq-len", "64"], "compiled with --max-seq-len 128"),
                                         (["--inductor-config", "cpp.simdlen=8"],
                                          "--inductor-config cpp.simdlen=8 contradicts engine"),
                                         (["--inductor-config", "max_autotune=true"],     # not recorded: the default
                                          "compiled with max_autotune=false"),
                                         (["--inductor-config", "cpp.simdlen=x"], "must be an integer or null"),
                                         (["--pass-option", "kv_cache.ring_buffers=false"],
                                          "--pass-option kv_cache.ring_buffers=false contradicts engine"),
                                         (["--pass-option", "quantize.group_size=64"],
                                          "compiled with quantize.group_size=null"),
                                         (["--pass-option", "kv_cache.nope=1"], "no option 'nope'")])
def test_parity_engine_refuses_options_that_contradict_it(capsys, tiny_engine, opts, needle):
    """parity --engine compares the engine as it was compiled: an option saying otherwise is an error, not ignored."""
    expect_error(capsys, ["parity", "tiny", "--engine", str(tiny_engine), *opts], needle)


def test_parity_engine_takes_options_that_agree_with_it(tiny_engine, tmp_path):
    report = tmp_path / "p.json"
    assert main(["parity", "tiny", "--engine", str(tiny_engine), "--device", "cpu", "--dtype", "float32",
                 "--quant", "none", "--seed", "0", "--steps", "2", "--json", str(report),
                 "--inductor-config", "cpp.simdlen=0", "--inductor-config", "max_autotune=false",
                 "--pass-option", "kv_cache.ring_buffers=true"]) == 0
    assert json.loads(report.read_text())["status"] == "pass"


@pytest.mark.parametrize("flag,where,needle", [("--dump-ir", "a_file", "exists and is not a directory"),
                                               ("--dump-ir", "a_file/ir", "is a file, not a directory"),
                                               ("--out", "a_file", "exists and is not a directory"),
                                               ("--out", "a_file/e", "is a file, not a directory")])
def test_directory_paths_under_a_file_are_refused(capsys, tmp_path, flag, where, needle):
    (tmp_path / "a_file").write_text("keep me")
    argv = ["compile", "tiny", "--backend", "onnxruntime", "--force"]
    argv += ["--out", str(tmp_path / "e"), "--dump-ir", str(tmp_path / where)] if flag == "--dump-ir" else \
        ["--out", str(tmp_path / where)]
    expect_error(capsys, argv, flag, needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]
    assert (tmp_path / "a_file").read_text() == "keep me"


def test_nproc_on_an_unsharded_engine(capsys, tiny_engine):
    """N processes of an unsharded engine would each compute the whole model: refused before anything spawns."""
    expect_error(capsys, ["run", str(tiny_engine), "--prompt-ids", "1,2", "--nproc", "2"], "is not sharded",
                 "--plan")


def test_nproc_forwards_every_run_option(monkeypatch, tiny_engine, tmp_path):
    """`run --nproc` hands the workers every option `run` takes, rather than dropping some silently: the workers'
    command line parses to the same options, --nproc aside."""
    from l4compile import dist
    from l4compile.cli import build_parser

    seen = []

    def fake_run(cmd, env):
        seen.append(cmd)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(dist.subprocess, "run", fake_run)
    logits = tmp_path / "l.npy"
    assert main(["run", str(tiny_engine), "--nproc", "1", "--prompt-ids", "1,2", "--max-new-tokens", "3",
                 "--logits-out", str(logits), "--decode-mode", "static", "--image", "a.png", "--image", "b.png"]) == 2
    assert seen == []      # tiny_engine has no vision engine: refused before spawning
    argv = ["run", str(tiny_engine), "--prompt-ids", "1,2", "--max-new-tokens", "3", "--logits-out", str(logits),
            "--decode-mode", "static", "--temperature", "0.5", "--top-k", "7", "--top-p", "0.25", "--seed", "9",
            "--stop-ids", "3,4"]
    assert main([*argv, "--nproc", "1"]) == 0
    (cmd,) = seen
    worker = cmd[cmd.index("l4compile.dist") + 1:]
    assert vars(build_parser().parse_args(["run", *worker])) == vars(build_parser().parse_args(argv))
    assert main(["run", str(tiny_engine), "--nproc", "1", "--prompt-ids", "1,2"]) == 0       # the defaults too
    assert vars(build_parser().parse_args(["run", *seen[-1][cmd.index("l4compile.dist") + 1:]])) == \
        vars(build_parser().parse_args(["run", str(tiny_engine), "--prompt-ids", "1,2"]))
    # Images go through as well, for an engine whose manifest has a vision engine (only the manifest is read here).
    eng = tmp_path / "eng"
    eng.mkdir()
    m = json.loads((tiny_engine / "manifest.json").read_text())
    (eng / "manifest.json").write_text(json.dumps(m | {"vision": {"image_token_id": 7}}))
    assert main(["run", str(eng), "--nproc", "1", "--prompt-ids", "1,2", "--image", "a.png", "--image", "b.png"]) == 0
    assert seen[-1][-4:] == ["--image", "a.png", "--image", "b.png"]
