"""``l4compile.compile``: MODEL -> frontend -> trace -> passes -> backend -> engine directory."""
from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from l4compile import frontend
from l4compile.config import CompileConfig
from l4compile.engine import Engine, check_out_dir, engine_writer, load_engine, write_manifest
from l4compile.errors import L4Error
from l4compile.pipeline import run_passes
from l4compile.program import trace
from l4compile.progress import Progress

DEFAULT_MAX_SEQ = 512


def library_versions() -> dict[str, str]:
    import transformers

    import l4compile

    return {"l4compile": l4compile.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def render_engine_readme(manifest: dict[str, Any], out: Path) -> str:
    import importlib.resources

    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(importlib.resources.files("l4compile.templates"))),
                             autoescape=False)
    return env.get_template("engine_readme.md.j2").render(m=manifest, engine_dir=str(out))


def resolve_max_seq(config: CompileConfig, model_config) -> int:
    limit = int(model_config.max_position_embeddings)
    if config.max_seq_len is None:
        return min(DEFAULT_MAX_SEQ, limit)
    if config.max_seq_len > limit:
        raise L4Error(f"--max-seq-len {config.max_seq_len} exceeds the model's max_position_embeddings {limit}")
    return config.max_seq_len


def compile(model: str, backend: str = "inductor", out: str | os.PathLike = "engine", *, quant: str = "none",
            dtype: str = "float32", device: str = "cpu", max_seq_len: int | None = None, max_batch_size: int = 4,
            seed: int = 0, layers: int | None = None, force: bool = False, passes: tuple[str, ...] = (),
            skip_passes: tuple[str, ...] = (), verify: bool = False, dump_ir: str | os.PathLike | None = None,
            pass_options: dict[str, dict[str, Any]] | None = None, progress: Progress | None = None,
            plan: str | os.PathLike | dict | None = None) -> Engine:
    """Compile MODEL (checkpoint directory or preset) into an engine directory at ``out`` and load it.
    With ``plan`` (``l4compile plan --json`` output), the shard_experts pass writes one artifact set per rank."""
    if plan is not None:   # expert parallelism: run shard_experts with the plan's placement
        from l4compile.passes.shard_experts import options_from_plan
        pass_options = dict(pass_options or {}, shard_experts=options_from_plan(plan, backend))
        passes = (*passes, "l4compile.passes.shard_experts:shard_experts")
    config = CompileConfig(backend=backend, quant=quant, dtype=dtype, device=device, max_seq_len=max_seq_len,
                           max_batch_size=max_batch_size, seed=seed, layers=layers, passes=tuple(passes),
                           skip_passes=tuple(skip_passes), verify=verify,
                           pass_options=tuple((k, tuple(sorted(v.items())))
                                              for k, v in sorted((pass_options or {}).items())))
    if config.quant != "none" and config.backend != "inductor":
        raise L4Error(f"--quant {config.quant} is not lowered for the {config.backend} backend yet (quantized ops "
                      "have an Inductor lowering only); use --backend inductor or --quant none")
    from l4compile.backends import get_backend

    be = get_backend(config.backend)
    out = Path(out)
    check_out_dir(out, force)
    progress = progress or Progress(enabled=False)
    t_start = time.perf_counter()
    with progress.stage("load model"):
        loaded = frontend.load(model, dtype=config.dtype, device=config.device, seed=config.seed, layers=config.layers)
    lm = loaded.model
    max_seq = resolve_max_seq(config, lm.config)
    with progress.stage("trace"):
        program = trace(lm, max_batch=config.max_batch_size, max_seq=max_seq, device=config.device)
    reference = None
    if config.verify:
        from l4compile.program import CausalLMHarness
        with torch.no_grad():
            reference = CausalLMHarness(lm)(*program.example_inputs)
    tol = 1e-4 if config.dtype == "float32" else 3e-2
    with progress.stage("passes"):
        records = run_passes(program, config, dump_ir=Path(dump_ir) if dump_ir else None, reference=reference,
                             tolerance=tol, on_pass=lambda n, s: progress.note(f"  pass {n}: {s:.2f}s"))
    del lm
    if program.kv_layout is not None:
        sig = program.metadata["signature"]
        n = len(program.kv_layout["layers"])
        sig["inputs"] += [{"name": "start_pos", "dtype": "int64", "shape": [1]},
                          {"name": f"k_cache_i, v_cache_i for i < {n}", "dtype": program.kv_layout["dtype"],
                           "shape": program.kv_layout["shape"]}]
        sig["outputs"] += [{"name": f"k_cache_i', v_cache_i' for i < {n}", "dtype": program.kv_layout["dtype"],
                            "shape": program.kv_layout["shape"]}]
    with engine_writer(out, force) as work:
        with progress.stage(f"backend {config.backend}"):
            result = be.build(program, work, config)
        manifest = {
            "backend": config.backend, "quant": config.quant, "dtype": config.dtype, "device": config.device,
            "max_seq_len": max_seq, "max_batch_size": config.max_batch_size,
            "model_config": program.model_config.to_dict(), "model_source": loaded.source,
            "compile_config": config.to_dict(), "config_hash": config.stable_hash(),
            "passes": [r.to_dict() for r in records], "signature": program.metadata["signature"],
            "weight_bytes": next((r.stats["weight_bytes"] for r in records
                                  if r.name == "quantize" and "weight_bytes" in r.stats), None),
            "kv_cache": program.kv_layout, "sharding": program.gm.meta.get("l4_sharding"),
            "backend_info": result.info, "versions": library_versions(),
            "stage_seconds": progress.stages, "compile_seconds": round(time.perf_counter() - t_start, 3),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (work / "README.md").write_text(render_engine_readme(manifest, out))
        write_manifest(work, manifest, [*result.artifacts, "README.md"])
    progress.note(f"engine written to {out}")
    return load_engine(out, defer_shards=True)
