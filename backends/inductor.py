"""Inductor backend: the Program is re-exported (dynamic batch and sequence) and compiled ahead of time
with AOTInductor into one ``model.pt2`` package that loads in a fresh process with only torch and
l4compile (for its custom ops) importable; transformers is not needed at run time.

Before compiling, l4 ops that have an aten decomposition (``l4compile.ops.DECOMPOSITIONS``: attention) are
inlined so Inductor generates their code; the rest (``l4.moe``) run through AOTInductor's proxy executor.
For ``--device cuda`` the GPU kernels are compiled in as well (``l4compile.kernels.dispatch``): the fused Triton
MoE, the Triton Int4 GEMM and ``torch._scaled_mm`` for FP8.
With the kv_cache pass the package is one step graph serving both prefill and decode.

Weights live OUTSIDE the package: it is compiled with ``aot_inductor.package_constants_in_so=False`` and the
graph's constants go to ``weights.safetensors`` beside it (written tensor by tensor, ``l4compile.tensorfile``),
which ``load`` reads onto the engine's device and hands to the package (``load_constants``, user-managed: no
copy). So the weights are on disk once (AOTI would otherwise write them into the .so, then again into the .pt2
zip, and extract them once more at load: three copies of ~58 GB for full Scout Int4), and they are loaded from
safetensors only. Engines from before this layout (constants inside the .so) still load.

KV caches are updated in place (``backend_info["caches"] == "in_place"``): the packaged step writes each layer's
new cache into the cache tensor it was given (``aten.copy_`` into the input, which Inductor folds into the
attention's ``index_copy``: only the T new rows are written) and returns the logits; ``load``'s runner returns
``(logits, *caches)`` with those same tensors, so callers see the step contract of every backend. A functional
step reads and writes a whole new cache per layer and step, and the static decoder copies it back: 4x the cache's
bytes, at Scout dimensions with 8K slots (33.5 MB of bf16 k + v a layer) about as much as the layer's Int4 weights.
Engines from before this (functional caches) still load.

Two runtimes load the same engine (``L4COMPILE_INDUCTOR_RUNNER``):
  aoti  (default) the AOTInductor package, C++ launches, no Python in the step;
  jit   ``program.pt2``: the exported program the package was compiled from, saved without its weights (meta
        tensors; 1-2 MB for the test models, the graph alone), given weights.safetensors and compiled in-process
        by ``torch.compile`` with the engine's Inductor settings on first use of each shape class (B, T = 1 or
        > 1; ``_with_dynamic_dims``). Same graph, same kernels (the Triton ops on CUDA), same numerics up to
        Inductor's fusion choices; Python launches every kernel, so decode wants CUDA graphs (decode mode "graph",
        the default on CUDA). For hosts whose AOTInductor cannot load a CUDA package (the lent H200 image of
        2026-12-04 segfaulted in ``aoti_load_package`` even for an nn.Linear), and for comparing the two runtimes.
        Engines from before it have no ``program.pt2`` and load with aoti only."""
from __future__ import annotations

import logging
import operator
import os
from pathlib import Path
from typing import Any

import torch

from l4compile.backends import BuildResult
from l4compile.errors import L4Error

from .aoti_fp8_header import install as install_fp8_header
from .moe_norm_fused import moe_norm_fused
from .norm_router_fused import norm_router_fused
from .qkv_rope_fused import qkv_rope_fused

ARTIFACT = "model.pt2"
WEIGHTS = "weights.safetensors"
PROGRAM = "program.pt2"         # the exported program without weights (the jit runtime)
RUNNER_ENV = "L4COMPILE_INDUCTOR_RUNNER"
RUNNERS = ("aoti", "jit")
NORM_ROUTER_ENV = "L4COMPILE_NORM_ROUTER"
ATTENTION_MERGE_ENV = "L4COMPILE_ATTENTION_MERGE"
MOE_NORM_ENV = "L4COMPILE_MOE_NORM"
QKV_ROPE_ENV = "L4COMPILE_QKV_ROPE"
# what a CUDA engine's manifest counts in backend_info: the step's calls of each fused op (of any of the ops named)
FUSED_OPS = {"norm_router_fused": ("l4.add_rms_norm_router.default",),
             "attention_merged": ("l4.attention_fused_chained.default",),
             "moe_norm_fused": ("l4.moe_fused_norm.default", "l4.moe_q_fused_norm.default",
                                "l4.moe_fp8_fused_norm.default"),
             "qkv_rope_fused": ("l4.int4_mm_rope.default", "l4.int4_mm_rope_chained.default")}


def build(program, workdir: Path, config) -> BuildResult:
    import l4compile.ops

    shards = program.gm.meta.get("l4_shards")   # shard_experts (compile --plan): one package per rank
    if shards:
        import dataclasses
        arts, digests = [], {}
        for r, gm in enumerate(shards):
            (workdir / f"rank{r}").mkdir()
            in_place, digest, fused = _package(dataclasses.replace(program, gm=gm), workdir / f"rank{r}",
                                               config.device, dict(config.inductor_configs))
            arts += [f"rank{r}/{ARTIFACT}", f"rank{r}/{WEIGHTS}", f"rank{r}/{PROGRAM}"]
            digests[f"rank{r}/{WEIGHTS}"] = digest
        return BuildResult(arts, {"format": "aoti-package", "torch": torch.__version__, "ranks": len(shards),
                                  "weights": WEIGHTS, "program": PROGRAM,
                                  **({"caches": "in_place"} if in_place else {}), **_fusions(config, fused)},
                           digests)
    in_place, digest, fused = _package(program, workdir, config.device, dict(config.inductor_configs))
    return BuildResult([ARTIFACT, WEIGHTS, PROGRAM], {"format": "aoti-package", "torch": torch.__version__,
                                                      "weights": WEIGHTS, "program": PROGRAM,
                                                      **({"caches": "in_place"} if in_place else {}),
                                                      **_fusions(config, fused)},
                       {WEIGHTS: digest})


def _fusions(config, fused: dict[str, int]) -> dict:
    """backend_info of a CUDA engine: how many MoE layers run their residual add, norm and router as one kernel
    (``norm_router_fused``; 0 with ``L4COMPILE_NORM_ROUTER=0``), how many attention layers merge their key splits
    in the partial kernel (``attention_merged``; 0 with ``L4COMPILE_ATTENTION_MERGE=0``) and how many MoE layers
    combine, add the residual and norm the next layer's input in their own launches (``moe_norm_fused``; 0 with
    ``L4COMPILE_MOE_NORM=0``) and how many RoPE layers transform their keys in their qkv GEMM's epilogue
    (``qkv_rope_fused``; 0 with ``L4COMPILE_QKV_ROPE=0``)."""
    return dict(fused) if config.device == "cuda" else {}


def caches_in_place(gm: torch.fx.GraphModule, attention_in_place=None) -> torch.fx.GraphModule | None:
    """A kv-cached step graph ``(.., start_pos, *caches) -> (logits, *caches')`` rewritten to write every ``caches'``
    into its input cache (``aten.copy_``) and return ``logits`` alone; None for a graph without caches. The new
    GraphModule shares ``gm``'s parameters (no copy); ``gm`` is left as it is.

    ``attention_in_place``: a function with ``l4::attention_cached``'s arguments that returns its attention output
    alone and writes the new caches into the caches it was given (CUDA: ``kernels.dispatch
    .attention_cached_in_place``). Each ``l4::attention_cached`` whose two new caches are the step's new values of its
    own input caches, read by nothing else, becomes a call of it, with no ``copy_`` of those caches."""
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    names = [n.name for n in phs]
    if "start_pos" not in names:
        return None
    caches = phs[names.index("start_pos") + 1:]
    graph = torch.fx.Graph()
    env: dict = {}
    logits, *new = graph.graph_copy(gm.graph, env)
    if len(new) != len(caches) or not caches:
        raise L4Error(f"inductor: a step graph with {len(caches)} cache inputs returns {len(new)} caches")
    returned = {fresh: env[ph] for ph, fresh in zip(caches, new)}      # new cache -> the input cache it replaces
    written = set()
    for node in list(graph.nodes) if attention_in_place is not None else ():
        if node.target is not torch.ops.l4.attention_cached.default:
            continue
        outs = {u.args[1]: u for u in node.users if u.target is operator.getitem}   # 0: out, 1 / 2: new caches
        k_in, v_in = node.args[3], node.args[4]
        own_caches = (len(outs) == len(node.users) and {1, 2} <= outs.keys()     # each output taken once
                      and returned.get(outs[1]) is k_in and returned.get(outs[2]) is v_in)
        if not own_caches or outs[1].users or outs[2].users or len(k_in.users) + len(v_in.users) != 2:
            continue                                       # a cache, old or new, read elsewhere: keep the copy_
        with graph.inserting_after(node):
            call = graph.call_function(attention_in_place, node.args, node.kwargs)
        if 0 in outs:
            outs[0].replace_all_uses_with(call)
        written |= {k_in, v_in}
    for ph, fresh in zip(caches, new):
        if env[ph] not in written:
            graph.call_function(torch.ops.aten.copy_.default, (env[ph], fresh))
    graph.output(logits)
    graph.eliminate_dead_code()
    out = torch.fx.GraphModule(gm, graph, class_name="L4StepInPlace")
    out.meta.update(gm.meta)
    return out


def split_k_locks_chained(gm: torch.fx.GraphModule, chains: dict, words: int) -> torch.fx.GraphModule | None:
    """``gm`` with the calls that take zeroed counters chained, in graph order: the first takes a block of ``words``
    int32 zeros (the graph's one fill), and each returns, beside its output, the zeroed block the next one takes.
    ``chains``: call target -> (its chained form: the call's arguments and the block -> (its output, the next block),
    whether a call joins: ``joins(*args)``, each argument the tensor where it is a ``get_attr``, None where it is
    another node, else the constant itself). CUDA: ``l4::linear_int4`` whose weights may split K ->
    ``kernels.dispatch.linear_int4_chained`` (``linear_int4_rope`` -> ``linear_int4_rope_chained`` alike), and the
    in-place attention -> ``attention_cached_chained``; each launch leaves its own block zeros and zeroes the next.
    Counters then cost no memset launch of their own; each block has one reader, so Inductor writes the counters in
    place and copies nothing. None where no call joins; ``gm`` is left as it is."""
    def attr(arg):
        if not isinstance(arg, torch.fx.Node):
            return arg
        return operator.attrgetter(arg.target)(gm) if arg.op == "get_attr" else None

    graph = torch.fx.Graph()
    env: dict = {}
    graph.output(graph.graph_copy(gm.graph, env))
    calls = [n for n in graph.nodes if n.op == "call_function" and n.target in chains
             and chains[n.target][1](*map(attr, n.args))]
    if not calls:
        return None
    with graph.inserting_before(calls[0]):
        lock = graph.call_function(torch.ops.aten.new_zeros.default, (calls[0].args[0], [words]),
                                   {"dtype": torch.int32})
    for node in calls:
        with graph.inserting_before(node):                # in creation order, before the call they replace
            pair = graph.call_function(chains[node.target][0], (*node.args, lock), dict(node.kwargs))
            out = graph.call_function(operator.getitem, (pair, 0))
            lock = graph.call_function(operator.getitem, (pair, 1))
        node.replace_all_uses_with(out)
        graph.erase_node(node)
    graph.erase_node(lock)                                 # the last call's next block: nobody takes it
    out = torch.fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    out.meta.update(gm.meta)
    return out


# What every package is compiled with (aoti_compile_and_package's inductor_configs); a compile's own settings
# (CompileConfig.inductor_configs, `--inductor-config`) go beside them, never over these keys
# (l4compile.inductor_configs refuses them).
AOTI_CONFIGS = {"aot_inductor.package_constants_in_so": False}


def norm_router_enabled() -> bool:
    """Whether CUDA engines fuse each MoE layer's residual add, norm and router (``norm_router_fused``): yes, unless
    ``L4COMPILE_NORM_ROUTER=0`` (to measure a step without it; the manifest's ``backend_info`` says which)."""
    return os.environ.get(NORM_ROUTER_ENV, "1").strip() != "0"


def attention_merge_enabled() -> bool:
    """Whether CUDA engines chain their in-place attention (``l4::attention_fused_chained``: the key splits merged
    and the caches written in the partial kernel, one launch at decode): yes, unless ``L4COMPILE_ATTENTION_MERGE=0``
    (the combine launch then merges, as before; the manifest's ``backend_info`` says which)."""
    return os.environ.get(ATTENTION_MERGE_ENV, "1").strip() != "0"


def moe_norm_enabled() -> bool:
    """Whether CUDA engines fold each MoE layer's combine, the residual add after it and the next RMSNorm into the
    fused MoE's launches (``moe_norm_fused``; it builds on ``norm_router_fused``): yes, unless
    ``L4COMPILE_MOE_NORM=0`` (to measure a step without it; the manifest's ``backend_info`` says which)."""
    return os.environ.get(MOE_NORM_ENV, "1").strip() != "0"


def qkv_rope_enabled() -> bool:
    """Whether CUDA engines transform each RoPE layer's keys in the epilogue of its Int4 qkv GEMM
    (``qkv_rope_fused``): yes, unless ``L4COMPILE_QKV_ROPE=0`` (to measure a step without it; the manifest's
    ``backend_info`` says which)."""
    return os.environ.get(QKV_ROPE_ENV, "1").strip() != "0"


def export_for_aoti(program, device: str = "cpu") -> tuple[torch.export.ExportedProgram, bool]:
    """The Program as AOTInductor compiles it: caches written in place (text step graphs), for CUDA each RoPE
    layer's key transform in its Int4 qkv GEMM's epilogue (``qkv_rope_fused``), the Int4 GEMMs that split K and
    the in-place attention chained by their counters (``split_k_locks_chained``), each MoE
    layer's residual add, norm and router in one kernel (``norm_router_fused``) and its combine, the residual add
    after it and the next norm in the MoE's own launches (``moe_norm_fused``), l4 ops decomposed (plain aten, and
    for CUDA the Triton kernel ops and ``_scaled_mm``). Returns (the exported program, whether its caches are updated
    in place)."""
    import dataclasses

    import l4compile.ops

    attention_in_place = None
    if device == "cuda":
        from l4compile.kernels.dispatch import attention_cached_in_place as attention_in_place
    in_place = caches_in_place(program.gm, attention_in_place) if program.kind == "text" else None
    if in_place is not None:
        program = dataclasses.replace(program, gm=in_place)
    if device == "cuda":           # with Triton: the step's kernel-level rewrites
        from l4compile.kernels.dispatch import (attention_cached_chained, int4_mm_splits, int4_rope_splits,
                                                linear_int4_chained, linear_int4_rope, linear_int4_rope_chained,
                                                load_triton_ops, moe_q_routed, moe_q_routed_norm, moe_routed,
                                                moe_routed_norm, residual_norm_router)
        from l4compile.kernels.layout import SPLIT_K_LOCK_WORDS
        if load_triton_ops() and attention_in_place is not None and qkv_rope_enabled():   # k RoPE in the qkv GEMM
            fused, _ = qkv_rope_fused(program.gm, {attention_in_place}, linear_int4_rope)
            program = dataclasses.replace(program, gm=fused)
        if load_triton_ops():      # Int4 GEMMs that split K and the attention hand each other zeroed counters
            chains = {torch.ops.l4.linear_int4.default: (linear_int4_chained, lambda x, w, s: int4_mm_splits(w, s)),
                      linear_int4_rope: (linear_int4_rope_chained, int4_rope_splits)}
            if attention_in_place is not None and attention_merge_enabled():
                chains[attention_in_place] = (attention_cached_chained, lambda *args: True)
            chained = split_k_locks_chained(program.gm, chains, SPLIT_K_LOCK_WORDS)
            if chained is not None:
                program = dataclasses.replace(program, gm=chained)
        if load_triton_ops() and norm_router_enabled():   # each MoE layer's residual add + norm + router: one launch
            routed = {torch.ops.l4.moe.default: moe_routed, torch.ops.l4.moe_q.default: moe_q_routed}
            fused, _ = norm_router_fused(program.gm, residual_norm_router, routed)
            if moe_norm_enabled():      # and its combine, the residual add after it and the next norm: in its launches
                fused, _ = moe_norm_fused(fused, {moe_routed: moe_routed_norm, moe_q_routed: moe_q_routed_norm})
            program = dataclasses.replace(program, gm=fused)
    decomps = dict(l4compile.ops.DECOMPOSITIONS)                             # attention becomes plain aten
    if device == "cuda":   # l4::moe / linear_int4 -> Triton triton_ops, linear_fp8 -> _scaled_mm (compiled in)
        from l4compile.kernels.dispatch import cuda_decompositions
        decomps.update(cuda_decompositions())
    return program.export().run_decompositions(decomps), in_place is not None


def _package(program, outdir: Path, device: str = "cpu",
             extra_configs: dict[str, Any] | None = None) -> tuple[bool, str, int]:
    """``outdir``/model.pt2 (code only) + ``outdir``/weights.safetensors (every constant the package reads), compiled
    with AOTI_CONFIGS and ``extra_configs`` (the compile's Inductor settings), + ``outdir``/program.pt2 (the exported
    program they come from, weights left out). Returns (whether the package updates its KV caches in place, the
    sha256 of weights.safetensors, hashed as it was written, ``FUSED_OPS``' counts of calls in the program)."""
    import hashlib

    from l4compile import tensorfile

    install_fp8_header()                                    # torch 2.11's CPU wrapper lacks the float8 type
    ep, in_place = export_for_aoti(program, device)
    save_program(ep, outdir / PROGRAM)                      # functional: before mutations_in_place changes ep
    constants = {k: v for k, v in {**ep.state_dict, **ep.constants}.items() if isinstance(v, torch.Tensor)}
    digest = hashlib.sha256()
    tensorfile.write(outdir / WEIGHTS, constants, hasher=digest)
    with torch.no_grad():
        torch._inductor.aoti_compile_and_package(mutations_in_place(ep), package_path=str(outdir / ARTIFACT),
                                                 inductor_configs={**(extra_configs or {}), **AOTI_CONFIGS})
    targets = [str(n.target) for n in ep.graph.nodes]
    return in_place, digest.hexdigest(), {key: sum(map(targets.count, ops)) for key, ops in FUSED_OPS.items()}


def mutations_in_place(ep: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """``ep`` (changed in place) as AOTInductor and the jit runtime compile it: each functionalized call of a
    mutating op (``auto_functionalized``: a CUDA step's ``l4::attention_fused_inplace`` or ``_chained``, which writes
    its layer's caches) back to the call that mutates its inputs. Functionalized, Inductor would keep the triton_op
    opaque (an AOTI proxy-executor call, on copies of the caches); in place, it traces the op into its Triton kernels,
    which write the caches they are given. Sound here because ``caches_in_place`` left each cache no other
    reader. After this ``ep`` fails export's verifier (its graph is not functional): save it first. Any other
    mutating op is refused: nothing has shown that writing its inputs in place is sound."""
    from torch._higher_order_ops.auto_functionalize import auto_functionalized, auto_functionalized_v2
    from torch.export._remove_auto_functionalized_pass import unsafe_remove_auto_functionalized_pass

    mutating = {str(n.args[0]) for n in ep.graph.nodes if n.target in (auto_functionalized, auto_functionalized_v2)}
    if mutating - {"l4.attention_fused_inplace.default", "l4.attention_fused_chained.default"}:
        raise L4Error(f"inductor: the step calls mutating ops that are not known to be safe in place: "
                      f"{sorted(mutating)}")
    return unsafe_remove_auto_functionalized_pass(ep)


def in_place_module(ep: torch.export.ExportedProgram) -> torch.fx.GraphModule:
    """``mutations_in_place(ep).module()`` (``ep`` changed in place) without the ``copy_(cache, cache)`` that
    unlifting writes for each mutated input, and without export's shape guards: what the jit runtime compiles.
    Tracing a CUDA step graph's decompositions (``export_for_aoti``: stride comparisons in ``_to_copy``, a
    contiguity check) records guards from its example step: T > 1 and B != 1. ``module()`` asserts them on every
    call, and torch.compile keeps the assert, so every decode step (T = 1) and every batch of one would fail there;
    AOTInductor never checks them. The input ranges (``range_constraints``: T, B >= 1) are still checked."""
    from torch.export._remove_auto_functionalized_pass import remove_self_clone

    module = mutations_in_place(ep).module(check_guards=False)
    remove_self_clone(module.graph)
    module.recompile()
    return module


def save_program(ep: torch.export.ExportedProgram, path: Path) -> None:
    """``ep`` without its weights (every state_dict / constants tensor as a meta tensor of its shape and dtype), as
    ``torch.export.save`` writes it: the graph, its signature and the custom ops it calls by name."""
    torch.export.save(_with_tensors(ep, lambda name, t: torch.empty_like(t, device="meta")), path)


def _with_tensors(ep: torch.export.ExportedProgram, fn) -> torch.export.ExportedProgram:
    """``ep`` with every state_dict / constants tensor ``t`` (named ``name``) replaced by ``fn(name, t)``; parameters
    stay parameters (export's verifier asks for them). The graph is shared, not copied."""
    def swap(name: str, t):
        if not isinstance(t, torch.Tensor):
            return t
        new = fn(name, t)
        return torch.nn.Parameter(new, requires_grad=False) if isinstance(t, torch.nn.Parameter) else new
    return ep._update(ep.graph_module, ep.graph_signature,
                      state_dict={k: swap(k, v) for k, v in ep.state_dict.items()},
                      constants={k: swap(k, v) for k, v in ep.constants.items()})


def runner_kind() -> str:
    """The runtime ``load`` uses: ``L4COMPILE_INDUCTOR_RUNNER`` (aoti | jit), default aoti."""
    import os

    kind = os.environ.get(RUNNER_ENV, "").strip() or "aoti"
    if kind not in RUNNERS:
        raise L4Error(f"{RUNNER_ENV}={kind!r} is not a runtime of Inductor engines; choose one of: "
                      + ", ".join(RUNNERS))
    return kind


class ScalarPackageIsaFilter(logging.Filter):
    """Drops torch's load-time warning that a package of scalar C++ kernels (``cpp.simdlen=0``: AOTI_CPU_ISA
    "INVALID_VEC_ISA") was built for another ISA than this CPU's: scalar code runs on any CPU. Every other warning of
    the loader (a vectorized package on a CPU without its ISA) stays."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        return not (len(args) == 3 and args[0] == "AOTI_CPU_ISA" and args[2] == "INVALID_VEC_ISA")


_PACKAGE_LOGGER = "torch.export.pt2_archive._package"


def load(engine_dir: Path, manifest: dict[str, Any]):
    import l4compile.ops  # noqa: F401  (registers the custom ops the package may call)

    kind = runner_kind()
    if manifest["device"] == "cuda" and not torch.cuda.is_available():
        raise L4Error(f"engine {engine_dir} was built for CUDA and this machine has no CUDA GPU")
    if manifest["device"] == "cuda":   # l4::moe_fused / l4::int4_mm, should the package call them as ops
        from l4compile.kernels.dispatch import load_triton_ops
        load_triton_ops()
    rank_dir = engine_dir
    if manifest.get("sharding"):   # this process's rank (load_engine checked the process group)
        import torch.distributed as dist
        rank_dir = engine_dir / f"rank{dist.get_rank()}"
    n_caches = 2 * len(manifest["kv_cache"]["layers"]) if (manifest.get("backend_info") or {}).get("caches") \
        == "in_place" else 0
    if kind == "jit":
        return _load_jit(rank_dir, manifest, n_caches)
    # CUDA: the single-threaded runner, which a CUDA graph can capture (Engine decode mode "graph"); the default
    # runner's cross-thread event bookkeeping is refused while a stream captures (pytorch/pytorch#148601).
    isa_filter, logger = ScalarPackageIsaFilter(), logging.getLogger(_PACKAGE_LOGGER)
    logger.addFilter(isa_filter)
    try:
        pkg = torch._inductor.aoti_load_package(str(rank_dir / ARTIFACT),
                                                run_single_threaded=manifest["device"] == "cuda")
    finally:
        logger.removeFilter(isa_filter)
    weights = None
    if (manifest.get("backend_info") or {}).get("weights"):
        weights = _load_weights(pkg, rank_dir / WEIGHTS, manifest["device"])
    run = _step_runner(pkg, n_caches)
    run.weights = weights          # user-managed constants: they must live as long as the package
    run.runtime = "aoti"
    return run


def _step_runner(fn, n_caches: int):
    """``fn`` (the package, or the compiled program) as the backend step contract: ``(logits, *caches)`` where ``fn``
    wrote the caches into its cache inputs (``n_caches`` of them, last) and returned the logits alone."""
    def run(*inputs: torch.Tensor):
        if n_caches:
            out = fn(*inputs)
            return (out if isinstance(out, torch.Tensor) else out[0], *inputs[len(inputs) - n_caches:])
        return fn(*inputs)
    return run


def _load_jit(rank_dir: Path, manifest: dict[str, Any], n_caches: int):
    """The jit runtime: program.pt2 with weights.safetensors' tensors (no copy), compiled by ``torch.compile`` with
    the engine's Inductor settings (lazily: each shape class compiles on its first call)."""
    info = manifest.get("backend_info") or {}
    if not info.get("program") or not info.get("weights"):
        raise L4Error(f"engine {rank_dir} has no {PROGRAM} (compiled before the jit runtime existed): recompile it, "
                      f"or load it with {RUNNER_ENV}=aoti")
    ep = torch.export.load(rank_dir / PROGRAM)
    weights = _read_weights(rank_dir / WEIGHTS, manifest["device"],
                            [k for k, v in {**ep.state_dict, **ep.constants}.items() if isinstance(v, torch.Tensor)])
    module = in_place_module(_with_tensors(ep, lambda name, t: weights[name]))
    configs = {k: v for k, v in (manifest.get("compile_config") or {}).get("inductor_configs") or ()
               if not k.startswith("aot_inductor.")}
    compiled = _with_dynamic_dims(torch.compile(module, options=configs or None), dynamic_dims(ep))
    run = _step_runner(_with_kernel_blocks(compiled, manifest), n_caches)
    run.weights = weights
    run.runtime = "jit"
    return run


def dynamic_dims(ep: torch.export.ExportedProgram) -> tuple[tuple[tuple[int, int], ...], ...]:
    """The input sizes the exported step left symbolic, one group per symbol: each a tuple of (user input position,
    dim) that share it. Here B (``input_ids`` dim 0 and each cache's dim 0) and T (``input_ids`` dim 1); one graph
    serves them in the AOTInductor package."""
    from torch.export.graph_signature import InputKind

    vals = {n.name: n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder"}
    users = [vals[s.arg.name] for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
    groups: dict[str, list[tuple[int, int]]] = {}
    for i, v in enumerate(users):
        for d, size in enumerate(v.shape if isinstance(v, torch.Tensor) else ()):
            if isinstance(size, torch.SymInt):
                groups.setdefault(str(size), []).append((i, d))
    return tuple(tuple(g) for g in groups.values())


def _with_dynamic_dims(fn, groups: tuple[tuple[tuple[int, int], ...], ...]):
    """``fn`` (torch.compile'd) compiling once per shape class: which of the symbolic sizes (``dynamic_dims``'
    ``groups``) are > 1. A class's first call marks its sizes > 1 dynamic before torch.compile sees them, so its
    one graph serves every later prompt length and batch of the class. Left to automatic dynamic, a class's first
    size compiles static and its second compiles again. The symbolic compile costs more (48 Scout layers' prefill
    for sm_90a on a 2-core CPU: 138 s, static 117 s) but is the only one the class pays. Sizes of 1 stay
    specialised (torch.compile's rule), so decode (T = 1) and a batch of one get graphs of their own, static at
    batch 1: four at most. A call reads one size a symbol (2 for Scout's 98 inputs); only a class's first call
    marks."""
    seen: set[tuple[bool, ...]] = set()

    def call(*inputs):
        cls = tuple(inputs[g[0][0]].shape[g[0][1]] > 1 for g in groups)
        if cls not in seen:
            seen.add(cls)
            for wide, g in zip(cls, groups):
                if wide:
                    for i, d in g:
                        torch._dynamo.maybe_mark_dynamic(inputs[i], d)
        return fn(*inputs)
    return call


def _with_kernel_blocks(fn, manifest: dict[str, Any]):
    """``fn`` calling with the engine's tuned kernel blocks active (manifest ``kernel_blocks``, ``compile
    --tune-kernels``): torch.compile traces the l4 kernel ops' bodies at a call, and they must launch the blocks the
    engine was tuned with, as its AOTInductor package does. ``fn`` itself where the engine has none."""
    from l4compile.kernels import tuned_blocks

    try:
        table = tuned_blocks.table_of(manifest.get("kernel_blocks"))
    except (KeyError, TypeError, ValueError) as e:
        raise L4Error(f"engine manifest: its kernel_blocks are not a tuning record ({e}); recompile the engine") \
            from None
    if not table:
        return fn

    def call(*inputs):
        with tuned_blocks.use(table):
            return fn(*inputs)
    return call


def _read_weights(path: Path, device: str, names) -> dict[str, torch.Tensor]:
    """weights.safetensors on the engine's device; every constant in ``names`` (what the runtime reads) must be
    there."""
    from l4compile import tensorfile

    dev = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device(device)
    weights = tensorfile.read(path, dev)
    missing = sorted(set(names) - set(weights))
    if missing:
        raise L4Error(f"{path} lacks the engine constant '{missing[0]}'" +
                      (f" and {len(missing) - 1} more" if len(missing) > 1 else "") + "; recompile the engine")
    return weights


def _load_weights(pkg, path: Path, device: str) -> dict[str, torch.Tensor]:
    """weights.safetensors -> the package's constants (no copy)."""
    weights = _read_weights(path, device, pkg.get_constant_fqns())
    pkg.load_constants({k: weights[k] for k in pkg.get_constant_fqns()}, check_full_update=True, user_managed=True)
    return weights
