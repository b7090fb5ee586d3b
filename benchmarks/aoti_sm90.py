"""Generate, on a machine without a GPU, the AOTInductor engine that ``l4compile compile --backend inductor --device
cuda`` builds for an H100: its C++ wrapper, with every Triton kernel compiled for sm_90a; then check the wrapper.

    python benchmarks/aoti_sm90.py [--preset tiny] [--quant int4|fp8|none] [--dtype bfloat16] [--max-seq-len 256]
                                   [--layers N] [--inductor-config KEY=VALUE ...] [--int4-split-k S]
                                   [--kernel-blocks FILE] [--out DIR] [--json FILE]

How: the preset is lowered on the CPU (frontend, passes) and exported by ``backends/inductor.py``'s own
``export_for_aoti`` for ``cuda`` (caches written in place, l4 ops decomposed into the Triton kernel ops). The
ExportedProgram is then re-pointed at a CUDA device of fake tensors (no memory) and given to
``aoti_compile_and_package`` with the package's configs, under ``_fake_h100``'s stand-in for a CUDA runtime. The
graph, the lowering of l4's triton_ops, fusion, the memory plan, mutation handling, grid expressions and kernel code
are Inductor's own. Not faithful: the pattern matcher and the joint-graph constant folding are off, and Inductor's
own kernels get the first of their candidate configurations (nothing can be timed). Generation stops at the C++
compile (no CUDA toolkit here); ``--out`` keeps the wrapper.

Checks (exit 1 when one fails; a GPU session would fail on them, or lose its bandwidth):
  kernels    every l4 kernel op of the exported graph is launched from the wrapper: attention_fused as its partial
             and combine kernels, moe_fused / moe_q_fused / moe_fp8_fused as their routing, gate_up and down kernels,
             int4_mm (and int4_mm_rope, a RoPE layer's qkv) as its kernel, add_rms_norm_router (each MoE layer's residual add, norm and router) as its kernel
  opaque     no op runs through the proxy executor (an opaque op would be an eager kernel outside the engine)
  caches     each KV cache input is first read by its layer's attention kernel (one), written after that read, and
             never cloned or copied whole; with l4::attention_fused_inplace / _chained, written by that op's own
             launches (the combine, and the chained partial kernel that reads it) and by no other kernel
  program    the engine's program.pt2 (the jit runtime's graph, weights left out) calls the same l4 kernel ops after
             torch.export.save and load, and holds no weight data
"""
# L layers, S key splits
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

# l4 kernel op -> the kernels its triton_op body launches (the MoE ops: top-1 routing, as every preset has)
KERNELS = {"l4.attention_fused.default": ("attention_partial_kernel", "attention_combine_kernel"),
           "l4.attention_fused_inplace.default": ("attention_partial_kernel", "attention_combine_kernel"),
           "l4.attention_fused_chained.default": ("attention_partial_kernel", "attention_combine_kernel"),
           "l4.moe_fused.default": ("moe_route_kernel", "moe_gate_up_kernel", "moe_down_kernel"),
           "l4.moe_q_fused.default": ("moe_route_kernel", "moe_int4_gate_up_kernel", "moe_int4_down_kernel"),
           "l4.moe_fp8_fused.default": ("moe_route_kernel", "moe_fp8_gate_up_kernel", "moe_fp8_down_kernel"),
           "l4.moe_fused_norm.default": ("moe_route_kernel", "moe_gate_up_kernel", "moe_down_kernel",
                                         "moe_norm_kernel"),
           "l4.moe_q_fused_norm.default": ("moe_route_kernel", "moe_int4_gate_up_kernel", "moe_int4_down_kernel",
                                           "moe_norm_kernel"),
           "l4.moe_fp8_fused_norm.default": ("moe_route_kernel", "moe_fp8_gate_up_kernel", "moe_fp8_down_kernel",
                                             "moe_norm_kernel"),
           "l4.int4_mm.default": ("int4_mm_kernel",), "l4.int4_mm_chained.default": ("int4_mm_kernel",),
           "l4.int4_mm_rope.default": ("int4_mm_kernel",), "l4.int4_mm_rope_chained.default": ("int4_mm_kernel",),
           "l4.add_rms_norm_router.default": ("add_rms_norm_router_kernel",)}
# ops whose Int4 GEMMs launch these kernels once more with their prefill blocks (``layout.INT4_PREFILL_ROWS``: the
# decode and the prefill launch of a step, one with an empty grid), where their weights have such blocks
PREFILL_KERNELS = {op: tuple(k for k in kernels if k != "moe_norm_kernel") for op, kernels in KERNELS.items()
                   if op.startswith(("l4.int4_mm", "l4.moe_q_fused"))}


def export_cuda(preset: str, quant: str, dtype: str, max_seq: int, layers: int | None):
    """(ExportedProgram for CUDA on CPU tensors, names of its cache inputs in order)."""
    from backends.inductor import export_for_aoti
    from l4compile.compiler import lower
    from l4compile.config import CompileConfig
    from l4compile.errors import L4Error
    from l4compile.progress import Progress

    config = CompileConfig(backend="inductor", quant=quant, dtype=dtype, device="cpu", max_seq_len=max_seq,
                           layers=layers, text_only=True)
    program = lower(preset, config, progress=Progress(enabled=False)).program
    ep, in_place = export_for_aoti(program, "cuda")
    if not in_place:
        raise L4Error(f"{preset}: the program has no KV caches (the kv_cache pass did not run)")
    names = [s.arg.name for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    return ep, names[names.index("start_pos") + 1:]


def to_fake_cuda(ep):
    """Re-point ``ep`` (in place) at cuda:0: its weights, example inputs and node values become fake CUDA tensors of
    the same shapes (symbolic ones included) in ``ep``'s own fake mode; device arguments name cuda:0."""
    import torch
    from torch._guards import detect_fake_mode
    from torch.utils import _pytree as pytree

    mode = detect_fake_mode([n.meta["val"] for n in ep.graph.nodes if n.op == "placeholder"])
    cuda = torch.device("cuda", 0)

    def fake(t):
        with mode:
            return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=cuda)

    for k, v in list(ep.state_dict.items()):
        ep._state_dict[k] = torch.nn.Parameter(fake(v), False) if isinstance(v, torch.nn.Parameter) else fake(v)
    for k, v in list(ep.constants.items()):
        if isinstance(v, torch.Tensor):
            ep._constants[k] = fake(v)
    args, kwargs = ep.example_inputs
    ep._example_inputs = (pytree.tree_map_only(torch.Tensor, fake, args), kwargs)
    retarget = lambda v: cuda if isinstance(v, torch.device) else v    # noqa: E731
    for gm in ep.graph_module.modules():
        if isinstance(gm, torch.fx.GraphModule):
            for node in gm.graph.nodes:
                node.args, node.kwargs = pytree.tree_map(retarget, node.args), pytree.tree_map(retarget, node.kwargs)
                if "val" in node.meta:
                    node.meta["val"] = pytree.tree_map_only(torch.Tensor, fake, node.meta["val"])
            gm.recompile()


def generate(ep, cache: Path, extra_configs: dict | None = None) -> Path:
    """AOTInductor codegen of ``ep`` -> the wrapper .cpp (kernels compiled to cubins beside it) under ``cache``, the
    process's TORCHINDUCTOR_CACHE_DIR; ``extra_configs`` (Inductor config overrides) go over the package's own."""
    import torch
    from backends.inductor import AOTI_CONFIGS, mutations_in_place

    try:
        with torch.no_grad():
            torch._inductor.aoti_compile_and_package(mutations_in_place(ep), package_path=str(cache / "model.pt2"),
                                                     inductor_configs={**AOTI_CONFIGS, **(extra_configs or {})})
    except Exception as e:               # expected: the C++ compile, which needs the CUDA toolkit
        if "CppCompileError" not in f"{type(e).__name__}: {e}":
            raise
    wrappers = sorted(cache.rglob("*.wrapper.cpp"))
    if len(wrappers) != 1:
        raise SystemExit(f"error: expected one generated wrapper under {cache}, found {len(wrappers)}")
    return wrappers[0]


N_SPLIT_ARG = 17          # attention_partial_kernel's N_SPLIT: after 11 pointers and T, L, D, HKV, REP, CHUNK
# the ops that write their caches in place: the reading (partial) launch and the combine launch may write them
IN_PLACE_ATTENTION = {"l4.attention_fused_inplace.default", "l4.attention_fused_chained.default"}
# (batch, tokens) of the steps whose launches ``launches_with_work`` names: a decode step, a 2K-token prefill
SHAPES = ((1, 1), (1, 2048))


def _args(text: str) -> list[str]:
    """A C++ call's argument list, split at the commas outside parentheses."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return [*out, cur.strip()]


def _cpp_int(expr: str, env: dict[str, int]) -> int:
    """An integer C++ expression of the wrapper (``std::max``, ``std::min``, ``c10::div_floor_integer``,
    ``static_cast<int64_t>``, ``123L`` literals) evaluated with ``env``'s values; ValueError where it has anything
    else."""
    py = (expr.replace("static_cast<int64_t>", "").replace("std::max", "max").replace("std::min", "min")
          .replace("c10::div_floor_integer", "fdiv"))
    py = re.sub(r"\b(\d+)L\b", r"\1", py)
    if not re.fullmatch(r"[\w\s()+*,\-]*", py):
        raise ValueError(expr)
    try:
        return int(eval(py, {"__builtins__": {}}, {"max": max, "min": min, "fdiv": lambda a, b: a // b, **env}))
    except (NameError, SyntaxError, TypeError, ZeroDivisionError) as e:
        raise ValueError(expr) from e


def launches_with_work(lines: list[str], batch: int, tokens: int) -> list[str] | None:
    """The launches of ``run_impl`` that have work in a step of ``batch`` x ``tokens`` (the token input's two sizes),
    in order, each as its compiled kernel (``int4_mm_kernel_1``: one of the two int4_mm_kernel variants): the wrapper
    skips a launch whose grid has a 0 (``if (grid_0 == 0 ..) return;``), as a decode step does for the MoE route
    launch at one token, and as one of an Int4 GEMM's decode and prefill launches does at any step. Triton kernels of
    l4's ops: their last three arguments, the grid; Inductor's own: their ``xnumel``. The wrapper's integer
    assignments are followed in order. None where a grid does not evaluate."""
    text = "\n".join(lines)
    token_input = re.search(r"auto (\w+) = std::move\(inputs\[0\]\);", text)
    if not token_input:
        return None
    env: dict[str, int] = {}
    work = []
    for line in lines:
        size = re.match(rf"\s*int64_t (\w+) = {token_input.group(1)}_size\[(\d)\];", line)
        assign = re.match(r"\s*(?:int64_t )?(\w+) = ([^;]+);\s*$", line)
        call = re.match(r"\s*call_((\w+?)_\d+)\((.*)\);\s*$", line)
        try:
            if size:
                env[size.group(1)] = (batch, tokens)[int(size.group(2))]
            elif assign and not call:
                env[assign.group(1)] = _cpp_int(assign.group(2), env)
            elif call:
                args = _args(call.group(3))
                if call.group(2).startswith("triton_"):
                    grid = [_cpp_int(a, env) for a in args if a.endswith("_xnumel")] or [1]
                else:
                    grid = [_cpp_int(a, env) for a in args[args.index("this->device_idx_") - 3:][:3]]
                if min(grid) > 0:
                    work.append(call.group(1))
        except ValueError:
            if call:
                return None
    return work


def run_impl(cpp: str) -> list[str]:
    """The lines of ``AOTInductorModel::run_impl`` (one step of the engine)."""
    start = cpp.index("void AOTInductorModel::run_impl(")
    return cpp[start:cpp.index("} // AOTInductorModel::run_impl", start)].splitlines()


def kernel_problems(counts: dict[str, int], graph_ops: dict[str, int]) -> list[str]:
    """The ``kernels`` check: each kernel of ``KERNELS`` launched (``counts``: kernel -> launches in a step) as often
    as the graph's l4 ops (``graph_ops``: op -> count) launch it, up to once more per op for ``PREFILL_KERNELS``."""
    expected: dict[str, list[tuple[str, int]]] = {}       # kernel -> the ops that launch it (int4_mm and its chained
    for op, n in graph_ops.items():                       # form share int4_mm_kernel), with their counts
        for kernel in KERNELS[op]:
            expected.setdefault(kernel, []).append((op, n))
    problems = []
    for kernel, ops in expected.items():
        least = sum(n for _, n in ops)
        most = least + sum(n for op, n in ops if kernel in PREFILL_KERNELS.get(op, ()))
        if not least <= counts.get(kernel, 0) <= most:
            problems.append(f"{' + '.join(f'{op} x{n}' for op, n in ops)} in the graph, {kernel} launched "
                            f"{counts.get(kernel, 0)}x" + (f" (at most {most}x with prefill blocks)" if most > least
                                                           else ""))
    return problems


def analyze(lines: list[str], graph_ops: dict[str, int], caches: list[str]) -> dict:
    """Launch counts and the three checks of the module docstring, from ``run_impl``'s lines. ``graph_ops``: l4 kernel
    op -> count in the exported graph; ``caches``: the cache inputs' names in the graph's order."""
    inputs = {int(i): n for n, i in (re.findall(r"auto (\w+) = std::move\(inputs\[(\d+)\]\);", "\n".join(lines)))}
    first_cache = len(inputs) - len(caches)
    cache_vars = [inputs[first_cache + i] for i in range(len(caches))]
    launches = []                                                    # (line index, kernel, argument text)
    for i, line in enumerate(lines):
        m = re.match(r"\s*call_(\w+?)_\d+\((.*)\);\s*$", line)
        if m:
            launches.append((i, m.group(1), m.group(2)))
    counts: dict[str, int] = {}
    for _, k, _ in launches:
        counts[k] = counts.get(k, 0) + 1
    problems = {"kernels": kernel_problems(counts, graph_ops), "opaque": [], "caches": []}
    problems["opaque"] = [ln.strip()[:160] for ln in lines if "proxy_executor_call_function" in ln]
    skip = ("std::move(inputs", "_aligned", "assert_size_stride", ".reset()", "data_ptr()")
    for name, var in zip(caches, cache_vars):
        uses = [(i, ln) for i, ln in enumerate(lines)
                if re.search(rf"\b{var}\b", ln) and not any(s in ln for s in skip)]
        reads = [i for i, k, a in launches if k == "attention_partial_kernel" and re.search(rf"\b{var}\b", a)]
        copies = [ln.strip()[:160] for _, ln in uses if re.search(r"aoti_torch\w*(clone|copy_)\w*\(", ln)]
        if len(reads) != 1:
            problems["caches"].append(f"{name} ({var}) is read by {len(reads)} attention kernels, not 1")
        elif uses[0][0] != reads[0] or len(uses) < 2:
            problems["caches"].append(f"{name} ({var}): first used at '{uses[0][1].strip()[:120]}', not by its "
                                      "attention kernel, or never written")
        problems["caches"] += [f"{name} ({var}) copied: {c}" for c in copies]
        writers = sorted({k for i, k, a in launches if re.search(rf"\b{var}\b", a) and i not in reads})
        if IN_PLACE_ATTENTION & graph_ops.keys() and writers != ["attention_combine_kernel"]:
            problems["caches"].append(f"{name} ({var}) written by {writers}, not by its attention's own launches "
                                      "alone")
    splits = sorted({_args(a)[N_SPLIT_ARG] for _, k, a in launches if k == "attention_partial_kernel"})
    externs: dict[str, int] = {}                                     # aten ops through the CUDA c-shims (cuBLAS..)
    for op in re.findall(r"aoti_torch_cuda_(\w+?)\(", "\n".join(lines)):
        externs[op] = externs.get(op, 0) + 1
    work = {f"B={b} T={t}": launches_with_work(lines, b, t) for b, t in SHAPES}
    return {"launches": dict(sorted(counts.items())), "kernels_launched": len(launches),
            "launched_at": {shape: None if w is None else len(w) for shape, w in work.items()}, "work_at": work,
            "extern_calls": dict(sorted(externs.items())),
            "attention_split_grids": splits, "problems": problems}


def kernel_ops(graph) -> dict[str, int]:
    """l4 kernel op -> its number of calls in an exported graph (a mutating op's calls are functionalized:
    ``auto_functionalized(op, ..)``)."""
    from torch._higher_order_ops.auto_functionalize import auto_functionalized, auto_functionalized_v2

    ops: dict[str, int] = {}
    for n in graph.nodes:
        if n.op != "call_function":
            continue
        op = str(n.args[0] if n.target in (auto_functionalized, auto_functionalized_v2) else n.target)
        if op in KERNELS:
            ops[op] = ops.get(op, 0) + 1
    return ops


def check_program(ep, graph_ops: dict[str, int], path: Path) -> tuple[int, list[str]]:
    """The engine's program.pt2 (what the jit runtime compiles: ``backends.inductor.save_program``) written to
    ``path`` and read back: (its size, problems). It must call the same l4 kernel ops and hold no weight data."""
    import torch

    from backends.inductor import save_program

    save_program(ep, path)
    back = torch.export.load(path)
    ops = kernel_ops(back.graph)
    problems = [f"{op}: x{n} in the graph, x{ops.get(op, 0)} after save and load" for op, n in graph_ops.items()
                if ops.get(op, 0) != n]
    problems += [f"{k} holds data ({v.device})" for k, v in {**back.state_dict, **back.constants}.items()
                 if isinstance(v, torch.Tensor) and v.device.type != "meta"]
    return path.stat().st_size, problems


def engine_args(doc: str) -> argparse.ArgumentParser:
    """The options of the engine to generate, as this tool and ``jit_sm90.py`` take them."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--quant", choices=("none", "int4", "fp8"), default="int4")
    ap.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    ap.add_argument("--max-seq-len", type=int, default=256)
    ap.add_argument("--layers", type=int, default=None)
    return ap


def in_fresh_cache(prefix: str, run) -> int:
    """``run(cache)`` with Triton compiling (never interpreting) and Inductor writing into a new directory ``cache``
    (this run's generated code alone), removed afterwards. Before torch and triton are imported."""
    os.environ["TRITON_INTERPRET"] = "0"
    cache = Path(tempfile.mkdtemp(prefix=prefix))
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache)
    try:
        return run(cache)
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = engine_args(__doc__)
    ap.add_argument("--inductor-config", action="append", default=[], metavar="KEY=VALUE",
                    help="an Inductor config over the engine's own (as `l4compile compile --inductor-config`; "
                         "repeatable), to see what a setting would change before a GPU measures it, e.g. "
                         "combo_kernels=true")
    ap.add_argument("--int4-split-k", type=int, default=None, metavar="S",
                    help="every Int4 GEMM's blocks (int4_mm and the fused MoE's) at split_k S, as a sweep might set "
                         "them: the engine a split-K default would give")
    ap.add_argument("--kernel-blocks", default=None, metavar="FILE",
                    help="an engine's manifest.json (or its kernel_blocks record) from `compile --tune-kernels` on a "
                         "GPU: the Int4 blocks tuned there, active while the engine is generated, as the compile had "
                         "them")
    ap.add_argument("--out", default=None, metavar="DIR", help="keep the generated wrapper .cpp there")
    ap.add_argument("--json", default=None, metavar="FILE")
    a = ap.parse_args(argv)
    if a.int4_split_k is not None and a.int4_split_k < 1:
        ap.error(f"--int4-split-k must be >= 1, got {a.int4_split_k}")
    return in_fresh_cache("aoti_sm90_", lambda cache: run(a, cache))


def inductor_configs(items: list[str]) -> dict:
    """["combo_kernels=true", ...] -> {"combo_kernels": True, ...}, checked as `l4compile compile --inductor-config`
    checks them; SystemExit(2) with one line for a bad item."""
    from l4compile import inductor_configs as settings
    from l4compile.errors import L4Error

    try:
        return dict(settings.check(settings.parse_cli(items), "inductor"))
    except L4Error as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def split_int4_gemms(splits: int) -> None:
    """Every Int4 GEMM's blocks as the code chooses them, but with ``split_k`` = ``splits`` (``kernels.ops``' own
    choosers, which the op bodies and ``dispatch.int4_mm_splits`` call)."""
    import dataclasses

    from l4compile.kernels import ops

    int4, moe = ops.int4_blocks, ops.moe_int4_blocks
    ops.int4_blocks = lambda *a: dataclasses.replace(int4(*a), split_k=splits)
    ops.moe_int4_blocks = lambda *a: tuple(dataclasses.replace(b, split_k=splits) for b in moe(*a))


def kernel_blocks(path: str) -> dict:
    """The tuned table in ``path`` (a manifest with ``kernel_blocks``, or that record itself); SystemExit(2) with one
    line where it is neither."""
    from l4compile.kernels import tuned_blocks

    try:
        data = json.loads(Path(path).read_text())
        record = data.get("kernel_blocks", data) if isinstance(data, dict) else None
        table = tuned_blocks.table_of(record)
        if not isinstance(record, dict) or not table:
            raise ValueError("no tuned problem in it")
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"error: --kernel-blocks {path}: not a manifest or kernel_blocks record of compile --tune-kernels ({e})",
              file=sys.stderr)
        raise SystemExit(2) from None
    return table


def run(a: argparse.Namespace, cache: Path) -> int:
    from l4compile.kernels import tuned_blocks

    table = kernel_blocks(a.kernel_blocks) if a.kernel_blocks else None
    with tuned_blocks.use(table):               # as compiler.build has them while the backend builds
        return _run(a, cache, table)


def _run(a: argparse.Namespace, cache: Path, table: dict | None) -> int:
    from l4compile.errors import L4Error
    from l4compile.kernels import why_unavailable

    if why_unavailable():
        print(f"error: {why_unavailable()}", file=sys.stderr)
        return 2
    import torch

    extra = inductor_configs(a.inductor_config)
    if a.int4_split_k is not None:
        split_int4_gemms(a.int4_split_k)

    if torch.cuda.is_available():
        print("error: this machine has a CUDA GPU; compile a real engine (l4compile compile --device cuda)",
              file=sys.stderr)
        return 2
    import _fake_h100
    import triton

    from l4compile.kernels import access_memo, tuned_blocks
    _fake_h100.install_triton()              # before the export: its mutation analysis of the kernels needs a target
    t0 = time.perf_counter()
    try:
        ep, caches = export_cuda(a.preset, a.quant, a.dtype, a.max_seq_len, a.layers)
    except L4Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    graph_ops = kernel_ops(ep.graph)
    t_export = time.perf_counter() - t0
    program_bytes, program_problems = check_program(ep, graph_ops, cache / "program.pt2")
    _fake_h100.install(Path(triton.__file__).parent / "backends" / "nvidia" / "include")
    to_fake_cuda(ep)
    wrapper = generate(ep, cache, extra)
    cpp = wrapper.read_text()
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        shutil.copy(wrapper, Path(a.out) / "model.wrapper.cpp")
    report = {"preset": a.preset, "quant": a.quant, "dtype": a.dtype, "max_seq_len": a.max_seq_len,
              "inductor_configs": extra, "int4_split_k": a.int4_split_k,
              "kernel_blocks": {" ".join(map(str, k)): tuned_blocks.choice_label(v) for k, v in (table or {}).items()},
              "torch": torch.__version__, "triton": triton.__version__, "target": "sm_90a",
              "graph_ops": graph_ops, "caches": len(caches), "wrapper_lines": cpp.count("\n"),
              "export_seconds": round(t_export, 1), "seconds": round(time.perf_counter() - t0, 1),
              "program_bytes": program_bytes, "kernel_access_analyses": access_memo.stats(),
              **analyze(run_impl(cpp), graph_ops, caches)}
    report["problems"]["program"] = program_problems
    print(f"{a.preset} {a.quant} {a.dtype}, {len(caches)} caches: AOTInductor CUDA wrapper generated in "
          f"{report['seconds']} s (torch {torch.__version__}, triton {triton.__version__}, sm_90a)")
    print("| kernel | launches a step |\n|---|---|")
    for k, n in report["launches"].items():
        if not k.startswith("triton_"):
            print(f"| {k} | {n} |")
    n_inductor = sum(n for k, n in report["launches"].items() if k.startswith("triton_"))
    print(f"| Inductor's own (triton_*) | {n_inductor} |")
    for op, n in report["extern_calls"].items():
        print(f"| aten {op} (c-shim) | {n} |")
    print(f"attention key splits (grid z): {', '.join(report['attention_split_grids'])}")
    print("launches with work in a step: " + ", ".join(f"{shape} {n}" for shape, n in report["launched_at"].items()))
    memo = report["kernel_access_analyses"]
    print(f"kernel access analyses (TTIR): {memo['misses']} run, {memo['hits']} answered from access_memo")
    return finish(report, ("kernels", "opaque", "caches", "program"), a.json)


def finish(report: dict, checks: tuple[str, ...], json_path: str | None) -> int:
    """Print each check of ``report["problems"]`` (ok, or its count and first problem), write the report to
    ``json_path`` if given; the exit status: 1 when a check failed."""
    bad = {k: v for k, v in report["problems"].items() if v}
    for check in checks:
        print(f"check {check}: " + ("ok" if check not in bad else f"FAILED ({len(bad[check])}): {bad[check][0]}"))
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
