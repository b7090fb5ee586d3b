"""GPU kernels behind the l4 ops on CUDA: Triton kernels registered as ``torch.library.triton_op`` (so Inductor and
AOTInductor compile them into engines) and the ``torch._scaled_mm`` FP8 path.

Files (one kernel each; pure-PyTorch host code apart)::

    layout.py            tile maps for expert-grouped GEMMs, block-size choices      (torch only)
    fp8_scaled_mm.py     W8A8 linear through torch._scaled_mm (row-wise scales)      (torch only)
    moe_gate_up.py       grouped [x*s] @ [gate|up] + SwiGLU epilogue                 (Triton kernel)
                         ``swiglu_store``: the epilogue all gate_up kernels share
    moe_down.py          grouped act @ down                                          (Triton kernel)
    moe_route.py         top-1 routing -> the whole grouped-row / tile map           (Triton kernel)
    int4_mm.py           weight-only Int4 GEMM/GEMV, the quantize pass's packing;    (Triton kernel)
                         ``int4_tile``: the packed-tile load + unpack all Int4 kernels share
    moe_int4_gate_up.py  grouped [x*s] @ Int4 [gate|up]^T + SwiGLU epilogue          (Triton kernel)
    moe_int4_down.py     grouped act @ Int4 down^T                                   (Triton kernel)
    fp8_rows.py          per-row FP8 activation quantization in-kernel, FP8 weight   (Triton helpers)
                         tiles and dots, shared by the two FP8 MoE kernels
    moe_fp8_gate_up.py   grouped fp8([x*s]) @ FP8 [gate|up]^T + SwiGLU epilogue      (Triton kernel)
    moe_fp8_down.py      grouped fp8(act) @ FP8 down^T                               (Triton kernel)
    attention.py         attention over the KV cache + new keys by position, split   (Triton kernels)
                         key ranges, and the merge of the splits (+ the cache write)
    norm_router.py       a MoE layer's residual add + RMSNorm + router, one launch    (Triton kernel)
    ops.py               ``l4::moe_fused``, ``l4::moe_q_fused``, ``l4::moe_fp8_fused``, (needs Triton)
                         ``l4::int4_mm``, ``l4::attention_fused[_inplace]``,
                         ``l4::add_rms_norm_router`` (triton_op) + host glue
    access_memo.py       torch's which-arguments-a-kernel-writes analysis, once per   (torch only)
                         kernel signature, not per traced call (compile time)
    tuned_blocks.py      the Int4 blocks measured for an engine's GPU, active while   (torch only)
                         its kernel ops are traced (else layout's static choice)
    timing.py            device time of a kernel call as engines launch it (CUDA     (torch only)
                         graph replay, L2 flushed)
    autotune.py          ``compile --tune-kernels``: each Int4 problem's candidate     (needs Triton to run)
                         blocks checked and timed on the GPU, the fastest kept
    tune_process.py      that tuning in a child process: a candidate that crashes,      (torch only)
                         hangs or faults the GPU is left out, not the compile
    dispatch.py          CUDA kernels of ``l4::moe``/``l4::moe_q``/``l4::linear_int4``/``l4::linear_fp8``/
                         ``l4::attention_cached`` and the CUDA decompositions the    (torch only)
                         Inductor backend applies

Importing ``l4compile`` (or this package) never imports Triton: ``triton_available()`` checks lazily, and
only ``ops``/the kernel files import it. Correctness tests run the kernels on CPU tensors under Triton's
interpreter (``TRITON_INTERPRET=1``, see tests/kernels); on CUDA they are compiled and launched as usual.
"""
from __future__ import annotations

import functools
import importlib.util
import os


@functools.cache
def triton_available() -> bool:
    """True when ``import triton`` works (the package alone; no GPU needed under the interpreter)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # a broken or mismatched install counts as missing
        return False
    return True


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def why_unavailable() -> str | None:
    """None when the Triton kernels can run in this process, else the reason (for skips and errors)."""
    if not triton_available():
        return ("triton is not installed (GPU hosts get it with torch; on a CPU machine: "
                "pip install -e '.[kernels]' or make test-kernels; its tests then run under TRITON_INTERPRET=1)")
    return None
