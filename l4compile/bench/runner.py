"""Run a benchmark: build every backend, warm up, then measure prefill and decode with backends interleaved.

Baselines are the transformers model itself: ``eager`` (Llama4ForCausalLM from ``frontend.load``) and
``torch-compile`` (``torch.compile`` of its forward; lazily compiled during warm-up). Every other name is an
l4compile engine backend, compiled with ``l4compile.compile`` into a temporary directory; a backend that cannot
run here (not built yet, missing package, unsupported option) is reported as skipped with the reason.

Per repeat, per (batch, prompt) shape, each backend runs one prefill and one greedy generate of
``decode_steps`` new tokens; the backend order rotates every repeat so drift (thermal, neighbours on a shared
machine) hits all of them alike. decode ms per step = (generate time - prefill time of the same repeat) /
(decode_steps - 1): a generate of N new tokens is one prefill (which yields the first) and N - 1 decode steps.
"""
# B batch, S prompt length, N new tokens, V vocab
from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from l4compile.config import require_device
from l4compile.errors import L4Error

BASELINES = ("eager", "torch-compile")
DEFAULT_BACKENDS = ("eager", "torch-compile", "inductor", "onnxruntime", "tensorrt")


@dataclass(frozen=True)
class BenchConfig:
    model: str
    backends: tuple[str, ...] = DEFAULT_BACKENDS
    quant: str = "none"
    dtype: str = "float32"
    device: str = "cpu"
    prompt_lens: tuple[int, ...] = (128, 512)
    batch_sizes: tuple[int, ...] = (1, 4)
    decode_steps: int = 32
    repeats: int = 5
    seed: int = 0
    layers: int | None = None
    max_seq_len: int | None = None      # engines' limit; default max(prompt_lens) + decode_steps
    threads: int | None = None          # torch.set_num_threads for the run; None: torch's default
    stream_weights: bool = False        # engines: compile --stream-weights (full-size models)
    # compile --pass-option for every engine: ((pass, ((key, value), ...)), ...), sorted (given as such or a dict)
    pass_options: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()
    # compile --inductor-config for the inductor engine, and torch.compile(options=...) for the torch-compile
    # baseline, so both are built alike: ((key, value), ...), sorted (given as such or a dict)
    inductor_configs: tuple[tuple[str, Any], ...] = ()
    profile: bool = False               # after timing: each engine's decode-step kernels (bench/profile.py)
    tune_kernels: bool = False          # the inductor engine: compile --tune-kernels (kernels/autotune.py)

    def __post_init__(self) -> None:
        from l4compile.config import BACKENDS, DEVICES, DTYPES, QUANTS
        from l4compile.inductor_configs import check as check_inductor_configs
        from l4compile.pipeline import check_pass_options

        known = BASELINES + BACKENDS
        if not self.backends:
            raise L4Error("--backends is empty; choose from: " + ", ".join(known))
        for b in self.backends:
            if b not in known:
                raise L4Error(f"unknown backend '{b}' in --backends; choose from: {', '.join(known)}")
        for name in ("stream_weights", "profile", "tune_kernels"):
            if not isinstance(getattr(self, name), bool):
                raise L4Error(f"{name} must be true or false, got {getattr(self, name)!r}")
        if len(set(self.backends)) != len(self.backends):
            raise L4Error("--backends lists a backend twice")
        for name, value, allowed in (("--quant", self.quant, QUANTS), ("--dtype", self.dtype, DTYPES),
                                     ("--device", self.device, DEVICES)):
            if value not in allowed:
                raise L4Error(f"unknown {name} '{value}'; choose one of: {', '.join(allowed)}")
        for name, vals in (("--prompt-lens", self.prompt_lens), ("--batch-sizes", self.batch_sizes)):
            if not vals or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in vals):
                raise L4Error(f"{name} must be positive integers, got {list(vals)!r}")
        for name, v in (("--decode-steps", self.decode_steps), ("--repeats", self.repeats),
                        ("--threads", 1 if self.threads is None else self.threads)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise L4Error(f"{name} must be a positive integer, got {v!r}")
        if self.profile and self.device != "cuda":
            raise L4Error("--profile times each GPU kernel of a decode step: it needs --device cuda")
        if self.tune_kernels and (self.device != "cuda" or "inductor" not in self.backends):
            raise L4Error("--tune-kernels times the inductor engine's Triton kernels on the GPU: it needs --device cuda "
                          "and the inductor backend in --backends")
        if self.decode_steps < 2:   # the first new token comes out of the prefill: N tokens take N - 1 steps
            raise L4Error(f"--decode-steps must be at least 2, got {self.decode_steps}: the first new token comes "
                          "from the prefill, so decode is timed over the other decode_steps - 1")
        try:
            options, configs = self.pass_options_dict(), dict(self.inductor_configs)
        except (TypeError, ValueError):
            raise L4Error("pass_options must be (pass, ((key, value), ...)) pairs and inductor_configs (key, value) "
                          f"pairs, got {self.pass_options!r} and {self.inductor_configs!r}") from None
        if options:
            check_pass_options(options)
            if not any(b not in BASELINES for b in self.backends):
                raise L4Error("--pass-option applies to the engines bench compiles; --backends lists baselines only")
        configs = check_inductor_configs(configs, "inductor")
        if configs and not {"inductor", "torch-compile"} & set(self.backends):
            raise L4Error("--inductor-config applies to the inductor engine and the torch-compile baseline; "
                          f"--backends lists neither ({', '.join(self.backends)})")
        object.__setattr__(self, "inductor_configs", configs)
        object.__setattr__(self, "pass_options",
                           tuple((k, tuple(sorted(v.items()))) for k, v in sorted(options.items())))
        if self.max_seq_len is not None and self.max_seq_len < self.needed_seq_len:
            raise L4Error(f"--max-seq-len {self.max_seq_len} is below the longest prompt plus --decode-steps "
                          f"({max(self.prompt_lens)} + {self.decode_steps} = {self.needed_seq_len}); "
                          "raise --max-seq-len or shorten --prompt-lens")

    @property
    def needed_seq_len(self) -> int:
        return max(self.prompt_lens) + self.decode_steps

    def pass_options_dict(self) -> dict[str, dict[str, Any]]:
        given = self.pass_options   # pairs, as kept; a dict where a caller built the config with one
        return {name: dict(opts) for name, opts in (given.items() if isinstance(given, dict) else given)}

    def to_dict(self) -> dict[str, Any]:
        """JSON form (the report's ``config``); build options only where given, so a run without them hashes as
        before they existed."""
        d = {k: v for k, v in asdict(self).items() if v or k not in ("pass_options", "inductor_configs", "profile",
                                                                        "tune_kernels")}
        return json.loads(json.dumps(d))     # tuples -> lists, at every depth

    def stable_hash(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def parse_int_list(option: str, text: str) -> tuple[int, ...]:
    """'128,512' -> (128, 512); anything else is a one-line user error naming the option."""
    parts = [p.strip() for p in str(text).split(",")]
    if not text or not all(parts):
        raise L4Error(f"{option} '{text}' is not a comma-separated list of positive integers (e.g. {option} 128,512)")
    out = []
    for p in parts:
        if not p.isdigit() or int(p) < 1:
            raise L4Error(f"{option}: '{p}' is not a positive integer (use e.g. {option} 128,512)")
        out.append(int(p))
    return tuple(out)


def parse_backends(text: str) -> tuple[str, ...]:
    parts = tuple(p.strip() for p in str(text).split(","))
    if not text or not all(parts):
        raise L4Error(f"--backends '{text}' is not a comma-separated list (e.g. --backends eager,inductor)")
    return parts


# ---------------------------------------------------------------------------------------------------------------
# Memory: peak process RSS on CPU (VmHWM, reset per call through /proc/self/clear_refs), max allocated on CUDA.

class MemoryMeter:
    def __init__(self, device: str):
        self.device = device
        self.method = "cuda max_memory_allocated" if device == "cuda" else self._cpu_method()

    @staticmethod
    def _cpu_method() -> str:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return "process peak RSS (VmHWM, reset before each call)"
        except OSError:
            return "process peak RSS since start (ru_maxrss; cannot reset here)"

    @staticmethod
    def _status(key: str) -> int | None:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None

    def reset(self) -> int | None:
        """Start a measurement; returns the memory in use now."""
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return int(torch.cuda.memory_allocated())
        if "VmHWM" in self.method:
            with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        return self._status("VmRSS")

    def peak(self) -> int | None:
        if self.device == "cuda":
            return int(torch.cuda.max_memory_allocated())
        hwm = self._status("VmHWM")
        if hwm is None:
            import resource
            hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return hwm


# ---------------------------------------------------------------------------------------------------------------
# Backends under test

@dataclass
class Runner:
    name: str
    kind: str                                   # "baseline" | "engine"
    prefill: Callable[[torch.Tensor], Any]
    generate: Callable[[torch.Tensor, int], torch.Tensor]
    decode_method: str
    compile_seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)
    describe: Callable[[], str] | None = None   # decode_method as it stands after warm-up (engines)


@dataclass
class BackendStatus:
    name: str
    kind: str
    status: str                                 # "ok" | "skipped"
    reason: str | None = None
    compile_seconds: float | None = None
    warmup_seconds: float | None = None
    decode_method: str | None = None
    engine_config_hash: str | None = None
    kernel_blocks: list[dict[str, Any]] | None = None    # compile --tune-kernels: what each Int4 problem got

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["kernel_blocks"] is None:                  # engines without it report as before
            del d["kernel_blocks"]
        return d


def _tuned(kernel_blocks: dict[str, Any] | None) -> list[dict[str, Any]] | None:
    """An engine manifest's ``kernel_blocks`` as the report keeps them: per Int4 problem its name, the blocks chosen,
    their time and layout's (microseconds over the tuned token counts), and how many times a step runs it."""
    if not kernel_blocks:
        return None
    from l4compile.kernels.autotune import problem_name

    return [{"problem": problem_name(r["key"]), "blocks": r["label"], "us": r["us"], "static_us": r["static_us"],
             "count": r["count"], "tokens": r["tokens"]} for r in kernel_blocks["problems"]]


def _hf_runners(lm: torch.nn.Module, names: tuple[str, ...], inductor_configs: dict[str, Any]) -> list[Runner]:
    pad = lm.config.pad_token_id if lm.config.pad_token_id is not None else 0

    def prefill_with(fwd):
        def prefill(ids: torch.Tensor):
            return fwd(input_ids=ids, use_cache=False).logits
        return prefill

    def generate_with(fwd, patched: bool):
        def generate(ids: torch.Tensor, n: int) -> torch.Tensor:
            if patched:
                lm.forward = fwd                 # generate calls self(...): route it through the compiled forward
            try:
                return lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                   min_new_tokens=n, do_sample=False, use_cache=True, pad_token_id=pad)
            finally:
                if patched:
                    del lm.forward
        return generate

    method = "transformers generate, DynamicCache, greedy (do_sample=False, min_new_tokens=max_new_tokens)"
    out = []
    for name in names:
        if name == "eager":
            out.append(Runner(name, "baseline", prefill_with(lm.forward), generate_with(lm.forward, False), method))
        elif name == "torch-compile":
            compiled = torch.compile(lm.forward, options=inductor_configs or None)
            settings = ", ".join(f"{k}={json.dumps(v)}" for k, v in inductor_configs.items())
            out.append(Runner(name, "baseline", prefill_with(compiled), generate_with(compiled, True),
                              method + "; forward compiled with torch.compile (default mode"
                              + (f"; Inductor settings {settings})" if settings else ")"),
                              info={"lazy_compile": True}))
    return out


def engine_manifest(model: str) -> dict | None:
    """MODEL names an engine directory (a manifest.json in it): its manifest, checked by ``read_manifest``; else None."""
    from l4compile.engine import MANIFEST, read_manifest

    return read_manifest(Path(model)) if (Path(model) / MANIFEST).is_file() else None


def lm_head_quantized(manifest: dict) -> bool:
    """Whether an engine's quantize pass quantized its lm_head (``quantize.quantize_lm_head``)."""
    stats = next((p["stats"] for p in manifest.get("passes", []) if p["name"] == "quantize"), {})
    scheme = stats.get("scheme")
    return isinstance(scheme, dict) and bool(scheme.get("quantize_lm_head"))


def _engine_runner(cfg: BenchConfig, name: str, workdir: Path, max_seq: int) -> Runner:
    """Compile ``cfg.model`` for backend ``name``; L4Error (backend missing, option unsupported) means skip."""
    import l4compile
    from l4compile.backends import get_backend

    get_backend(name)
    t0 = time.perf_counter()
    eng = l4compile.compile(cfg.model, backend=name, out=workdir / name, quant=cfg.quant, dtype=cfg.dtype,
                            device=cfg.device, max_seq_len=max_seq, max_batch_size=max(cfg.batch_sizes),
                            seed=cfg.seed, layers=cfg.layers, stream_weights=cfg.stream_weights,
                            pass_options=cfg.pass_options_dict(),
                            inductor_configs=dict(cfg.inductor_configs) if name == "inductor" else None,
                            tune_kernels=cfg.tune_kernels and name == "inductor")
    return _runner_for(eng, name, time.perf_counter() - t0)


def _runner_for(eng, name: str, seconds: float | None) -> Runner:
    """A loaded engine as a Runner; ``seconds``: what building it took here (None: built before this run)."""
    def describe() -> str:   # after warm-up: a failed CUDA graph capture has switched the engine to "loop"
        if getattr(eng, "kv_cache", None) is None:
            return "Engine.generate, recomputing the whole prefix every step (no KV cache in this engine)"
        mode = getattr(eng, "decode_mode", "loop")
        how = {"graph": "each replayed as one captured CUDA graph", "static": "on static buffers",
               "loop": "one engine call each"}[mode]
        failed = f" (CUDA graph capture failed: {eng.cuda_graph_error})" if getattr(eng, "cuda_graph_error", None) \
            else ""
        runtime = f"; runtime {eng.runtime}" if getattr(eng, "runtime", None) else ""
        return (f"Engine.generate with the engine's KV cache: one prefill, then one cached decode step per token, "
                f"{how}; decode mode {mode}{failed}{runtime}")

    return Runner(name, "engine", eng.prefill, lambda ids, n: eng.generate(ids, max_new_tokens=n), describe(),
                  compile_seconds=None if seconds is None else round(seconds, 3),
                  info={"engine_config_hash": eng.manifest.get("config_hash"),
                        "engine_compile_seconds": eng.manifest.get("compile_seconds"),
                        "kernel_blocks": eng.manifest.get("kernel_blocks")}, describe=describe)


# ---------------------------------------------------------------------------------------------------------------
# Progress bar: on a terminal only

class ProgressBar:
    def __init__(self, total: int, stream=None, enabled: bool | None = None, width: int = 28):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.total, self.done, self.width = max(1, total), 0, width
        self.t0 = time.perf_counter()

    def note(self, text: str) -> None:
        if self.enabled:
            self.stream.write(f"\r\033[K{text}\n")
            self.stream.flush()

    def step(self, label: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        frac = self.done / self.total
        filled = int(round(frac * self.width))
        el = time.perf_counter() - self.t0
        eta = el / frac - el if frac > 0 else 0.0
        self.stream.write(f"\r\033[Kbench [{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total}"
                          f"  {label}  eta {eta:4.0f}s")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\r\033[K")
            self.stream.flush()


# ---------------------------------------------------------------------------------------------------------------

def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(fn: Callable[[], Any], device: str) -> float:
    """ms of fn(); its result is dropped here, so it is not alive (and not counted in peak memory) afterwards."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - t0) * 1e3


def make_inputs(cfg: BenchConfig, vocab: int) -> dict[tuple[int, int], torch.Tensor]:
    """One fixed LongTensor [B, S] per shape, the same for every backend (ids avoid the low special tokens)."""
    g = torch.Generator().manual_seed(cfg.seed + 1234)
    lo = min(3, vocab - 1)
    return {(b, s): torch.randint(lo, vocab, (b, s), generator=g).to(cfg.device)
            for b in cfg.batch_sizes for s in cfg.prompt_lens}


def run_bench(cfg: BenchConfig, *, stream=None, progress: bool | None = None) -> dict[str, Any]:
    """Run the benchmark described by ``cfg``; returns the pieces ``report.build_report`` assembles."""
    old_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _run_bench(cfg, stream=stream, progress=progress)
    finally:
        torch.set_num_threads(old_threads)


def _load_built_engine(cfg: BenchConfig):
    """Load the engine directory ``cfg.model`` and check that the asked shapes fit its limits."""
    from l4compile.engine import load_engine

    eng = load_engine(cfg.model)
    if cfg.needed_seq_len > eng.max_seq_len:
        raise L4Error(f"longest prompt plus --decode-steps ({cfg.needed_seq_len}) exceeds engine {cfg.model}'s max "
                      f"sequence length {eng.max_seq_len}; shorten --prompt-lens or --decode-steps")
    if max(cfg.batch_sizes) > eng.max_batch_size:
        raise L4Error(f"--batch-sizes {max(cfg.batch_sizes)} exceeds engine {cfg.model}'s max batch size "
                      f"{eng.max_batch_size}")
    return eng


def _run_bench(cfg: BenchConfig, *, stream=None, progress: bool | None = None) -> dict[str, Any]:
    from l4compile import frontend
    from l4compile.bench.env import environment

    require_device(cfg.device)
    bar = ProgressBar(0, stream=stream, enabled=progress)
    bar.note(f"loading {cfg.model} ...")
    statuses: dict[str, BackendStatus] = {}
    runners: list[Runner] = []
    built = engine_manifest(cfg.model)       # MODEL is an engine directory: benchmark it as compiled
    if built is not None:
        if tuple(cfg.backends) != (built["backend"],):
            raise L4Error(f"{cfg.model} is a {built['backend']} engine: it is benchmarked alone (--backends "
                          f"{built['backend']}); baselines need the model, so bench the checkpoint or preset instead")
        eng = _load_built_engine(cfg)
        runners.append(_runner_for(eng, built["backend"], None))
        model_config, source, max_seq = built["model_config"], dict(built["model_source"], engine=cfg.model), \
            eng.max_seq_len
        vocab = int(model_config["vocab_size"])
    else:
        baselines = any(b in BASELINES for b in cfg.backends)      # engines alone need only the config (meta)
        loaded = frontend.load(cfg.model, dtype=cfg.dtype, device=cfg.device, seed=cfg.seed, layers=cfg.layers,
                               meta=not baselines)
        lm = loaded.model
        limit = int(lm.config.max_position_embeddings)
        if cfg.needed_seq_len > limit:
            raise L4Error(f"longest prompt plus --decode-steps ({max(cfg.prompt_lens)} + {cfg.decode_steps} = "
                          f"{cfg.needed_seq_len}) exceeds the model's max_position_embeddings {limit}; "
                          "shorten --prompt-lens or --decode-steps")
        max_seq = cfg.max_seq_len or cfg.needed_seq_len
        model_config, source, vocab = lm.config.to_dict(), loaded.source, int(lm.config.vocab_size)
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="l4bench-")))
        from torch._dynamo import config as dynamo_config   # not `import torch._dynamo`: torch would turn local
        stack.enter_context(dynamo_config.patch(recompile_limit=64, accumulated_recompile_limit=4096))
        hf = {r.name: r for r in _hf_runners(lm, tuple(b for b in cfg.backends if b in BASELINES),
                                             dict(cfg.inductor_configs))} \
            if built is None else {}
        for name in cfg.backends if built is None else ():
            if name in hf:
                runners.append(hf[name])
                continue
            bar.note(f"compiling {name} ...")
            try:
                runners.append(_engine_runner(cfg, name, workdir, max_seq))
            except L4Error as e:
                statuses[name] = BackendStatus(name, "engine", "skipped", reason=str(e))
                bar.note(f"  {name}: skipped ({e})")
        shapes = [(b, s) for b in cfg.batch_sizes for s in cfg.prompt_lens]
        inputs = make_inputs(cfg, vocab)
        meter = MemoryMeter(cfg.device)
        bar.total = max(1, len(runners) * len(shapes) * (cfg.repeats + 1))
        bar.t0 = time.perf_counter()
        tokens: dict[tuple[str, int, int], list[list[int]]] = {}
        with torch.no_grad():
            for r in runners:                        # warm-up: one prefill + one generate per shape
                t0 = time.perf_counter()
                for (b, s) in shapes:
                    r.prefill(inputs[(b, s)])
                    out = r.generate(inputs[(b, s)], cfg.decode_steps)
                    tokens[(r.name, b, s)] = out[:, s:].tolist()
                    bar.step(f"warm-up {r.name} b={b} s={s}")
                _sync(cfg.device)
                warm = time.perf_counter() - t0
                if r.info.get("lazy_compile"):
                    r.compile_seconds = round(warm, 3)
                if r.describe is not None:
                    r.decode_method = r.describe()
                statuses[r.name] = BackendStatus(r.name, r.kind, "ok", compile_seconds=r.compile_seconds,
                                                 warmup_seconds=round(warm, 3), decode_method=r.decode_method,
                                                 engine_config_hash=r.info.get("engine_config_hash"),
                                                 kernel_blocks=_tuned(r.info.get("kernel_blocks")))
            samples = []
            for rep in range(cfg.repeats):
                k = rep % max(1, len(runners))
                order = runners[k:] + runners[:k]    # rotate so no backend always runs first
                for (b, s) in shapes:
                    ids = inputs[(b, s)]
                    for r in order:
                        before = meter.reset()
                        p_ms = _timed(lambda: r.prefill(ids), cfg.device)
                        g_ms = _timed(lambda: r.generate(ids, cfg.decode_steps), cfg.device)
                        peak = meter.peak()
                        samples.append({"backend": r.name, "batch": b, "prompt_len": s, "repeat": rep,
                                        "prefill_ms": round(p_ms, 4), "generate_ms": round(g_ms, 4),
                                        "decode_ms_per_token": round((g_ms - p_ms) / (cfg.decode_steps - 1), 4),
                                        "memory_before_bytes": before, "peak_memory_bytes": peak})
                        bar.step(f"repeat {rep + 1}/{cfg.repeats} {r.name} b={b} s={s}")
            profiles = _profiles(cfg, runners, inputs, bar) if cfg.profile else []
        bar.close()
    agree: dict[tuple[str, int, int], bool | None] = {}
    for (name, b, s), toks in tokens.items():
        ref = tokens.get(("eager", b, s))
        agree[(name, b, s)] = None if ref is None else toks == ref
    ordered = [statuses[n] for n in cfg.backends]
    return {"config": cfg, "environment": environment(cfg.device), "model_source": source,
            "lm_head_quantized": built is not None and lm_head_quantized(built),
            "model_config": model_config, "backends": ordered, "samples": samples,
            "matches_eager": agree, "memory_method": meter.method, "engine_max_seq_len": max_seq,
            **({"profiles": profiles} if cfg.profile else {})}


def _profiles(cfg: BenchConfig, runners: list[Runner], inputs, bar: ProgressBar) -> list[dict[str, Any]]:
    """``--profile``: each engine's decode-step kernels at every batch size (the first prompt length), after the
    timed repeats; a profile that fails records its error and costs the run nothing else."""
    from l4compile.bench.profile import decode_profile

    out = []
    s = cfg.prompt_lens[0]
    for r in (r for r in runners if r.kind == "engine"):
        for b in cfg.batch_sizes:
            bar.note(f"profiling {r.name} b={b} s={s} ...")
            try:
                prof = decode_profile(r.generate, inputs[(b, s)], cfg.decode_steps, cfg.device)
            except Exception as e:      # noqa: BLE001 (CUPTI missing or busy, ...): the timings stand
                prof = {"error": f"{type(e).__name__}: {e}"[:300]}
            out.append({"backend": r.name, "batch": b, "prompt_len": s, **prof})
    return out
