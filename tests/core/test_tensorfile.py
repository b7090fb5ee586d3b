"""Engine weights file: the streaming safetensors writer round-trips through safetensors' own reader, and an
Inductor engine refuses a weights file that lacks a constant its package names."""
from __future__ import annotations

import hashlib

import pytest
import torch

from l4compile import tensorfile
from l4compile.engine import sha256_file
from l4compile.errors import L4Error


def test_round_trip_every_dtype_through_the_safetensors_library(tmp_path):
    from safetensors.torch import load_file

    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 5, generator=g)
    tensors = {"f32": base, "bf16": base.bfloat16(), "f16": base.half(), "fp8": base.to(torch.float8_e4m3fn),
               "u8": torch.randint(0, 255, (7,), generator=g, dtype=torch.uint8), "i64": torch.arange(4),
               "bool": base > 0, "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4),
               "strided": base.t(), "shared": base}                      # a transposed view; storage shared
    digest = hashlib.sha256()
    n = tensorfile.write(tmp_path / "w.safetensors", tensors, hasher=digest)
    assert n == sum(t.numel() * t.element_size() for t in tensors.values())
    assert digest.hexdigest() == sha256_file(tmp_path / "w.safetensors")       # hashed as written: the file's own
    for got in (load_file(str(tmp_path / "w.safetensors")), tensorfile.read(tmp_path / "w.safetensors")):
        assert got.keys() == tensors.keys()
        for k, t in tensors.items():
            assert got[k].dtype == t.dtype and got[k].shape == t.shape
            assert torch.equal(got[k].view(torch.uint8) if t.dtype == torch.float8_e4m3fn else got[k],
                               t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t), k


def test_unsupported_dtype_and_unreadable_file(tmp_path):
    with pytest.raises(L4Error, match="complex"):
        tensorfile.write(tmp_path / "c.safetensors", {"c": torch.zeros(2, dtype=torch.complex64)})
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(L4Error, match="cannot read engine weights"):
        tensorfile.read(tmp_path / "bad.safetensors")


def test_weights_missing_a_package_constant_are_refused(tmp_path):
    from l4compile.backends import inductor

    class Package:      # the two methods of AOTI's loaded package that _load_weights uses
        loaded = None

        def get_constant_fqns(self):
            return ["lm.a", "lm.b", "lm.c"]

        def load_constants(self, constants, check_full_update, user_managed):
            self.loaded = (sorted(constants), check_full_update, user_managed)

    tensorfile.write(tmp_path / "w.safetensors", {"lm.a": torch.ones(2), "lm.b": torch.ones(3)})
    with pytest.raises(L4Error, match=r"lacks the engine constant 'lm.c'.*recompile"):
        inductor._load_weights(Package(), tmp_path / "w.safetensors", "cpu")
    tensorfile.write(tmp_path / "w.safetensors", {"lm.a": torch.ones(2), "lm.b": torch.ones(3), "lm.c": torch.ones(1)})
    pkg = Package()
    weights = inductor._load_weights(pkg, tmp_path / "w.safetensors", "cpu")
    assert pkg.loaded == (["lm.a", "lm.b", "lm.c"], True, True) and set(weights) == {"lm.a", "lm.b", "lm.c"}
