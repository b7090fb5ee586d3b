"""The package imports the same from a built wheel as from the editable install (slow: builds a wheel)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_installs_passes_backends_and_templates(tmp_path):
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path / "dist"),
                    str(ROOT)], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("l4compile-*.whl"))
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True)
    env = dict(os.environ, PYTHONPATH=str(site))  # ahead of the editable install's finder
    code = ("import l4compile, l4compile.passes, l4compile.backends.inductor, l4compile.ops, importlib.resources as r;"
            "print(l4compile.passes.__file__); print(r.files('l4compile.templates').joinpath('engine_readme.md.j2').is_file());"
            "print(r.files('l4compile').joinpath('data/tiny-trained/tokenizer.json').is_file())")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=tmp_path,
                         env=env).stdout.split()
    assert out[0] == str(site / "l4compile" / "passes" / "__init__.py")
    assert out[1] == out[2] == "True"          # templates, and the trained preset's tokenizer
    r = subprocess.run([sys.executable, "-m", "l4compile", "passes"], capture_output=True, text=True, cwd=tmp_path,
                       env=env)
    assert r.returncode == 0 and "eliminate_dead_code" in r.stdout
