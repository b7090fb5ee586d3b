"""ONNX Runtime backend: the Program is exported to one ONNX model (opset ``l4compile.onnx.ONNX_OPSET``) and
run with an ``onnxruntime.InferenceSession`` (CPU EP; CUDA EP with onnxruntime-gpu and ``--device cuda``).

Export path: ``Program.export()`` (dynamic batch and sequence) -> ``torch.onnx.export(ep, dynamo=True,
custom_translation_table=l4compile.onnx.translation_table(...))`` (``l4::moe`` becomes the per-expert standard-op
subgraph of ``l4compile.onnx.moe``, ``l4::attention*`` the ops of ``l4compile.onnx.attention``, the quantized ops
those of ``l4compile.onnx.quant``) -> ``l4compile.onnx.optimize`` (onnxscript's optimizer minus its quadratic
multi-output patterns). We reuse torch.onnx's aten translations (hundreds of ops, maintained upstream) and
only own the translations of our custom ops; writing an FX -> ONNX emitter ourselves would duplicate that.

Graph (after the default passes, with the kv_cache pass)::

    (input_ids int64 [batch, seq], start_pos int64 [1], k_cache_0, v_cache_0, ...  [batch, Hkv, L_i, D])
        -> (logits [batch, seq, V], k_cache_0_next, v_cache_0_next, ...)

and ``input_ids -> logits`` with ``--skip-pass kv_cache``. ``batch`` and ``seq`` are symbolic ONNX dims. The
model is saved as ``model.onnx`` with its weights inline, or, when they exceed protobuf's 2 GB limit, in
``model.onnx.data`` (ONNX external data). ``onnx.checker`` (full check, with shape inference) runs on every
exported model before it is written to the engine.

Runtime contract (what ``Engine`` expects of every backend): ``runner(*torch tensors)`` returns the logits
tensor (cacheless graph) or the tuple ``(logits, *caches)``, as torch tensors on the engine's device.
"""
from __future__ import annotations

import collections
import importlib.util
import logging
import warnings
from pathlib import Path
from typing import Any

import torch

from l4compile.backends import BuildResult
from l4compile.errors import L4Error

ARTIFACT = "model.onnx"
EXTERNAL_DATA = "model.onnx.data"
PROTOBUF_LIMIT = 2 * 1024**3 - 64 * 1024**2        # weights above this go to external data (2 GB proto cap)
INSTALL_HINT = "pip install 'l4compile[onnx]'"


def require_onnx() -> None:
    missing = [m for m in ("onnx", "onnxruntime", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise L4Error(f"the onnxruntime backend needs {', '.join(missing)}; install with: {INSTALL_HINT}")


def _check_dtype(dtype: str, device: str) -> None:
    if dtype == "bfloat16" and device == "cpu":
        raise L4Error("ONNX Runtime's CPU execution provider has no bfloat16 kernels for this model (MatMul, "
                      "Softmax); use --dtype float32 or float16 on the CPU, or --device cuda with onnxruntime-gpu")


def _rename(model, program) -> dict[str, Any]:
    """Give the graph's outputs stable names and its dynamic dims the names ``batch`` / ``seq``."""
    from onnxscript import ir

    graph = model.graph
    layout = program.kv_layout
    names, dim_names = ["logits"], ("batch", "seq")
    if program.kind == "vision":          # pixel_values [tiles, 3, S, S] -> image_features [tiles, P, H]
        names, dim_names = ["image_features"], ("tiles",)
    elif layout is not None:
        for i in range(len(layout["layers"])):
            names += [f"k_cache_{i}_next", f"v_cache_{i}_next"]
    if len(graph.outputs) != len(names):
        raise L4Error(f"ONNX export produced {len(graph.outputs)} outputs, expected {len(names)}")
    for out, name in zip(graph.outputs, names):
        out.name = name
    ids = graph.inputs[0]
    dims = {}
    for d, name in zip(ids.shape, dim_names):
        if isinstance(d, ir.SymbolicDim) and d.value is not None:
            dims[d.value] = name

    def fix(v) -> None:
        if v.shape is not None and any(isinstance(d, ir.SymbolicDim) and d.value in dims for d in v.shape):
            v.shape = ir.Shape([ir.SymbolicDim(dims[d.value]) if isinstance(d, ir.SymbolicDim) and d.value in dims
                                else d for d in v.shape])

    for v in graph.inputs:
        fix(v)
    for v in graph.outputs:
        fix(v)
    for node in graph:
        for v in node.outputs:
            fix(v)
    return {"inputs": [v.name for v in graph.inputs], "outputs": names}


def onnx_program(program, target: str = "onnxruntime", optimize: bool = True):
    """Program -> torch.onnx's ONNXProgram (``.model``: the ONNX IR model), our ops translated for ``target``;
    optimized by ``l4compile.onnx.optimize`` unless ``optimize`` is False."""
    require_onnx()
    import l4compile.ops
    from l4compile.onnx import ONNX_OPSET, TRANSLATED_OPS, translation_table
    from l4compile.onnx.optimize import optimize as optimize_model

    # decompose what has no ONNX translation of its own; translated ops stay opaque. Every l4 op with a
    # decomposition has a translation today, so the export goes to torch.onnx as traced: no retrace of ours
    decomps = {k: v for k, v in l4compile.ops.DECOMPOSITIONS.items() if k not in TRANSLATED_OPS}
    ep = program.export()
    if decomps:
        ep = ep.run_decompositions(decomps)
    table = translation_table(ep, target)
    with warnings.catch_warnings(), _quiet_onnx_logs():
        warnings.simplefilter("ignore")
        try:
            # torch.onnx's own optimize=True runs onnxscript's optimizer, quadratic in the node count (see
            # l4compile.onnx.optimize); ours is the same minus the rules that make it so
            onx = torch.onnx.export(ep, (), dynamo=True, custom_translation_table=table,
                                    opset_version=ONNX_OPSET, optimize=False, verbose=False)
            if optimize:
                optimize_model(onx.model)
        except Exception as e:   # an aten op without an ONNX translation, typically
            cause = e
            while cause is not None and not isinstance(cause, L4Error):   # a translation's own user error
                cause = cause.__cause__ or cause.__context__
            if cause is not None:
                raise cause from None
            raise L4Error(f"ONNX export failed: {str(e).strip().splitlines()[0][:400]}") from e
    return onx


def export_onnx(program, workdir: Path, dtype: str, target: str = "onnxruntime") -> tuple[list[str], dict[str, Any]]:
    """Program -> ``workdir/model.onnx`` (+ external data when needed), checked. -> (artifacts, info).

    ``target`` picks the lowering of the quantized ops (``l4compile.onnx.quant``): ``onnxruntime`` may use
    ONNX Runtime's contrib ops (``com.microsoft::MatMulNBits`` for int4), ``tensorrt`` uses standard ops only."""
    import onnx

    from l4compile.onnx import ONNX_OPSET
    from l4compile.onnx.quant import lift_weight_constants

    onx = onnx_program(program, target)
    lift_weight_constants(onx.model)
    io = _rename(onx.model, program)
    weight_bytes = sum(int(v.const_value.nbytes) for v in onx.model.graph.initializers.values()
                       if v.const_value is not None)
    external = weight_bytes > PROTOBUF_LIMIT
    path = workdir / ARTIFACT
    onx.save(str(path), external_data=external)
    artifacts = [ARTIFACT]
    if external:
        written = sorted(p.name for p in workdir.iterdir() if p.name != ARTIFACT and p.name.startswith(ARTIFACT))
        if written != [EXTERNAL_DATA]:
            # torch.onnx names the data file after the model; keep the engine's layout explicit
            raise L4Error(f"unexpected external data files from the ONNX export: {written}")
        artifacts.append(EXTERNAL_DATA)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:
        raise L4Error(f"onnx.checker rejected the exported model: {str(e).strip().splitlines()[0][:400]}") from e
    ops = collections.Counter(n.op_type if not n.domain else f"{n.domain}::{n.op_type}"
                              for n in onnx.load(str(path), load_external_data=False).graph.node)
    info = {"format": "onnx", "opset": ONNX_OPSET, "target": target, "dtype": dtype, "external_data": external,
            "weight_bytes": weight_bytes,
            "io": io, "op_counts": dict(sorted(ops.items())), "onnx": onnx.__version__,
            "torch": torch.__version__}
    return artifacts, info


class _quiet_onnx_logs:
    """torch.onnx logs one warning per skipped torchvision op and prints progress; keep them off the terminal."""

    def __enter__(self):
        self._saved = []
        for name in ("torch.onnx", "torch.onnx._internal.exporter._registration", "onnxscript"):
            lg = logging.getLogger(name)
            self._saved.append((lg, lg.level))
            lg.setLevel(logging.ERROR)
        import contextlib
        import io
        self._redirect = contextlib.redirect_stdout(io.StringIO())
        self._redirect.__enter__()
        return self

    def __exit__(self, *exc):
        self._redirect.__exit__(*exc)
        for lg, level in self._saved:
            lg.setLevel(level)
        return False


def build(program, workdir: Path, config) -> BuildResult:
    require_onnx()
    _check_dtype(config.dtype, config.device)
    if config.device == "cuda":
        _cuda_providers()      # fail before the (long) export if the CUDA EP is missing
    artifacts, info = export_onnx(program, workdir, config.dtype)
    import onnxruntime as ort

    info["onnxruntime"] = ort.__version__
    return BuildResult(artifacts, info)


def _cuda_providers() -> list[str]:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise L4Error("--device cuda with the onnxruntime backend needs onnxruntime-gpu (CUDAExecutionProvider); "
                      "install it with: pip install 'l4compile[gpu]'")
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def session_options():
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3          # errors only
    so.intra_op_num_threads = torch.get_num_threads()   # the same CPU budget torch (and Inductor engines) use
    # ORT fuses DequantizeLinear(int4, blocked) -> MatMul into MatMulNBits (the TensorRT-bound graph, run here
    # for numerics) with accuracy level 4 by default: int8-quantized ACTIVATIONS (~0.5% logit error). Our int4
    # is weight-only: keep activations in float (level 0), as our own MatMulNBits nodes do.
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    return so


def ort_element_type(dtype: torch.dtype):
    """The element type IOBinding.bind_input takes for a torch dtype: a numpy type, or an ONNX TensorProto enum
    where numpy has none (bfloat16)."""
    import numpy as np
    from onnx import TensorProto

    types = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: TensorProto.BFLOAT16,
             torch.int64: np.int64, torch.int32: np.int32, torch.bool: np.bool_}
    if dtype not in types:
        raise L4Error(f"the onnxruntime runner cannot bind {dtype} tensors; it binds "
                      + ", ".join(str(d).removeprefix("torch.") for d in types))
    return types[dtype]


class OrtRunner:
    """Runs ``model.onnx`` with torch tensors in and out (the Engine runner contract)."""

    def __init__(self, path: Path, device: str):
        import onnxruntime as ort

        providers = _cuda_providers() if device == "cuda" else ["CPUExecutionProvider"]
        self.device = torch.device(device)
        self.session = ort.InferenceSession(str(path), session_options(), providers=providers)
        if device == "cuda" and "CUDAExecutionProvider" not in self.session.get_providers():
            # ORT falls back to the CPU silently when the CUDA provider's libraries do not load (CUDA/cuDNN versions)
            raise L4Error("onnxruntime could not start its CUDA execution provider on this machine (its CUDA and "
                          "cuDNN libraries must match onnxruntime-gpu's build); the session fell back to the CPU")
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def _run_cpu(self, inputs) -> list[torch.Tensor]:
        feeds = {n: t.detach().contiguous().numpy() for n, t in zip(self.input_names, inputs)}
        return [torch.from_numpy(o) for o in self.session.run(self.output_names, feeds)]

    def _run_cuda(self, inputs) -> list[torch.Tensor]:
        # Inputs stay on the GPU (IO binding, no host copy); outputs are allocated by ORT on the device and handed
        # to torch through DLPack. ORT runs on its own CUDA stream: torch's queued work on the inputs (a static
        # decoder's token / position / cache updates) must finish before ORT reads them.
        binding = self.session.io_binding()
        keep = []
        index = self.device.index or 0
        for name, t in zip(self.input_names, inputs):
            t = t.detach().contiguous().to(self.device)
            keep.append(t)
            binding.bind_input(name, "cuda", index, ort_element_type(t.dtype), tuple(t.shape), t.data_ptr())
        for name in self.output_names:
            binding.bind_output(name, "cuda", index)
        torch.cuda.current_stream(self.device).synchronize()
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        outs = []
        for ov in binding.get_outputs():
            try:
                outs.append(torch.from_dlpack(ov))
            except Exception:      # an onnxruntime-gpu without DLPack export: copy through the host
                outs.append(torch.from_numpy(ov.numpy()).to(self.device))
        return outs

    def __call__(self, *inputs: torch.Tensor):
        if len(inputs) != len(self.input_names):
            raise L4Error(f"the ONNX model takes {len(self.input_names)} inputs, got {len(inputs)}")
        outs = self._run_cuda(inputs) if self.device.type == "cuda" else self._run_cpu(inputs)
        return outs[0] if len(outs) == 1 else tuple(outs)


def load(engine_dir: Path, manifest: dict[str, Any]):
    require_onnx()
    if manifest["device"] == "cuda" and not torch.cuda.is_available():
        raise L4Error(f"engine {engine_dir} was built for CUDA and this machine has no CUDA GPU")
    return OrtRunner(engine_dir / ARTIFACT, manifest["device"])
