"""Which CUDA AOTInductor packages load on this host: small packages that each add one feature l4compile's CUDA
engines use. Each case is built in one process, then loaded and run in a fresh process, then loaded in a process
that compiled something first (as `l4compile compile` verifies its engine): a segfault ends only that step, and a
failed step ends its case (the next load would die the same way).

    python benchmarks/aoti_cuda_probe.py [--gdb] [CASE ...]  # default: every case; needs a CUDA GPU

--gdb: the first load step that dies of a signal is run once more under cuda-gdb (90 s), which prints the native
backtrace.

On the lent H200 (torch 2.11.0+cu130, driver 580.159.04, 2026-12-04) even `plain`, loaded in the process that built
it, died with SIGSEGV inside aoti_load_package (AOTIModelPackageLoader); the fresh-process load was not tried then.

    plain         nn.Linear, constants inside the .so
    external      the same, aot_inductor.package_constants_in_so=False + load_constants (l4compile's weights layout)
    single        external, loaded with run_single_threaded=True (what CUDA engines load with)
    opaque        external + an opaque custom op (torch.library.custom_op, run through the proxy executor)
    triton        external + a user Triton kernel (l4::int4_mm, a triton_op compiled into the package)

Each step prints one line: CASE STEP ok (max |out - ref|) / CASE STEP FAILED (exit code, last line reached).
When the fresh load fails, the layers under aoti_load_package are tried one by one: what the model .so links against
(``ldd -r``), the GLIBCXX it needs and the host's g++, a bare dlopen of the .so after importing torch, then
``AOTIModelContainerRunnerCuda`` on it without the package loader: which layer dies is where the crash lives.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CASES = ("plain", "external", "single", "opaque", "triton")


@torch.library.custom_op("probe::twice", mutates_args=())
def twice(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@twice.register_fake
def _(x):
    return torch.empty_like(x)


class Toy(torch.nn.Module):
    def __init__(self, case: str):
        super().__init__()
        self.case = case
        self.lin = torch.nn.Linear(256, 256)
        if case == "triton":
            from l4compile.quant import quantize_int4
            wp, ws = quantize_int4(torch.randn(256, 256) * 0.02, 128)
            self.register_buffer("wp", wp)
            self.register_buffer("ws", ws)

    def forward(self, x):
        y = self.lin(x)
        if self.case == "opaque":
            y = torch.ops.probe.twice(y)
        if self.case == "triton":
            y = y + torch.ops.l4.int4_mm(x, self.wp, self.ws)
        return y


def build(case: str, out: Path) -> None:
    """out/model.pt2, out/inputs.pt (x, reference output, constants)."""
    if case == "triton":
        sys.path.insert(0, str(ROOT))
        import l4compile.ops  # noqa: F401
        from l4compile.kernels.dispatch import load_triton_ops
        load_triton_ops()
    model = Toy(case).cuda().eval()
    x = torch.randn(4, 256, device="cuda")
    with torch.no_grad():
        ep = torch.export.export(model, (x,))
        configs = {} if case == "plain" else {"aot_inductor.package_constants_in_so": False}
        torch._inductor.aoti_compile_and_package(ep, package_path=str(out / "model.pt2"), inductor_configs=configs)
        torch.save({"x": x, "ref": model(x), "constants": {**ep.state_dict, **ep.constants}}, out / "inputs.pt")
    print(f"{case}: compiled", flush=True)


def load_and_run(case: str, out: Path, step: str) -> None:
    if case == "triton":
        sys.path.insert(0, str(ROOT))
        import l4compile.ops  # noqa: F401
        from l4compile.kernels.dispatch import load_triton_ops
        load_triton_ops()
    if step == "after-compile":                 # the state `l4compile compile` loads its engine in
        torch.compile(lambda t: t * 3)(torch.ones(4, device="cuda"))
    saved = torch.load(out / "inputs.pt")
    pkg = torch._inductor.aoti_load_package(str(out / "model.pt2"),
                                            run_single_threaded=case in ("single", "opaque", "triton"))
    print(f"{case}: loaded", flush=True)
    if case != "plain":
        consts = saved["constants"]
        pkg.load_constants({k: consts[k] for k in pkg.get_constant_fqns()}, check_full_update=True,
                           user_managed=True)
        print(f"{case}: constants loaded", flush=True)
    with torch.no_grad():
        res = pkg(saved["x"])
    res = res if isinstance(res, torch.Tensor) else res[0]
    torch.cuda.synchronize()
    print(f"RESULT {case} {step} ok (max |out - ref| {float((res - saved['ref']).abs().max()):.1e})", flush=True)


def extract(out: Path) -> tuple[Path, Path]:
    """model.pt2's AOTInductor model, unzipped under out/x once (diagnose and each of its steps ask for it): (its
    .so, the folder holding its cubins)."""
    import zipfile

    if not (out / "x").is_dir():
        with zipfile.ZipFile(out / "model.pt2") as z:
            z.extractall(out / "x")
    so = next((out / "x").rglob("*.so"))
    return so, so.parent


def lower_level(case: str, out: Path, step: str) -> None:
    """The load below aoti_load_package, one layer at a time, each in its own process (diagnose): "dlopen" the
    model .so alone after importing torch; "runner" AOTIModelContainerRunnerCuda on it (no package loader)."""
    so, cubins = extract(out)
    if step == "dlopen":
        import ctypes

        ctypes.CDLL(str(so))
        print(f"{case}: dlopen ok", flush=True)
        return
    if case == "triton":
        sys.path.insert(0, str(ROOT))
        import l4compile.ops  # noqa: F401
        from l4compile.kernels.dispatch import load_triton_ops
        load_triton_ops()
    saved = torch.load(out / "inputs.pt")
    runner = torch._C._aoti.AOTIModelContainerRunnerCuda(str(so), 1, "cuda", str(cubins))
    print(f"{case}: runner loaded", flush=True)
    if case != "plain":
        runner.update_constant_buffer(dict(saved["constants"]), False, True)
    res = runner.run([saved["x"]])[0]
    torch.cuda.synchronize()
    print(f"RESULT {case} runner ok (max |out - ref| {float((res - saved['ref']).abs().max()):.1e})", flush=True)


def diagnose(case: str, out: Path) -> None:
    """After a failed load: what the model .so links against (ldd -r: unresolved symbols, which libtorch and
    libstdc++), the newest GLIBCXX it asks for, the host compiler, then a bare dlopen and the container runner."""
    so, _ = extract(out)
    for cmd in (["ldd", "-r", str(so)], ["g++", "--version"]):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as e:
            print(f"$ {cmd[0]}: {e}", flush=True)
            continue
        lines = (r.stdout + r.stderr).splitlines()
        shim = [ln for ln in lines if "undefined symbol: aoti_torch_" in ln]   # libtorch's C shim: python has it
        print(f"$ {' '.join(cmd[:2])}" + (f" ({len(shim)} aoti_torch_* symbols left to libtorch)" if shim else ""),
              *[ln for ln in lines if ln not in shim][:30], sep="\n", flush=True)
    needs = sorted(set(re.findall(rb"GLIBCXX_3\.4\.(\d+)", so.read_bytes())), key=int)
    print(f"{so.name}: {so.stat().st_size} bytes, newest GLIBCXX_3.4.{needs[-1].decode() if needs else '?'}", flush=True)
    for step in ("dlopen", "runner"):
        p = subprocess.run([sys.executable, "-X", "faulthandler", __file__, "--lower", case, str(out), step],
                           capture_output=True, text=True, timeout=240)
        lines = [ln for ln in (p.stdout + p.stderr).splitlines() if ln.strip()]
        print(f"{case} {step} " + ("ok" if p.returncode == 0 else f"FAILED (exit {p.returncode})"), flush=True)
        if p.returncode:
            print("\n".join(lines[-25:]), flush=True)


def main(argv: list[str]) -> int:
    if argv[:1] == ["--lower"]:
        lower_level(argv[1], Path(argv[2]), argv[3])
        return 0
    if argv[:1] == ["--build"]:
        build(argv[1], Path(argv[2]))
        return 0
    if argv[:1] == ["--load"]:
        load_and_run(argv[1], Path(argv[2]), argv[3])
        return 0
    if not torch.cuda.is_available():
        print("error: aoti_cuda_probe.py needs a CUDA GPU", file=sys.stderr)
        return 2
    gdb = "--gdb" in argv and shutil.which("cuda-gdb")
    argv = [a for a in argv if a != "--gdb"]
    results = []
    for case in argv or CASES:
        out = Path(tempfile.mkdtemp(prefix=f"probe-{case}-"))
        for step, args in (("build", ["--build", case, str(out)]), ("fresh", ["--load", case, str(out), "fresh"]),
                           ("after-compile", ["--load", case, str(out), "after-compile"])):
            p = subprocess.run([sys.executable, "-X", "faulthandler", __file__, *args], capture_output=True,
                               text=True, timeout=240)
            lines = [ln for ln in (p.stdout + p.stderr).splitlines() if ln.strip()]
            reached = [ln for ln in lines if ln.startswith(case + ":")][-1:]
            ok = p.returncode == 0
            results.append(f"{case} {step} " + ("ok " + (lines[-1].split(" ok ", 1)[-1] if step != "build" else "")
                                                if ok else f"FAILED (exit {p.returncode}; reached {reached})"))
            print(results[-1], flush=True)
            if not ok:
                print(p.stdout[-2000:], p.stderr[-2000:], sep="\n", flush=True)
                if step == "fresh":
                    diagnose(case, out)
                if gdb and p.returncode < 0:
                    try:
                        g = subprocess.run(["cuda-gdb", "-q", "-batch", "-ex", "set pagination off", "-ex", "run",
                                            "-ex", "bt 30", "--args", sys.executable, __file__, *args],
                                           capture_output=True, text=True, timeout=90)
                        print("\n".join(ln for ln in g.stdout.splitlines()
                                        if ln.startswith(("#", "Thread", "Program"))) or g.stdout[-3000:], flush=True)
                    except subprocess.TimeoutExpired:
                        print("cuda-gdb: no backtrace within 90 s", flush=True)
                    gdb = False                          # one backtrace is enough
                break     # nothing built to load, or the next load would die the same way: the time goes elsewhere
    print("\n".join(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
