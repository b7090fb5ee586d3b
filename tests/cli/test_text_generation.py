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


# ---- a checkpoint with its own tokenizer and chat template (Llama 4's layout of headers, written for this test) ----

CHAT_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}"
    "{{- '<|header_start|>' + message['role'] + '<|header_end|>\\n\\n' + message['content'] | trim + '<|eot|>' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|header_start|>assistant<|header_end|>\\n\\n' }}{%- endif %}")
CHAT_SPECIALS = ["<|header_start|>", "<|header_end|>", "<|eot|>"]            # ids 259, 260, 261
CONVERSATION = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is a for loop?"}]


def write_chat_files(ckpt, template: str = CHAT_TEMPLATE) -> None:
    """tiny-trained's byte-level tokenizer.json plus three chat tokens; a tokenizer_config.json with the template;
    a generation config ending at <|eot|>."""
    from tokenizers import AddedToken, Tokenizer

    tok = Tokenizer.from_file(str(get_preset("tiny-trained").checkpoint_dir() / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True) for t in CHAT_SPECIALS])
    tok.save(str(ckpt / "tokenizer.json"))
    (ckpt / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
        "eos_token": {"__type": "AddedToken", "content": "<|eot|>", "special": True}, "chat_template": template}))
    (ckpt / "generation_config.json").write_text(json.dumps({"eos_token_id": [261, 257], "pad_token_id": 258}))


@pytest.fixture(scope="module")
def chat_engine(tmp_path_factory):
    ckpt = save_checkpoint(tmp_path_factory.mktemp("chat") / "ckpt")
    write_chat_files(ckpt)
    return ckpt, l4compile.compile(str(ckpt), backend="onnxruntime", out=ckpt.parent / "e", max_seq_len=128,
                                   max_batch_size=1)


def hf_chat_ids(ckpt, messages) -> list[int]:
    """transformers' own apply_chat_template on the checkpoint directory: the reference."""
    from transformers import AutoTokenizer

    out = AutoTokenizer.from_pretrained(str(ckpt)).apply_chat_template(messages, add_generation_prompt=True,
                                                                      tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_chat_prompt_is_apply_chat_template(chat_engine):
    ckpt, eng = chat_engine
    m = eng.manifest
    assert m["chat_template"] == {"path": "tokenizer/chat_template.jinja", "source": "tokenizer_config.json",
                                  "special_tokens": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot|>"}}
    assert {"tokenizer/tokenizer.json", "tokenizer/chat_template.jinja"} <= set(m["artifacts"])
    assert eng.eos_ids == (261, 257) and m["generation"]["source"] == "generation_config.json"
    readme = (eng.path / "README.md").read_text()
    assert "chat template `tokenizer/chat_template.jinja` (`tokenizer_config.json`)" in readme and "--chat" in readme
    for messages in (CONVERSATION, CONVERSATION[1:]):
        ids = eng.tokenizer.chat(messages)
        assert ids == hf_chat_ids(ckpt, messages)
        assert ids[0] == 256 and ids.count(256) == 1            # BOS once: the template's, none added by encoding
        assert eng.tokenizer.decode(ids, skip_special_tokens=False).endswith("<|header_start|>assistant"
                                                                              "<|header_end|>\n\n")


def test_run_chat(chat_engine, capsys):
    """`run --chat --system`: the prompt is the rendered conversation; the run stops at the checkpoint's eos ids."""
    ckpt, eng = chat_engine
    out = run_json(capsys, str(eng.path), "--prompt", CONVERSATION[1]["content"], "--chat", "--system",
                   CONVERSATION[0]["content"], "--max-new-tokens", "40")
    assert out["prompt_len"] == len(hf_chat_ids(ckpt, CONVERSATION))
    new = out["generated_ids"]
    stopped = [i for i, t in enumerate(new) if t in (261, 257)]
    assert out["finish_reason"] == ("stop" if stopped else "length")
    assert len(new) == (stopped[0] + 1 if stopped else 40)
    assert out["text"] == eng.tokenizer.decode(new)
    plain = run_json(capsys, str(eng.path), "--prompt", CONVERSATION[1]["content"], "--max-new-tokens", "4")
    assert plain["prompt_len"] == len(CONVERSATION[1]["content"].encode())     # no template, no BOS: bytes


def test_nproc_forwards_chat_options(chat_engine, monkeypatch):
    """`run --nproc` hands --chat and --system (a message that starts with '-' too) to the workers unchanged."""
    import subprocess

    from l4compile import dist
    from l4compile.cli import build_parser

    _, eng = chat_engine
    seen = []
    monkeypatch.setattr(dist, "preflight", lambda args: eng.manifest)      # the chat engine is not sharded
    monkeypatch.setattr(dist.subprocess, "run", lambda cmd, env: seen.append(cmd) or subprocess.CompletedProcess(cmd,
                                                                                                                0))
    argv = ["run", str(eng.path), "--prompt=-x", "--chat", "--system=-be brief", "--max-new-tokens", "2"]
    assert main([*argv, "--nproc", "1"]) == 0
    worker = seen[0][seen[0].index("l4compile.dist") + 1:]
    assert vars(build_parser().parse_args(["run", *worker])) == vars(build_parser().parse_args(argv))


@pytest.mark.parametrize("args,needle", [
    (["--prompt-ids", "1,2", "--chat"], "--chat renders a text message: give it as --prompt TEXT"),
    (["--prompt", "hi", "--system", "be brief"], "--system is a chat message: add --chat"),
    (["--prompt", "hi", "--chat", "--image", "x.png"], "--chat does not take --image yet"),
])
def test_bad_chat_options(chat_engine, capsys, args, needle):
    _, eng = chat_engine
    capsys.readouterr()
    assert main(["run", str(eng.path), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and needle in err and len(err.strip().splitlines()) == 1


def test_chat_needs_a_chat_template(text_engine, capsys):
    capsys.readouterr()
    assert main(["run", str(text_engine.path), "--prompt", "hi", "--chat"]) == 2
    assert "has no chat template (its checkpoint had none): drop --chat" in capsys.readouterr().err


def test_chat_template_sources(tmp_path):
    """Where transformers looks: chat_template.jinja, else chat_template.json, else tokenizer_config.json (a list
    of named templates: the default one)."""
    from l4compile.tokenizer import find_chat_template

    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "T"}, {"name": "default", "template": "D{{ messages[0].content }}"}]}))
    chat = find_chat_template(tmp_path)
    assert chat.source == "tokenizer_config.json" and chat.render([{"role": "user", "content": "x"}]) == "Dx"
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "J{{ bos_token }}"}))
    assert find_chat_template(tmp_path).source == "chat_template.json"
    (tmp_path / "chat_template.jinja").write_text("{{ messages | length }}")
    chat = find_chat_template(tmp_path)
    assert chat.source == "chat_template.jinja" and chat.render([{"role": "user", "content": "x"}]) == "1"
    assert find_chat_template(None) is None


@pytest.mark.parametrize("template,needle", [
    ("{% for m in messages %}{{ m.content }}", "failed on this conversation"),            # syntax: no endfor
    ("{{ raise_exception('system message required') }}", "system message required"),
    ("", "the chat template is not a non-empty string"),
])
def test_bad_chat_template_is_refused_before_the_backend(tmp_path, capsys, template, needle):
    ckpt = save_checkpoint(tmp_path / "ckpt")
    write_chat_files(ckpt, template)
    capsys.readouterr()
    assert main(["compile", str(ckpt), "--backend", "onnxruntime", "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and needle in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "e").exists()
