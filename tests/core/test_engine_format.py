"""Engine directory: manifest contents, atomic writes, and a runtime that needs no transformers."""
from __future__ import annotations

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
