"""Checks on the output paths a user names, made before any work so that a bad path costs nothing.

``check_out_file(path, option)``: ``path`` is a file to be written (``run --logits-out``, ``parity --json``); it
may exist as a file (it is replaced) but not as a directory, and its parent directory must exist and be writable.
``check_dir_path(path, option)``: ``path`` is a directory to be written (``compile --out``, ``--dump-ir``),
created with its parents if missing; neither it nor the nearest of its ancestors that exists may be a file.
Both raise ``L4Error`` naming the option; neither creates or touches anything.
"""
from __future__ import annotations

import os
from pathlib import Path

from l4compile.errors import L4Error


def check_out_file(path: str | os.PathLike, option: str) -> Path:
    p = Path(path)
    if p.is_dir():
        raise L4Error(f"{option} {p} is a directory; give a file path")
    parent = p.parent
    if not parent.is_dir():
        raise L4Error(f"{option} {p}: {parent} is not an existing directory; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise L4Error(f"{option} {p}: directory {parent} is not writable")
    return p


def check_dir_path(path: str | os.PathLike, option: str) -> Path:
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise L4Error(f"{option} {p} exists and is not a directory; remove it or pick another path")
    up = next((a for a in p.absolute().parents if a.exists()), None)
    if up is not None and not up.is_dir():
        raise L4Error(f"{option} {p}: {up} is a file, not a directory")
    return p
