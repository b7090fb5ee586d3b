"""A stand-in for an H100's CUDA runtime, for ``aoti_sm90.py`` only: enough for Inductor / AOTInductor to generate
and Triton to compile a CUDA engine on a machine without a GPU (a CPU build of torch). Nothing runs on it.

``install()`` (once, in a process that does nothing else afterwards; ``install_triton()`` alone before an export) makes:
  * ``torch.cuda`` and Inductor's CUDA device interface answer device queries as one H100 SXM (sm_90, 132 SMs);
    device guards, streams and RNG state become no-ops;
  * Triton's active driver compile for ``GPUTarget("cuda", 90, 32)`` (the ptxas in the triton wheel) and launch
    nothing; loading a cubin returns null handles;
  * Inductor's compile-time autotuning run its candidates on CPU buffers through those no-op launches with a fixed
    timing (so the first candidate of each Inductor kernel wins; l4's kernels have one configuration each);
  * Python indexing of (fake) CUDA tensors goes through aten ops (the C++ path takes a device guard a CPU build lacks);
  * the pattern matcher and the joint-graph constant folding stay off: their tables and folds build real CUDA
    tensors.
Tested against torch 2.13 / triton 3.7 and torch 2.11 / triton 3.6, the lent GPU hosts' (they patch private
interfaces and may need updating with either).
"""
from __future__ import annotations

import contextlib
import types
from pathlib import Path

H100 = types.SimpleNamespace(
    name="NVIDIA H100 80GB HBM3 (no device: aoti_sm90.py)", major=9, minor=0, multi_processor_count=132,
    total_memory=80 * 2**30, max_threads_per_multi_processor=2048, max_threads_per_block=1024, warp_size=32,
    regs_per_multiprocessor=65536, shared_memory_per_block=48 * 1024, shared_memory_per_block_optin=227 * 1024,
    shared_memory_per_multiprocessor=228 * 1024, L2_cache_size=50 * 2**20, gcnArchName="", uuid="0",
    clock_rate=1980000, memory_clock_rate=2619000, memory_bus_width=5120, is_integrated=False)
_installed = False          # install_triton has run


def install_triton() -> None:
    """Triton's active driver: compile for ``GPUTarget("cuda", 90, 32)``, launch nothing. Install it before torch.export
    traces the triton_ops, as a GPU host has it: the export's mutation analysis of each kernel (which arguments it
    writes) generates TTIR for the active target and, failing that, assumes every input is mutated."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.driver import CudaDriver

    class Utils:          # what Triton's CudaUtils (a compiled module needing libcuda) offers, minus any effect
        def load_binary(self, name, kernel, shared, device):
            return 0, 0, 0, 0, 1024                       # module, function, n_regs, n_spills, max threads

        def get_device_properties(self, device):
            return {"max_shared_mem": H100.shared_memory_per_block_optin, "max_num_regs": 65536,
                    "multiprocessor_count": 132, "warpSize": 32, "sm_clock_rate": H100.clock_rate,
                    "mem_clock_rate": H100.memory_clock_rate, "mem_bus_width": H100.memory_bus_width}

        def set_printf_fifo_size(self, n):
            pass

    class Driver(CudaDriver):
        def __init__(self):                                # no CudaUtils(): it would build against libcuda
            self.utils = Utils()
            self.launcher_cls = lambda src, metadata: (lambda *a, **k: None)
            self.get_device_capability = lambda device=None: (9, 0)
            self.get_current_stream = lambda idx=None: 0
            self.get_current_device = lambda: 0
            self.set_current_device = lambda device: None

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    global _installed
    triton.runtime.driver.set_active(Driver())
    triton.runtime.driver._default = triton.runtime.driver.active
    _installed = True


def install(include_dir: Path) -> None:
    """Everything else (``install_triton`` too, if not yet); ``include_dir``: headers to name as the CUDA toolkit's
    (the triton wheel's); the C++ compile is not run."""
    import torch
    import torch._inductor.config as inductor_config
    import torch._inductor.fx_passes.joint_graph as joint_graph
    import torch._inductor.fx_passes.post_grad as post_grad
    import torch._inductor.graph as inductor_graph
    import torch._inductor.utils as inductor_utils
    import torch.utils.cpp_extension as cpp_extension
    from torch._dynamo import device_interface
    from torch._inductor.runtime import benchmarking
    from torch._inductor.select_algorithm import AlgorithmSelectorCache

    none = staticmethod(lambda *a, **k: None)
    zero = staticmethod(lambda *a, **k: 0)
    cuda_if = device_interface.CudaInterface
    for name, fn in (("get_device_properties", staticmethod(lambda device=None: H100)),
                     ("is_available", staticmethod(lambda: True)), ("current_device", zero),
                     ("device_count", staticmethod(lambda: 1)),
                     ("get_compute_capability", staticmethod(lambda d=None: 90)),
                     ("get_raw_stream", zero), ("synchronize", none), ("set_device", none),
                     ("exchange_device", zero), ("maybe_exchange_device", zero)):
        setattr(cuda_if, name, fn)
    for name, fn in (("get_device_properties", lambda device=None: H100), ("is_available", lambda: True),
                     ("current_device", lambda: 0), ("device_count", lambda: 1),
                     ("get_device_capability", lambda device=None: (9, 0)), ("set_device", lambda d: None),
                     ("_exchange_device", lambda idx: 0), ("_maybe_exchange_device", lambda idx: 0),
                     ("get_rng_state", lambda device="cuda": torch.zeros(16, dtype=torch.uint8)),
                     ("set_rng_state", lambda state, device="cuda": None),
                     ("_DeviceGuard", lambda idx: contextlib.nullcontext())):
        setattr(torch.cuda, name, fn)
    torch._C._cuda_getCurrentRawStream = lambda idx=None: 0
    import torch._subclasses.fake_tensor as fake_tensor
    fake_tensor.init_gpu_context = lambda device: None   # torch 2.11 makes a real CUDA tensor once it sees is_available

    if not _installed:
        install_triton()

    inductor_config.use_static_cuda_launcher = False      # a torch._C extension of CUDA builds
    inductor_config.compile_threads = 1                   # worker processes would not carry these patches
    inductor_config.pattern_matcher = False
    inductor_config.joint_graph_constant_folding = False
    joint_graph.lazy_init = post_grad.lazy_init = lambda *a, **k: None
    inductor_utils.is_same_tensor = inductor_graph.is_same_tensor = lambda a, b: a is b   # fakes: no data pointer
    AlgorithmSelectorCache.generate_example_value = staticmethod(
        lambda size, stride, device, dtype, *a, **k: torch.empty_strided(size, stride, dtype=dtype))
    for cls in vars(benchmarking).values():
        if isinstance(cls, type) and hasattr(cls, "benchmark_gpu"):
            cls.benchmark_gpu = lambda self, *a, **k: 1.0
    cpp_extension.CUDA_HOME = str(include_dir.parent)
    torch.Tensor.__getitem__ = _getitem_via_aten(torch.Tensor.__getitem__)


def _getitem_via_aten(original):
    """``Tensor.__getitem__`` for CUDA tensors built from aten views: int, slice, None, Ellipsis and index tensors
    (what l4compile's host code and the transformers model use); other devices keep ``original``."""
    import torch

    def getitem(x, idx):
        if x.device.type != "cuda":
            return original(x, idx)
        idx = idx if isinstance(idx, tuple) else (idx,)
        n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
        out, dim, tensors = x, 0, {}
        for i in idx:
            if i is Ellipsis:
                dim += x.dim() - n_real
            elif i is None:
                out = out.unsqueeze(dim)
                dim += 1
            elif isinstance(i, slice):
                out = torch.ops.aten.slice.Tensor(out, dim, 0 if i.start is None else i.start,
                                                  2**62 if i.stop is None else i.stop, i.step or 1)
                dim += 1
            elif isinstance(i, torch.Tensor):
                tensors[dim] = i
                dim += 1
            else:
                out = out.select(dim, i)
        if tensors:
            out = torch.ops.aten.index.Tensor(out, [tensors.get(d) for d in range(max(tensors) + 1)])
        return out

    return getitem
