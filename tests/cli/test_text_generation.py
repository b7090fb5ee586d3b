"""Text in and out: a checkpoint's tokenizer.json travels into its engine (checksummed), `run --prompt TEXT` encodes
with it and reports the generated text, sampling is seeded, and stop ids end the sequence. The engine is the
byte-level `tiny-trained` checkpoint (it ships a tokenizer.json), on ONNX Runtime, the quickest backend to build."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import l4compile
from l4compile.cli import main
from l4compile.presets import get_preset
from tests.conftest import run_cli, save_checkpoint

PROMPT = "The for statement is used to"


@pytest.fixture(scope="module")
def text_engine(tmp_path_factory):
    return l4compile.compile("tiny-trained", backend="onnxruntime", out=tmp_path_factory.mktemp("text") / "e",
                             max_seq_len=96, max_batch_size=1)


def run_json(capsys, *args: str) -> dict:
    capsys.readouterr()
    assert main(["run", *args]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_engine_carries_the_tokenizer_and_eos(text_engine):
    m = text_engine.manifest
    assert m["tokenizer"] == "tokenizer/tokenizer.json" and m["tokenizer"] in m["artifacts"]
    assert (text_engine.path / m["tokenizer"]).read_bytes() == \
        (get_preset("tiny-trained").checkpoint_dir() / "tokenizer.json").read_bytes()
    assert m["generation"] == {"eos_token_ids": [257], "pad_token_id": 258, "source": "config.json"}
    assert text_engine.eos_ids == (257,)
    tok = text_engine.tokenizer                              # byte-level: every UTF-8 byte is its own id
    text = "déjà vu: x = 1\n\tλ"
    assert tok.encode(text) == list(text.encode()) and tok.decode(tok.encode(text)) == text
    assert tok.decode([72, 105, 257]) == "Hi" and tok.decode([72, 105, 257], skip_special_tokens=False) == \
        "Hi<|end_of_text|>"


def test_run_text_prompt_matches_its_ids(text_engine, capsys, tmp_path):
    """--prompt TEXT is --prompt-ids of its encoding (same logits, same tokens); the JSON carries the decoded text,
    and the run stops at nothing the trained model emits, so it runs its full length."""
    logits = tmp_path / "l.npy"
    text = run_json(capsys, str(text_engine.path), "--prompt", PROMPT, "--max-new-tokens", "40",
                    "--logits-out", str(logits))
    ids = run_json(capsys, str(text_engine.path), "--prompt-ids", ",".join(map(str, PROMPT.encode())),
                   "--max-new-tokens", "40")
    assert text["prompt_len"] == len(PROMPT) and np.load(logits).shape == (len(PROMPT), 259)
    assert text["generated_ids"] == ids["generated_ids"] and len(ids["generated_ids"]) == 40
    assert text["finish_reason"] == ids["finish_reason"] == "length"
    assert text["text"] == bytes(text["generated_ids"]).decode("utf-8", errors="replace")
    assert "sampling" not in text and text["text"].strip()
    # stop at the first space: the greedy tokens up to and including it
    space = text["generated_ids"].index(32)
    stopped = run_json(capsys, str(text_engine.path), "--prompt", PROMPT, "--max-new-tokens", "40",
                       "--stop-ids", "eos,32")
    assert stopped["generated_ids"] == text["generated_ids"][:space + 1] and stopped["finish_reason"] == "stop"


def test_run_samples_with_a_seed(text_engine, capsys):
    args = (str(text_engine.path), "--prompt", PROMPT, "--max-new-tokens", "32", "--temperature", "0.9",
            "--top-p", "0.95")
    a = run_json(capsys, *args, "--seed", "3")
    b = run_json(capsys, *args, "--seed", "3", "--decode-mode", "static")
    c = run_json(capsys, *args, "--seed", "4")
    assert a["sampling"] == {"temperature": 0.9, "top_p": 0.95, "seed": 3}
    assert a["generated_ids"] == b["generated_ids"] and a["generated_ids"] != c["generated_ids"]
    assert a["text"] == bytes(a["generated_ids"]).decode("utf-8", errors="replace")


def test_text_prompt_through_a_fresh_process(text_engine):
    """The real command line: a prompt that starts with '-' goes in as --prompt=TEXT."""
    r = run_cli("run", str(text_engine.path), "--prompt=- item", "--max-new-tokens", "8")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["prompt_len"] == 6 and len(out["generated_ids"]) == 8


def test_tampered_tokenizer_is_refused(text_engine, tmp_path, capsys):
    eng = tmp_path / "e"
    shutil.copytree(text_engine.path, eng)
    (eng / "tokenizer" / "tokenizer.json").write_text("{}")
    capsys.readouterr()
    assert main(["run", str(eng), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "tokenizer/tokenizer.json" in err and "checksum" in err
    assert len(err.strip().splitlines()) == 1


def _tokenizer_json(n_tokens: int) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(n_tokens)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok.to_str()


@pytest.mark.parametrize("files,needle", [
    ({"tokenizer.json": "not json"}, "cannot read the tokenizer"),
    ({"tokenizer.json": _tokenizer_json(400)}, "has 400 tokens, more than the model's vocabulary of 320"),
    ({"generation_config.json": json.dumps({"eos_token_id": [2, 999]})}, "eos_token_id 999 is not a token id"),
    ({"generation_config.json": "{"}, "cannot read"),
])
def test_bad_tokenizer_or_generation_config_is_refused_before_the_backend(tmp_path, capsys, files, needle):
    ckpt = save_checkpoint(tmp_path / "ckpt")
    for name, text in files.items():
        (ckpt / name).write_text(text)
    capsys.readouterr()
    assert main(["compile", str(ckpt), "--backend", "onnxruntime", "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and needle in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "e").exists()


def test_checkpoint_tokenizer_of_the_right_size_is_carried(tmp_path):
    """A checkpoint's own (word-level) tokenizer: carried, and `--prompt` text uses it."""
    ckpt = save_checkpoint(tmp_path / "ckpt")
    (ckpt / "tokenizer.json").write_text(_tokenizer_json(320))
    eng = l4compile.compile(str(ckpt), backend="onnxruntime", out=tmp_path / "e", max_seq_len=32, max_batch_size=1)
    assert eng.tokenizer.encode("w5 w7 w300") == [5, 7, 300]
    assert eng.eos_ids == (2,)
    out = eng.generate([[5, 7, 300]], max_new_tokens=6)
    assert eng.tokenizer.decode(out[0, 3:].tolist()) == " ".join(f"w{t}" for t in out[0, 3:].tolist())
