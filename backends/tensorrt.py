"""TensorRT backend: Program -> the onnxruntime backend's ONNX export -> TensorRT's ONNX parser -> a serialized
plan (``model.plan``) run through the ``tensorrt`` Python API.

Why through ONNX (and not torch-tensorrt's dynamo path): the graph TensorRT sees is then byte-for-byte the one
ONNX Runtime runs, so (1) one lowering of ``l4::moe`` serves both backends, (2) the TensorRT-bound graph can be
checked op by op against TensorRT's parser support list (``tensorrt_onnx_ops``) and run for numerics with ONNX
Runtime on any machine, GPU or not, and (3) nothing falls back to PyTorch at run time: torch-tensorrt
partitions unsupported ops (our MoE would be one) into torch segments, which a plan file cannot carry.

Build flow (``build``):
1. export ``model.onnx`` as the onnxruntime backend does (opset 21, dynamic batch/seq, KV-cache I/O), with
   the ``tensorrt`` lowering of the quantized ops (``l4compile.onnx.quant``): standard Q/DQ only, no
   ``com.microsoft`` contrib ops (``--quant int4``: INT4 ``DequantizeLinear`` with ``block_size``, weight-only;
   ``--quant fp8``: FLOAT8E4M3FN ``QuantizeLinear``/``DequantizeLinear``; both need TensorRT >= 10, see
   ``tensorrt_onnx_ops``);
2. check every node against ``tensorrt_onnx_ops.SUPPORTED`` (+ constant-input and Q/DQ restrictions): an
   unsupported op is an ``L4Error`` naming it;
3. run the graph with ONNX Runtime on the CPU on a sample and compare with transformers eager on the same
   weights (float32: max rel logit error < 1e-4); a quantized graph is compared with the pass-rewritten
   Program run in torch (the quantized ops' reference implementations: the spec of the quantized model),
   logit SQNR >= ``QUANT_NUMERICS_MIN_DB`` (40 dB; see there why not a max-error bound);
4. with a CUDA GPU and the ``tensorrt`` package: parse, two optimization profiles (prefill: batch 1..max,
   seq 1..max; decode: batch 1..max, seq 1), precision flags from ``--dtype`` (FP16 / BF16; float32 disables
   TF32 so parity holds), serialize ``model.plan``. Without them: ``L4Error`` with ``NO_TENSORRT`` after steps
   1-3, so the CLI exits 2 and ``engine_writer`` removes the scratch directory (no engine is left).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

from l4compile.backends import BuildResult
from l4compile.errors import L4Error

from . import onnxruntime as ort_backend
from .tensorrt_onnx_ops import check_graph

ARTIFACT = "model.plan"
NO_TENSORRT = "building a TensorRT engine needs a CUDA GPU and the tensorrt package (pip install 'l4compile[gpu]')"
NUMERICS_TOL = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 2e-2}
# Quantized graphs vs the Program's reference ops: logit SQNR, not max relative error. FP8 rounds activations
# per token, a discontinuous function: any float reordering (ORT's fusions, TensorRT's tactics) moves a few
# values across an e4m3 rounding boundary, each a 1/16-relative step (measured: 47 dB SQNR, 3.5% max rel on
# 512 tokens of text, between two float32 implementations of the same fake-quantized model).
QUANT_NUMERICS_MIN_DB = 40.0
WORKSPACE_BYTES = 8 << 30


def tensorrt_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("tensorrt") is not None


def check_ops(onnx_path: Path) -> list[str]:
    import onnx

    return check_graph(onnx.load(str(onnx_path), load_external_data=False))


def eager_from_program(program) -> torch.nn.Module:
    """transformers' Llama4ForCausalLM sharing the Program's weights (no copy): the parity reference."""
    from l4compile.quant import float_model_from_graph

    return float_model_from_graph(program.gm, program.model_config)


@torch.no_grad()
def check_numerics(onnx_path: Path, program, dtype: str, quant: str = "none") -> float:
    """Run the ONNX graph with ONNX Runtime (CPU) on the Program's sample; -> max rel error vs the reference:
    transformers eager (unquantized) or the quantized Program itself (its ops' reference implementations)."""
    inputs, _ = program.call_inputs()
    runner = ort_backend.OrtRunner(onnx_path, "cpu")
    out = runner(*(t.cpu() for t in inputs))
    got = (out[0] if isinstance(out, tuple) else out).float()
    if quant == "none":
        ref = eager_from_program(program)(input_ids=inputs[0], use_cache=False).logits.float().cpu()
    else:
        ref = program.run_example().float().cpu()
    err = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
    if quant == "none" and not err < NUMERICS_TOL[dtype]:
        raise L4Error(f"the TensorRT-bound ONNX graph drifts from transformers eager under ONNX Runtime (max "
                      f"relative logit error {err:.3g} >= {NUMERICS_TOL[dtype]:g}); not building a TensorRT engine")
    if quant != "none":
        from l4compile.quant import sqnr_db

        db = sqnr_db(ref, got)
        if not db >= QUANT_NUMERICS_MIN_DB:
            raise L4Error(f"the TensorRT-bound ONNX graph drifts from the --quant {quant} Program under ONNX Runtime "
                          f"(logit SQNR {db:.1f} dB < {QUANT_NUMERICS_MIN_DB:g} dB); not building a TensorRT engine")
    return err


def build(program, workdir: Path, config) -> BuildResult:
    ort_backend.require_onnx()
    onnx_dir = workdir / "onnx"
    onnx_dir.mkdir()
    _, info = ort_backend.export_onnx(program, onnx_dir, config.dtype, target="tensorrt")
    onnx_path = onnx_dir / ort_backend.ARTIFACT
    problems = check_ops(onnx_path)
    if problems:
        raise L4Error("the ONNX graph has operators TensorRT's ONNX parser does not support: " + "; ".join(problems))
    info["tensorrt_op_check"] = "pass"
    if config.dtype != "bfloat16":    # ONNX Runtime's CPU EP has no bf16 kernels
        info["onnxruntime_rel_error"] = check_numerics(onnx_path, program, config.dtype, config.quant)
    if not tensorrt_available():
        err = L4Error(NO_TENSORRT)
        err.info = info        # what was checked (op list, ONNX Runtime numerics): the parity matrix reports it
        raise err
    if config.device != "cuda":
        raise L4Error("the tensorrt backend builds for the GPU; pass --device cuda")
    plan = build_plan(onnx_path, program, config)
    (workdir / ARTIFACT).write_bytes(plan)
    for p in sorted(onnx_dir.iterdir()):
        p.unlink()
    onnx_dir.rmdir()
    import tensorrt as trt

    info.update(format="tensorrt-plan", tensorrt=trt.__version__)
    return BuildResult([ARTIFACT], info)


def _profile_shapes(program, name: str, seq: tuple[int, int, int]) -> tuple[tuple, tuple, tuple]:
    """(min, opt, max) shapes of input ``name`` for a profile whose sequence range is ``seq``."""
    b_max = program.max_batch
    if name == "input_ids":
        return (1, seq[0]), (1, seq[1]), (b_max, seq[2])
    if name == "start_pos":
        return (1,), (1,), (1,)
    layout = program.kv_layout
    i = int(name.split("_")[-1])
    _, n_kv, _, head_dim = layout["shape"]
    slots = layout["layers"][i]["slots"]
    return (1, n_kv, slots, head_dim), (1, n_kv, slots, head_dim), (b_max, n_kv, slots, head_dim)


def build_plan(onnx_path: Path, program, config) -> bytes:  # pragma: no cover - needs TensorRT and a GPU
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):   # implicit in TensorRT 10
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):         # reads external data next to the model
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise L4Error(f"TensorRT's ONNX parser rejected the model: {errs}")
    cfg = builder.create_builder_config()
    cfg.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if config.dtype == "float16":
        cfg.set_flag(trt.BuilderFlag.FP16)
    elif config.dtype == "bfloat16":
        cfg.set_flag(trt.BuilderFlag.BF16)
    else:
        cfg.clear_flag(trt.BuilderFlag.TF32)                 # float32 parity: no TF32 tensor-core rounding
    # This network is weakly typed: TensorRT 10 builds FP8 / INT4 Q/DQ layers only with the matching precision flag
    # (TensorRT 11 drops the flags, strong typing being the only mode there)
    quant_flag = {"fp8": "FP8", "int4": "INT4"}.get(config.quant)
    if quant_flag and hasattr(trt.BuilderFlag, quant_flag):
        cfg.set_flag(getattr(trt.BuilderFlag, quant_flag))
    max_seq = program.max_seq
    for seq in ((1, min(128, max_seq), max_seq), (1, 1, 1)):  # profile 0: prefill, profile 1: decode
        prof = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            name = network.get_input(i).name
            prof.set_shape(name, *_profile_shapes(program, name, seq))
        cfg.add_optimization_profile(prof)
    plan = builder.build_serialized_network(network, cfg)
    if plan is None:
        raise L4Error("TensorRT failed to build an engine from the ONNX model (see the TensorRT log above)")
    return bytes(plan)


class TrtRunner:  # pragma: no cover - needs TensorRT and a GPU
    """Runs the plan: context 0 (prefill profile) for seq > 1, context 1 (decode profile) for seq == 1."""

    def __init__(self, plan: bytes):
        import tensorrt as trt

        self.trt = trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(plan)
        if self.engine is None:
            raise L4Error("TensorRT could not deserialize model.plan (built by another TensorRT version or GPU?); "
                          "recompile the engine")
        self.contexts = []
        for p in range(self.engine.num_optimization_profiles):
            ctx = self.engine.create_execution_context()
            ctx.set_optimization_profile_async(p, torch.cuda.current_stream().cuda_stream)
            self.contexts.append(ctx)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) != mode]

    def __call__(self, *inputs: torch.Tensor):
        trt = self.trt
        ctx = self.contexts[1 if inputs[0].shape[1] == 1 and len(self.contexts) > 1 else 0]
        stream = torch.cuda.current_stream()
        keep = []
        for name, t in zip(self.inputs, inputs):
            want = _torch_dtype(trt, self.engine.get_tensor_dtype(name))
            t = t.detach().to(device="cuda", dtype=want).contiguous()
            keep.append(t)
            ctx.set_input_shape(name, tuple(t.shape))
            ctx.set_tensor_address(name, t.data_ptr())
        outs = []
        for name in self.outputs:
            o = torch.empty(tuple(ctx.get_tensor_shape(name)), device="cuda",
                            dtype=_torch_dtype(trt, self.engine.get_tensor_dtype(name)))
            ctx.set_tensor_address(name, o.data_ptr())
            outs.append(o)
        if not ctx.execute_async_v3(stream.cuda_stream):
            raise L4Error("TensorRT execution failed")
        stream.synchronize()
        return outs[0] if len(outs) == 1 else tuple(outs)


def _torch_dtype(trt, dt) -> torch.dtype:  # pragma: no cover - needs TensorRT
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32, trt.bool: torch.bool,
             trt.int8: torch.int8}
    for name, td in (("bfloat16", torch.bfloat16), ("int64", torch.int64)):
        if hasattr(trt, name):
            table[getattr(trt, name)] = td
    return table[dt]


def load(engine_dir: Path, manifest: dict[str, Any]):
    if not tensorrt_available():
        raise L4Error(f"engine {engine_dir} is a TensorRT engine; running it needs a CUDA GPU and the tensorrt "
                      "package (pip install 'l4compile[gpu]')")
    return TrtRunner((engine_dir / ARTIFACT).read_bytes())  # pragma: no cover
