"""``l4compile.compile``: MODEL -> frontend -> trace -> passes -> backend -> engine directory."""
from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from l4compile import frontend
from l4compile.config import CompileConfig, require_device
from l4compile.engine import Engine, check_out_dir, engine_writer, load_engine, write_manifest
from l4compile.errors import L4Error
from l4compile.inductor_configs import check as check_inductor_configs
from l4compile.kernels import tuned_blocks
from l4compile.paths import check_dir_path
from l4compile.pipeline import check_pass_options, run_passes
from l4compile.program import Program, trace
from l4compile.progress import Progress
from l4compile.tokenizer import text_assets

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


VISION_DIR = "vision"      # the vision engine's artifacts, inside the engine directory


def check_vision_options(config: CompileConfig, plan) -> None:
    """What a multimodal compile cannot do yet, said before any work (``--text-only`` compiles the text model)."""
    if config.backend == "tensorrt":
        raise L4Error("the tensorrt backend does not build the vision engine; use --backend inductor or onnxruntime, "
                      "or --text-only to compile the text model alone")
    if plan is not None:
        raise L4Error("--plan (sharded engines) does not take image prompts yet; add --text-only to shard the "
                      "text model")


def compile_vision(vision, config: CompileConfig, progress: Progress, tol: float, dump_ir: Path | None):
    """The vision tower + projector -> a pass-rewritten vision Program (its own pipeline: ``programs=("vision",)``)."""
    from l4compile.vision.program import trace_vision

    module = vision.module
    with progress.stage("trace vision"):
        prog = trace_vision(module.vision_model, module.multi_modal_projector, max_tiles=vision.spec.max_tiles + 1,
                            device=config.device)
    reference = None
    if config.verify:
        with torch.no_grad():
            reference = module(*prog.example_inputs)
    with progress.stage("passes (vision)"):
        records = run_passes(prog, config, dump_ir=dump_ir, reference=reference, tolerance=tol,
                             on_pass=lambda n, s: progress.note(f"  vision pass {n}: {s:.2f}s"))
    return prog, records


@dataclass
class Lowered:
    """The text model after the frontend and the passes, placed on the compile device: what a backend builds."""

    program: Program
    loaded: frontend.LoadedModel     # .source, .vision (.model is dropped once traced)
    records: list                    # PassRecord per pass
    max_seq: int
    tolerance: float                 # verify's exact-pass bound for this dtype
    placed_bytes: int                # weights read from the source after the passes (--stream-weights)


def lower(model: str, config: CompileConfig, *, progress: Progress, dump_ir=None, plan=None) -> Lowered:
    """MODEL -> frontend -> trace -> passes -> ``Program.place``. Under ``config.stream_weights`` the model is traced
    on meta and its weights are read from ``LoadedModel.weights`` by the passes that need values (quantize) and by
    ``place``, one tensor at a time."""
    with progress.stage("load model"):
        loaded = frontend.load(model, dtype=config.dtype, device=config.device, seed=config.seed, layers=config.layers,
                               vision=not config.text_only, stream=config.stream_weights)
    lm, vision = loaded.model, loaded.vision
    if vision is not None:
        check_vision_options(config, plan)
    max_seq = resolve_max_seq(config, lm.config)
    with progress.stage("trace"):
        program = trace(lm, max_batch=config.max_batch_size, max_seq=max_seq,
                        device="meta" if loaded.weights is not None else config.device, image_inputs=vision is not None)
    program.weights = loaded.weights
    reference = None
    if config.verify:
        from l4compile.program import CausalLMHarness, MultimodalLMHarness
        with torch.no_grad():
            harness = MultimodalLMHarness(lm) if vision is not None else CausalLMHarness(lm)
            reference = harness(*program.example_inputs)
    tol = 1e-4 if config.dtype == "float32" else 3e-2
    with progress.stage("passes"):
        records = run_passes(program, config, dump_ir=Path(dump_ir) if dump_ir else None, reference=reference,
                             tolerance=tol, on_pass=lambda n, s: progress.note(f"  pass {n}: {s:.2f}s"))
    del lm
    loaded.model = None     # the float weights the passes replaced (quantize) are freed before the backend runs
    with progress.stage("place weights"):
        placed = program.place(config.device)   # streamed weights no pass read; tensors passes built elsewhere
    return Lowered(program, loaded, records, max_seq, tol, placed)


def compile(model: str, backend: str = "inductor", out: str | os.PathLike = "engine", **options) -> Engine:
    """Compile MODEL (checkpoint directory or preset) into an engine directory at ``out`` (``build``, which takes the
    options) and load it."""
    return load_engine(build(model, backend, out, **options), defer_shards=True)


def build(model: str, backend: str = "inductor", out: str | os.PathLike = "engine", *, quant: str = "none",
          dtype: str = "float32", device: str = "cpu", max_seq_len: int | None = None, max_batch_size: int = 4,
          seed: int = 0, layers: int | None = None, force: bool = False, passes: tuple[str, ...] = (),
          skip_passes: tuple[str, ...] = (), verify: bool = False, dump_ir: str | os.PathLike | None = None,
          pass_options: dict[str, dict[str, Any]] | None = None, progress: Progress | None = None,
          plan: str | os.PathLike | dict | None = None, text_only: bool = False,
          stream_weights: bool = False, inductor_configs: dict[str, Any] | None = None,
          tune_kernels: bool = False) -> Path:
    """Compile MODEL (checkpoint directory or preset) into an engine directory at ``out``; returns its path. The
    engine is not loaded: ``l4compile compile`` of full Scout Int4 would otherwise read its ~58 GB of weights back
    (and hash them again) only to print the manifest.
    With ``plan`` (``l4compile plan --json`` output), the sharding passes (shard_experts, and
    shard_tensor_parallel where the plan says TP) write one artifact set per rank. With ``stream_weights`` the
    model is traced on the meta device and its weights are read one at a time (``l4compile.weights``).
    ``inductor_configs`` (inductor backend): Inductor settings over l4compile's, e.g. ``{"max_autotune": True}``
    (``l4compile.inductor_configs``). ``tune_kernels`` (inductor on CUDA): the Int4 kernels' blocks are timed on this
    GPU first and the fastest built in (``l4compile.kernels.autotune``; manifest ``kernel_blocks``)."""
    for name, value in (("passes", passes), ("skip_passes", skip_passes)):
        if isinstance(value, (str, bytes)):   # a bare string would be read one character at a time
            raise L4Error(f"{name} takes a tuple of strings, got the string {value!r}; write ({value!r},)")
    if stream_weights and (verify or plan is not None):
        raise L4Error("--stream-weights cannot be combined with " + ("--verify (it compares against the float model "
                      "in memory)" if verify else "--plan (sharding slices weights in memory)")
                      + "; drop one of them")
    if plan is not None:   # sharded execution: the passes and options the plan's layout asks for
        from l4compile.plan.execution import pass_options_from_plan
        plan_options = pass_options_from_plan(plan, backend)
        pass_options = dict(pass_options or {}, **plan_options)
        passes = (*passes, *(f"l4compile.passes.{name}:{name}" for name in plan_options))
    check_pass_options(pass_options or {}, passes, skip_passes)
    config = CompileConfig(backend=backend, quant=quant, dtype=dtype, device=device, max_seq_len=max_seq_len,
                           max_batch_size=max_batch_size, seed=seed, layers=layers, passes=tuple(passes),
                           skip_passes=tuple(skip_passes), verify=verify, text_only=text_only,
                           stream_weights=stream_weights, tune_kernels=tune_kernels,
                           inductor_configs=check_inductor_configs(inductor_configs, backend),
                           pass_options=tuple((k, tuple(sorted(v.items())))
                                              for k, v in sorted((pass_options or {}).items())))
    require_device(config.device)
    from l4compile.backends import get_backend

    be = get_backend(config.backend)
    out = Path(out)
    check_out_dir(out, force)
    if dump_ir is not None:
        check_dir_path(dump_ir, "--dump-ir")
    progress = progress or Progress(enabled=False)
    t_start = time.perf_counter()
    # the checkpoint's tokenizer, chat template and end-of-sequence ids, checked before the model loads
    ckpt = frontend.checkpoint_dir(model)
    text = text_assets(ckpt, frontend.text_config_from_dict(frontend.read_config(ckpt)).vocab_size if ckpt else 0)
    low = lower(model, config, progress=progress, dump_ir=dump_ir, plan=plan)
    program, loaded, records, max_seq, vision = low.program, low.loaded, low.records, low.max_seq, low.loaded.vision
    vision_program, vision_records = None, []
    if vision is not None:
        vision_program, vision_records = compile_vision(vision, config, progress, low.tolerance,
                                                        Path(dump_ir) / "vision" if dump_ir else None)
    kv_layout = (program.gm.meta.get("l4_sharding") or {}).get("kv_cache") or program.kv_layout   # per rank
    if kv_layout is not None:
        sig = program.metadata["signature"]
        n = len(kv_layout["layers"])
        sig["inputs"] += [{"name": "start_pos", "dtype": "int64", "shape": [1]},
                          {"name": f"k_cache_i, v_cache_i for i < {n}", "dtype": kv_layout["dtype"],
                           "shape": kv_layout["shape"]}]
        sig["outputs"] += [{"name": f"k_cache_i', v_cache_i' for i < {n}", "dtype": kv_layout["dtype"],
                            "shape": kv_layout["shape"]}]
    kernel_blocks = None
    if config.tune_kernels:
        from l4compile.backends.inductor import qkv_rope_enabled
        from l4compile.backends.qkv_rope_fused import rope_qkv_match
        from l4compile.kernels.autotune import tune_program
        with progress.stage("tune kernels"):      # the qkv of RoPE layers timed as int4_mm_rope, as the engine runs it
            kernel_blocks = tune_program(program, config.dtype, log=progress.note,
                                         rope_qkv=rope_qkv_match if qkv_rope_enabled() else None)
    with engine_writer(out, force) as work, tuned_blocks.use(tuned_blocks.table_of(kernel_blocks)):
        with progress.stage(f"backend {config.backend}"):
            result = be.build(program, work, config)
        vision_manifest = None
        if vision_program is not None:
            with progress.stage(f"backend {config.backend} (vision)"):
                (work / VISION_DIR).mkdir()
                vres = be.build(vision_program, work / VISION_DIR, config)
            vision_manifest = {
                "artifacts": [f"{VISION_DIR}/{a}" for a in vres.artifacts], "image": vision.spec.to_dict(),
                "tokens": vision.tokens.to_dict(), "config": vision.config.to_dict(),
                "passes": [r.to_dict() for r in vision_records], "signature": vision_program.metadata["signature"],
                "max_tiles": vision_program.max_batch, "feature_placement": "runtime scatter + in-graph select",
                "backend_info": vres.info,
            }
            result.artifacts.extend(vision_manifest["artifacts"])
            result.digests.update({f"{VISION_DIR}/{a}": d for a, d in vres.digests.items()})
        text_files, text_manifest = text.write(work)
        manifest = {
            "backend": config.backend, "quant": config.quant, "dtype": config.dtype, "device": config.device,
            "max_seq_len": max_seq, "max_batch_size": config.max_batch_size,
            "model_config": program.model_config.to_dict(), "model_source": loaded.source,
            "compile_config": config.to_dict(), "config_hash": config.stable_hash(),
            "passes": [r.to_dict() for r in records], "signature": program.metadata["signature"],
            "weight_bytes": next((r.stats["weight_bytes"] for r in records
                                  if r.name == "quantize" and "weight_bytes" in r.stats), None),
            "kv_cache": kv_layout, "sharding": program.gm.meta.get("l4_sharding"),
            "streamed_weight_bytes": low.placed_bytes if config.stream_weights else None,
            "backend_info": result.info, "kernel_blocks": kernel_blocks, "vision": vision_manifest, **text_manifest,
            "versions": library_versions(),
            "stage_seconds": progress.stages, "compile_seconds": round(time.perf_counter() - t_start, 3),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (work / "README.md").write_text(render_engine_readme(manifest, out))
        write_manifest(work, manifest, [*result.artifacts, *text_files, "README.md"], result.digests)
    progress.note(f"engine written to {out}")
    # The compile's graphs go before an engine loads its own copy of the weights: full Scout Int4 is ~58 GB on one
    # GPU, twice that does not fit in 80 GB.
    low.program = low.loaded = None
    del program, vision_program, loaded, vision
    release_memory()
    return out


def release_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
