"""Inductor backend: the Program is re-exported (dynamic batch and sequence) and compiled ahead of time
with AOTInductor into one ``model.pt2`` package that loads in a fresh process with only torch and
l4compile (for its custom ops) importable; transformers is not needed at run time.

Before compiling, l4 ops that have an aten decomposition (``l4compile.ops.DECOMPOSITIONS``: attention) are
inlined so Inductor generates their code; the rest (``l4.moe``) run through AOTInductor's proxy executor.
For ``--device cuda`` the GPU kernels are compiled in as well (``l4compile.kernels.dispatch``): the fused Triton
MoE, the Triton Int4 GEMM and ``torch._scaled_mm`` for FP8.
With the kv_cache pass the package is one step graph serving both prefill and decode."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from l4compile.backends import BuildResult
from l4compile.errors import L4Error

ARTIFACT = "model.pt2"


def build(program, workdir: Path, config) -> BuildResult:
    if config.device == "cuda" and not torch.cuda.is_available():
        raise L4Error("--device cuda needs a CUDA GPU and a CUDA build of torch; this machine has none")
    import l4compile.ops

    shards = program.gm.meta.get("l4_shards")   # shard_experts (compile --plan): one package per rank
    if shards:
        import dataclasses
        arts = []
        for r, gm in enumerate(shards):
            (workdir / f"rank{r}").mkdir()
            _package(dataclasses.replace(program, gm=gm), workdir / f"rank{r}" / ARTIFACT, config.device)
            arts.append(f"rank{r}/{ARTIFACT}")
        return BuildResult(arts, {"format": "aoti-package", "torch": torch.__version__, "ranks": len(shards)})
    _package(program, workdir / ARTIFACT, config.device)
    return BuildResult([ARTIFACT], {"format": "aoti-package", "torch": torch.__version__})


def _package(program, path: Path, device: str = "cpu") -> None:
    import l4compile.ops

    decomps = dict(l4compile.ops.DECOMPOSITIONS)                             # attention becomes plain aten
    if device == "cuda":   # l4::moe / linear_int4 -> Triton triton_ops, linear_fp8 -> _scaled_mm (compiled in)
        from l4compile.kernels.dispatch import cuda_decompositions
        decomps.update(cuda_decompositions())
    ep = program.export().run_decompositions(decomps)
    with torch.no_grad():
        torch._inductor.aoti_compile_and_package(ep, package_path=str(path))


def load(engine_dir: Path, manifest: dict[str, Any]):
    import l4compile.ops  # noqa: F401  (registers the custom ops the package may call)

    if manifest["device"] == "cuda" and not torch.cuda.is_available():
        raise L4Error(f"engine {engine_dir} was built for CUDA and this machine has no CUDA GPU")
    if manifest["device"] == "cuda":   # l4::moe_fused / l4::int4_mm, should the package call them as ops
        from l4compile.kernels.dispatch import load_triton_ops
        load_triton_ops()
    artifact = ARTIFACT
    if manifest.get("sharding"):   # this process's rank (load_engine checked the process group)
        import torch.distributed as dist
        artifact = f"rank{dist.get_rank()}/{ARTIFACT}"
    pkg = torch._inductor.aoti_load_package(str(engine_dir / artifact))

    def run(*inputs: torch.Tensor):
        return pkg(*inputs)

    return run
