"""``l4compile bench MODEL ...`` and ``l4compile bench compare A B``.

Wiring (l4compile/cli.py): ``bench_cli.add_parser(sub)`` in ``build_parser`` and ``"bench": bench_cli.run`` in
``COMMANDS``."""
from __future__ import annotations

import argparse
from pathlib import Path

from l4compile.engine_options import check_build_options
from l4compile.errors import L4Error
from l4compile.inductor_configs import parse_cli as parse_inductor_configs
from l4compile.pass_options import parse_cli as parse_pass_options
from l4compile.paths import check_dir_path

_BACKENDS_HELP = "comma-separated: eager,torch-compile,inductor,onnxruntime,tensorrt (default: all)"


def add_parser(subparsers) -> argparse.ArgumentParser:
    b = subparsers.add_parser(
        "bench", help="benchmark backends against transformers eager and torch.compile; write reports",
        description="Benchmark MODEL on each backend (prefill latency, decode ms/token, tokens/s, peak memory) "
                    "and write report.json, report.html and report.md into --out. "
                    "`l4compile bench compare A/report.json B/report.json` prints the deltas between two runs.")
    b.add_argument("model", metavar="MODEL", help="checkpoint directory, preset name or an ENGINE directory "
                                                  "(benchmarked as compiled, no baselines); or `compare`")
    b.add_argument("reports", nargs="*", metavar="REPORT", help="with `compare`: two report.json files (or dirs)")
    b.add_argument("--backends", default=None, help=_BACKENDS_HELP)
    b.add_argument("--quant", default=None, help="none | fp8 | int4 (engines; baselines stay unquantized)")
    b.add_argument("--prompt-lens", default="128,512", help="comma-separated prompt lengths (default 128,512)")
    b.add_argument("--batch-sizes", default="1,4", help="comma-separated batch sizes (default 1,4)")
    b.add_argument("--decode-steps", default="32", help="new tokens per generate (default 32)")
    b.add_argument("--repeats", default="5", help="measured repeats per backend and shape (default 5)")
    b.add_argument("--out", default=None, metavar="DIR", help="report directory (default bench-<model>)")
    b.add_argument("--force", action="store_true", help="overwrite reports already in --out")
    b.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default float32)")
    b.add_argument("--device", default=None, help="cpu | cuda (default cpu)")
    b.add_argument("--seed", default="0", help="seed for preset weights")
    b.add_argument("--layers", default=None, help="presets only: number of decoder layers")
    b.add_argument("--max-seq-len", default=None, help="engines' max sequence length "
                                                       "(default: longest prompt + --decode-steps)")
    b.add_argument("--stream-weights", action="store_true",
                   help="compile engines with --stream-weights (the float model is never in memory; engines only)")
    b.add_argument("--threads", default=None, help="torch CPU threads for the run (default: torch's choice)")
    b.add_argument("--profile", action="store_true",
                   help="after timing, profile each engine's decode steps (torch.profiler, CUDA only): the kernels "
                        "of one step, their launches and GPU time, and the step's idle share")
    b.add_argument("--tune-kernels", action="store_true",
                   help="--device cuda: compile the inductor engine with compile --tune-kernels (its Int4 kernels' "
                        "blocks timed on this GPU first)")
    from l4compile.cli import add_build_opts
    add_build_opts(b, "an Inductor setting for the inductor engine and the torch-compile baseline alike",
                   "compile every engine with this pass option")
    return b


def _int(option: str, text: str | None, *, minimum: int | None = 1) -> int | None:
    if text is None:
        return None
    try:
        v = int(text)
    except ValueError:
        raise L4Error(f"{option} '{text}' is not an integer") from None
    if minimum is not None and v < minimum:
        raise L4Error(f"{option} must be at least {minimum}, got {v}")
    return v


def engine_options(a, manifest: dict) -> dict:
    """An ENGINE directory is benchmarked as compiled: backend, quant, dtype and device come from its manifest;
    options that only mean something when bench compiles are refused, and so are values that contradict it."""
    for flag, value in (("--layers", a.layers), ("--max-seq-len", a.max_seq_len), ("--stream-weights", a.stream_weights),
                        ("--tune-kernels", a.tune_kernels)):
        if value:
            raise L4Error(f"{flag} applies when bench compiles MODEL; {a.model} is an engine (compiled already)")
    got = {"backends": manifest["backend"], "quant": manifest["quant"], "dtype": manifest["dtype"],
           "device": manifest["device"]}
    for key, value in got.items():
        asked = getattr(a, key)
        if asked is not None and asked != value:
            raise L4Error(f"--{key} {asked}: engine {a.model} was compiled with {value}; an engine is benchmarked "
                          "as it was compiled (bench the checkpoint or preset to compare others)")
    check_build_options(manifest, a.model, parse_pass_options(a.pass_options),
                        parse_inductor_configs(a.inductor_configs))
    return got


def config_from_args(a) -> "BenchConfig":  # noqa: F821
    from l4compile.bench.runner import DEFAULT_BACKENDS, BenchConfig, engine_manifest, parse_backends, parse_int_list

    manifest = engine_manifest(a.model)
    if manifest is not None:   # its build options are its own (checked to agree): the report has its config hash
        opts = dict(engine_options(a, manifest), pass_options=(), inductor_configs=())
    else:
        opts = {"backends": a.backends or ",".join(DEFAULT_BACKENDS), "quant": a.quant or "none",
                "dtype": a.dtype or "float32", "device": a.device or "cpu",
                "pass_options": tuple(parse_pass_options(a.pass_options).items()),
                "inductor_configs": tuple(parse_inductor_configs(a.inductor_configs).items())}
    return BenchConfig(model=a.model, backends=parse_backends(opts["backends"]), quant=opts["quant"],
                       dtype=opts["dtype"], device=opts["device"],
                       prompt_lens=parse_int_list("--prompt-lens", a.prompt_lens),
                       batch_sizes=parse_int_list("--batch-sizes", a.batch_sizes),
                       decode_steps=_int("--decode-steps", a.decode_steps), repeats=_int("--repeats", a.repeats),
                       seed=_int("--seed", a.seed, minimum=None), layers=_int("--layers", a.layers),
                       max_seq_len=_int("--max-seq-len", a.max_seq_len), threads=_int("--threads", a.threads),
                       stream_weights=a.stream_weights, profile=a.profile, tune_kernels=a.tune_kernels,
                       pass_options=opts["pass_options"], inductor_configs=opts["inductor_configs"])


def run_compare(paths: list[str]) -> int:
    from l4compile.bench.report import compare, load_report

    if len(paths) != 2:
        raise L4Error(f"bench compare takes two reports (A/report.json B/report.json), got {len(paths)}")
    a, b = (load_report(p) for p in paths)
    print(compare(a, b, paths[0], paths[1]))
    return 0


def run(a) -> int:
    if a.model == "compare":
        return run_compare(a.reports)
    if a.reports:
        raise L4Error(f"unexpected argument(s) after MODEL: {' '.join(a.reports)} "
                      "(did you mean `l4compile bench compare A B`?)")
    from l4compile.bench.report import build_report, headline, write_report
    from l4compile.bench.runner import run_bench

    cfg = config_from_args(a)
    out = Path(a.out) if a.out else Path(f"bench-{Path(a.model).name or 'model'}")
    check_dir_path(out, "--out")
    existing = [p.name for p in (out / "report.json", out / "report.html", out / "report.md") if p.exists()]
    if existing and not a.force:
        raise L4Error(f"{out} already holds {', '.join(existing)}; pass --force to overwrite or pick another --out")
    report = build_report(run_bench(cfg))
    paths = write_report(report, out)
    for line in headline(report):
        print(line)
    print(f"wrote {paths['json']}, {paths['html'].name}, {paths['md'].name}")
    return 0
