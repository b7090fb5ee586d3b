"""Generate, on a machine without a GPU, what the jit runtime compiles for an H100 (``L4COMPILE_INDUCTOR_RUNNER=jit``:
the engine's program.pt2 through Inductor in-process, Python launching every kernel); then check it.

    python benchmarks/jit_sm90.py [--preset tiny] [--quant int4|fp8|none] [--dtype bfloat16] [--max-seq-len 256]
                                  [--layers N] [--batch 1] [--tokens 1] [--dynamic] [--json FILE]

Needs a CUDA build of torch (its fake CUDA tensors go through functionalization; a CPU build refuses them), e.g.
``make test-host-torch``'s .venv-host (torch 2.11, the lent GPU hosts' build). A GPU host falls back to this runtime
when its AOTInductor cannot load a CUDA package (the H200 of 2026-12-04); until this check, that path had never
been generated for CUDA anywhere.

How: as ``aoti_sm90.py`` (the preset lowered and exported by ``backends/inductor.py`` for ``cuda``, re-pointed at
fake CUDA tensors under ``_fake_h100``'s stand-in runtime), then ``backends.inductor.in_place_module`` (the module
the jit runtime compiles) given to Inductor's ``compile_fx`` at one step's shapes (``--batch`` x ``--tokens``). The
runtime compiles once per shape class, with B and T symbolic where > 1: ``--dynamic`` generates that graph, a
prefill's or a batch's; without it the sizes are static. Inductor writes the Python wrapper and compiles every kernel
for sm_90a; nothing runs.

Checks (exit 1 when one fails):
  source   the wrapper and every kernel module it loads were generated and imported (a SyntaxError in copied kernel
           source stops the compile: torch 2.11, ``tests/kernels/test_kernel_sources.py``)
  kernels  every l4 kernel op of the exported graph launches its kernels (``aoti_sm90.KERNELS``)
  opaque   no l4 op runs as an opaque call (a fallback kernel outside Inductor's launches)
  dynamic  the wrapper reads as many symbolic sizes from its inputs as the step has distinct sizes > 1 among B and
           T with ``--dynamic``, none without it
"""
# B batch, T tokens
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import aoti_sm90  # noqa: E402  (imports no torch: the options, the export and the checks' tables)


def step_inputs(ep, batch: int, tokens: int, dynamic: bool = False) -> list:
    """Fake CUDA inputs of one step (in ``ep``'s fake mode): token ids [B, T], start_pos as exported, and each KV
    cache [B, ...] at its exported size. ``dynamic``: as the jit runtime gives them to torch.compile
    (``backends.inductor.dynamic_dims``): each size the export left symbolic is a symbol where it is > 1 (one B
    shared by every input, as duck sizing gives) and stays specialised where it is 1."""
    import torch
    from torch._dynamo.source import ConstantSource
    from torch._guards import detect_fake_mode

    from backends.inductor import dynamic_dims

    args, _ = ep.example_inputs
    mode = detect_fake_mode(args)
    symbolic = {dim for group in dynamic_dims(ep) for dim in group} if dynamic else set()
    sizes: dict[int, object] = {}

    def size(i: int, d: int, n: int):
        if (i, d) not in symbolic or n == 1:
            return n
        if n not in sizes:
            env = mode.shape_env
            sym = env.create_symbol(n, ConstantSource(f"jit_sm90_size_{n}"))
            sizes[n] = env.create_symintnode(sym, hint=n)
        return sizes[n]

    out = []
    with mode:
        for i, a in enumerate(args):
            shape = (batch, tokens) if i == 0 else (batch, *a.shape[1:]) if i >= 2 else tuple(a.shape)
            out.append(torch.zeros([size(i, d, n) for d, n in enumerate(shape)], dtype=a.dtype, device=a.device))
    return out


def wrapper_source(cache: Path) -> str:
    """The generated Python wrapper under ``cache`` (the module defining ``call``)."""
    found = [p for p in cache.rglob("*.py") if "def call(" in p.read_text()]
    if len(found) != 1:
        raise SystemExit(f"error: expected one generated wrapper under {cache}, found {len(found)}")
    return found[0].read_text()


def analyze(src: str, graph_ops: dict[str, int]) -> dict:
    """Launch counts and the checks of the module docstring, from the wrapper's source."""
    names = dict(re.findall(r"^(\w+) = async_compile\.triton\('(\w+)'", src, re.M))   # variable -> kernel name
    body = src[src.index("def call("):]
    launched = [names.get(v, v) for v in re.findall(r"^\s+(\w+)\.run\(", body, re.M)]
    counts: dict[str, int] = {}
    for k in launched:
        key = "triton_*" if k.startswith("triton_") else k
        counts[key] = counts.get(key, 0) + 1
    problems = {"kernels": aoti_sm90.kernel_problems(counts, graph_ops),
                "opaque": sorted(set(re.findall(r"torch\.ops\.l4\.\w+", body)))}
    externs: dict[str, int] = {}
    for op in re.findall(r"extern_kernels\.(\w+)\(", body):
        externs[op] = externs.get(op, 0) + 1
    sizes = sorted(set(re.findall(r"^\s+(s\d+) = \w+_size\[\d+\]", body, re.M)))   # symbolic sizes it reads
    return {"launches": dict(sorted(counts.items())), "kernels_launched": len(launched), "symbolic_sizes": sizes,
            "extern_calls": dict(sorted(externs.items())), "problems": problems}


def main(argv: list[str] | None = None) -> int:
    ap = aoti_sm90.engine_args(__doc__)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=1)
    ap.add_argument("--dynamic", action="store_true",
                    help="B and T (where > 1) symbolic, as the jit runtime compiles a step's shape class")
    ap.add_argument("--json", default=None, metavar="FILE")
    a = ap.parse_args(argv)
    if a.batch < 1 or a.tokens < 1:
        ap.error(f"--batch and --tokens must be >= 1, got {a.batch} and {a.tokens}")
    return aoti_sm90.in_fresh_cache("jit_sm90_", lambda cache: run(a, cache))


def run(a: argparse.Namespace, cache: Path) -> int:
    from l4compile.errors import L4Error
    from l4compile.kernels import why_unavailable

    if why_unavailable():
        print(f"error: {why_unavailable()}", file=sys.stderr)
        return 2
    import torch

    if torch.cuda.is_available():
        print("error: this machine has a CUDA GPU; load a real engine with L4COMPILE_INDUCTOR_RUNNER=jit",
              file=sys.stderr)
        return 2
    if torch.version.cuda is None:
        print(f"error: jit_sm90.py needs a CUDA build of torch (this is {torch.__version__}); run it in "
              ".venv-host (make test-host-torch)", file=sys.stderr)
        return 2
    import _fake_h100
    import triton
    from torch._inductor.compile_fx import compile_fx

    from backends.inductor import in_place_module

    _fake_h100.install_triton()
    t0 = time.perf_counter()
    try:
        ep, caches = aoti_sm90.export_cuda(a.preset, a.quant, a.dtype, a.max_seq_len, a.layers)
    except L4Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    graph_ops = aoti_sm90.kernel_ops(ep.graph)
    _fake_h100.install(Path(triton.__file__).parent / "backends" / "nvidia" / "include")
    aoti_sm90.to_fake_cuda(ep)
    inputs = step_inputs(ep, a.batch, a.tokens, a.dynamic)
    problems_source = []
    try:
        with torch.no_grad():
            compile_fx(in_place_module(ep), inputs)
        src = wrapper_source(cache)
    except Exception as e:                  # the compile itself is what this checks
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()] or [""]
        problems_source.append(f"{type(e).__name__}: " + " | ".join(dict.fromkeys((lines[0], lines[-1])))[:400])
        src = None
    report = {"preset": a.preset, "quant": a.quant, "dtype": a.dtype, "max_seq_len": a.max_seq_len,
              "batch": a.batch, "tokens": a.tokens, "dynamic": a.dynamic, "torch": torch.__version__,
              "triton": triton.__version__, "target": "sm_90a", "runtime": "jit", "graph_ops": graph_ops,
              "caches": len(caches), "seconds": round(time.perf_counter() - t0, 1)}
    if src is None:
        report["problems"] = {"source": problems_source}
    else:
        report.update(analyze(src, graph_ops))
        report["problems"]["source"] = []
        want = len({n for n in (a.batch, a.tokens) if n > 1}) if a.dynamic else 0
        got = len(report["symbolic_sizes"])
        report["problems"]["dynamic"] = [] if got == want else [
            f"the wrapper reads {got} symbolic sizes from its inputs, {want} expected (B and T where > 1)"]
    print(f"{a.preset} {a.quant} {a.dtype}, B={a.batch} T={a.tokens}{' (dynamic)' if a.dynamic else ''}: "
          f"jit runtime's compile {'failed after' if src is None else 'generated its wrapper in'} "
          f"{report['seconds']} s "
          f"(torch {torch.__version__}, triton {triton.__version__}, sm_90a)")
    if src is not None:
        print("| kernel | launches a step |\n|---|---|")
        for k, n in report["launches"].items():
            print(f"| {k} | {n} |")
        for op, n in report["extern_calls"].items():
            print(f"| extern {op} | {n} |")
    return aoti_sm90.finish(report, ("source",) if src is None else ("source", "kernels", "opaque", "dynamic"),
                            a.json)


if __name__ == "__main__":
    sys.exit(main())
