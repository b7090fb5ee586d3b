"""Shared fixtures: small random Llama 4 checkpoints written with save_pretrained, compiled once per session."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# The Triton kernels' tests (tests/kernels) run under Triton's CPU interpreter where there is no GPU. triton.jit
# reads TRITON_INTERPRET when a function is decorated, including triton.language's own jit'd helpers (tl.zeros...),
# which are decorated as soon as anything imports triton (Inductor does): so it is set here, before any import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# ---- pytest-xdist (`make test` runs two workers: CI machines have 2 cores and compiles are single-threaded Python) --
# Each test file runs on ONE worker, so its module fixtures are built once; the files sharing an expensive session
# fixture of this conftest run on one worker too, so that fixture is built once; the heaviest units are handed out
# first, so both workers finish at about the same time. Every worker keeps to one thread (so do the processes it
# starts) and has its own Inductor/Triton caches: two workers compiling the same graph at once would write the same
# cache entry (seen: an AOTI package with an empty JSON member).
SHARED_FIXTURE_FILES = {
    "engines": ("tests/backends/test_inductor_parity.py", "tests/backends/test_kv_cache.py",
                "tests/backends/test_decode_graph.py"),
    "tiny_engine": ("tests/backends/test_multimodal.py", "tests/backends/test_inductor_jit.py",
                    "tests/bench/test_bench.py", "tests/bench/test_bench_decode_modes.py",
                    "tests/cli/test_bad_inputs.py", "tests/core/test_engine_format.py"),
    "sharded": ("tests/distributed/test_expert_parallel.py", "tests/distributed/test_tensor_parallel.py"),
}
# Units by cost on a 2-core machine (`pytest --durations`), most expensive first; the rest follow in file order.
HEAVY_UNITS = ("engines", "tiny_engine", "sharded", "tests/backends/test_onnxruntime.py",
               "tests/passes/test_quantize.py", "tests/backends/test_onnxruntime_quant.py",
               "tests/cli/test_parity_matrix.py", "tests/cli/test_bad_inputs.py", "tests/cli/test_pass_options.py",
               "tests/backends/test_tensorrt.py",
               "tests/core/test_stream_weights.py", "tests/bench/test_bench.py")

_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if _WORKER:
    import tempfile

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    for var, name in (("TORCHINDUCTOR_CACHE_DIR", "torchinductor"), ("TRITON_CACHE_DIR", "triton")):
        os.environ[var] = os.path.join(tempfile.gettempdir(), f"l4compile-tests-{os.getuid()}-{name}-{_WORKER}")


def _unit(nodeid: str) -> str:
    """The scheduling unit of a test: its shared-fixture group, else its file."""
    path = nodeid.split("::", 1)[0]
    return next((fixture for fixture, files in SHARED_FIXTURE_FILES.items() if path in files), path)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class UnitScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _unit(nodeid)

    config.option.loadscopereorder = False        # keep the collection order: heaviest units first (below)
    return UnitScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    """Check that SHARED_FIXTURE_FILES names every file using those session fixtures; under xdist, order the units
    heaviest first (every worker sorts its identical collection the same way)."""
    for item in items:
        path = item.nodeid.split("::", 1)[0]
        for fixture, files in SHARED_FIXTURE_FILES.items():
            defs = getattr(item, "_fixtureinfo", None) and item._fixtureinfo.name2fixturedefs.get(fixture)
            if defs and defs[-1].baseid != path and path not in files:     # a module's own fixture may share a name
                raise pytest.UsageError(f"{path} uses the shared session fixture '{fixture}': add it to "
                                        "SHARED_FIXTURE_FILES in tests/conftest.py")
    if _WORKER:
        rank = {unit: i for i, unit in enumerate(HEAVY_UNITS)}
        order = {id(item): i for i, item in enumerate(items)}
        items.sort(key=lambda it: (rank.get(_unit(it.nodeid), len(rank)), order[id(it)]))


BASE = dict(vocab_size=320, hidden_size=64, intermediate_size=96, intermediate_size_mlp=160, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=1,
            interleave_moe_layer_step=1, attention_chunk_size=8, max_position_embeddings=256, floor_scale=4,
            attn_scale=0.5, use_qk_norm=True, initializer_range=0.05)

LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 16.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 32}

# Variants for backend parity: together they cover NoPE layers, several chunk boundaries, qk-norm on and off,
# llama3 scaling, dense/MoE interleave, odd expert counts and top-1/top-2 routing.
VARIANTS = {
    "scout-like": dict(rope_parameters=LLAMA3),
    "maverick-top2-odd": dict(interleave_moe_layer_step=2, use_qk_norm=False, num_local_experts=5,
                              num_experts_per_tok=2, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "deep-top2-llama3-noqk": dict(num_hidden_layers=8, attention_chunk_size=4, floor_scale=2, use_qk_norm=False,
                                  num_local_experts=3, num_experts_per_tok=2, rope_parameters=LLAMA3),
}


# Inductor settings for the fixtures whose subject is not Inductor's CPU code generation (quantize numerics, sharding,
# multimodal, CLI behaviour): scalar C++ kernels and the C++ wrapper at -O0 take ~30% off each AOTInductor compile.
# Each of those fixtures still checks its engine's numbers. The backend parity fixture (`engines`) compiles its
# "scout-like" engine with the defaults, so the vectorized kernels users get stay under test against transformers.
QUICK_INDUCTOR = {"cpp.simdlen": 0, "aot_inductor.compile_wrapper_opt_level": "O0"}


def make_model(seed: int = 0, expert_std: float = 0.3, router_std: float | None = None, **over):
    """A random float32 Llama4ForCausalLM over BASE; experts (and optionally the router) get a larger std
    so routing matters."""
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    kw = dict(BASE, **over)
    n, step = kw["num_hidden_layers"], kw["interleave_moe_layer_step"]
    kw["moe_layers"] = [i for i in range(n) if (i + 1) % step == 0] if step > 1 else list(range(n))
    torch.manual_seed(seed)
    model = Llama4ForCausalLM(Llama4TextConfig(**kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".experts." in name:
                p.normal_(0.0, expert_std)
            elif router_std is not None and name.endswith("router.weight"):
                p.normal_(0.0, router_std)
    return model


def save_checkpoint(path: Path, **over) -> Path:
    make_model(**over).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {name: save_checkpoint(root / name, **over) for name, over in VARIANTS.items()}


DEFAULT_INDUCTOR_VARIANT = "scout-like"     # the parity engine compiled with Inductor's defaults (vectorized C++)


@pytest.fixture(scope="session")
def engines(checkpoints, tmp_path_factory) -> dict[str, Path]:
    """Every VARIANTS checkpoint compiled once per session (Inductor, float32, max sequence 112): the
    DEFAULT_INDUCTOR_VARIANT with Inductor's defaults, the others with QUICK_INDUCTOR (they differ from it by model,
    not by C++ code generation, which one vectorized engine keeps under test)."""
    import l4compile

    root = tmp_path_factory.mktemp("variant-engines")
    return {name: l4compile.compile(str(ckpt), out=root / name, max_seq_len=112, max_batch_size=2,
                                    inductor_configs=None if name == DEFAULT_INDUCTOR_VARIANT else QUICK_INDUCTOR).path
            for name, ckpt in checkpoints.items()}


@pytest.fixture(scope="session")
def tiny_engine(tmp_path_factory) -> Path:
    """The `tiny` preset compiled once per session with the Inductor backend (QUICK_INDUCTOR)."""
    import l4compile

    out = tmp_path_factory.mktemp("engines") / "tiny"
    l4compile.compile("tiny", backend="inductor", out=out, max_seq_len=128, max_batch_size=2,
                      inductor_configs=QUICK_INDUCTOR)
    return out


def load_benchmark(name: str):
    """A script of benchmarks/ (``bench_gpu``...) imported as a module, for testing its functions and ``main``."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """The real command line in a fresh process (exit codes and stderr as a user sees them)."""
    return subprocess.run([sys.executable, "-m", "l4compile", *args], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, PYTHONWARNINGS="ignore"))
