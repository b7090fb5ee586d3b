"""Engine directory: manifest contents, atomic writes, and a runtime that needs no transformers."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

from l4compile.config import CompileConfig
from l4compile.engine import MANIFEST, engine_writer, sha256_file, write_manifest
from l4compile.errors import L4Error


def test_manifest_records_what_the_contract_names(tiny_engine):
    m = json.loads((tiny_engine / MANIFEST).read_text())
    for key in ("format_version", "backend", "model_config", "quant", "dtype", "device", "passes", "signature",
                "max_seq_len", "max_batch_size", "artifacts", "versions", "compile_seconds", "config_hash"):
        assert key in m, key
    assert m["backend"] == "inductor" and m["max_seq_len"] == 128 and m["max_batch_size"] == 2
    for rel, info in m["artifacts"].items():
        assert sha256_file(tiny_engine / rel) == info["sha256"]
    assert {"torch", "transformers", "l4compile"} <= set(m["versions"])


def test_failed_build_leaves_nothing(tmp_path):
    out = tmp_path / "eng"
    with pytest.raises(RuntimeError):
        with engine_writer(out, force=False) as work:
            (work / "half.bin").write_bytes(b"x")
            raise RuntimeError("backend crashed")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_force_replaces_atomically(tmp_path):
    out = tmp_path / "eng"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with engine_writer(out, force=True) as work:
        (work / "a.bin").write_bytes(b"new")
        write_manifest(work, {"backend": "x"}, ["a.bin"])
    assert sorted(p.name for p in out.iterdir()) == ["a.bin", MANIFEST]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eng"]


def test_manifest_takes_digests_hashed_as_written(tmp_path):
    """A digest the build computed while writing is taken as it is (no second read); the others are hashed."""
    (tmp_path / "a.bin").write_bytes(b"aaaa")
    (tmp_path / "b.bin").write_bytes(b"bbbb")
    m = write_manifest(tmp_path, {"backend": "x"}, ["a.bin", "b.bin"], {"a.bin": "0" * 64})
    assert m["artifacts"]["a.bin"] == {"sha256": "0" * 64, "bytes": 4}
    assert m["artifacts"]["b.bin"]["sha256"] == hashlib.sha256(b"bbbb").hexdigest()


def test_config_rejects_unknown_keys_and_hashes_stably():
    with pytest.raises(L4Error, match="unknown compile option"):
        CompileConfig.from_dict({"backend": "inductor", "bakend": "x"})
    a = CompileConfig(max_seq_len=64)
    assert a.stable_hash() == CompileConfig.from_dict({"max_seq_len": 64}).stable_hash()
    assert a.stable_hash() != CompileConfig(max_seq_len=65).stable_hash()
    with pytest.raises(L4Error, match="max_batch_size must be a positive integer"):
        CompileConfig(max_batch_size=0)


def test_engine_loads_in_fresh_process_without_transformers(tiny_engine):
    code = (
        "import sys; sys.modules['transformers'] = None\n"   # importing transformers now fails
        "import torch, l4compile\n"
        f"e = l4compile.load_engine({str(tiny_engine)!r})\n"
        "ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])\n"
        "print(e.prefill(ids).shape[-1], e.generate(ids, max_new_tokens=4).shape[-1])\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["512", "12"]


def test_cli_compile_writes_the_engine_and_loads_nothing(monkeypatch, tmp_path, capsys):
    """`l4compile compile` prints the manifest's figures without loading the engine (full Scout Int4 would read its
    ~58 GB of weights back to print them); what it wrote verifies as a load would."""
    from l4compile.backends import get_backend
    from l4compile.cli import main
    from l4compile.engine import read_manifest, verify_artifacts

    monkeypatch.setattr(get_backend("onnxruntime"), "load", lambda *a, **k: pytest.fail("compile loaded the engine"))
    out = tmp_path / "e"
    assert main(["compile", "tiny", "--backend", "onnxruntime", "--out", str(out), "--max-seq-len", "64"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    manifest = read_manifest(out)
    assert printed["engine"] == str(out) and printed["backend"] == "onnxruntime"
    assert printed["engine_bytes"] == sum(a["bytes"] for a in manifest["artifacts"].values()) > 0
    verify_artifacts(out, manifest)
