"""AOTInductor's CPU wrapper on torch 2.11: FP8 kernel arguments without their C++ type.

An FP8 engine's CPU kernels read float8 weights, so the wrapper .cpp declares them with ``const at::Float8_e4m3fn*``
arguments. torch 2.13's ``aoti_torch/c/shim.h`` (which the wrapper includes) brings that type's header; 2.11's does
not, and the C++ compile of every FP8 CPU engine fails there ("'Float8_e4m3fn' in namespace 'at' does not name a
type"). ``install()`` adds the include to the wrapper's header on a torch whose shim lacks it; elsewhere it does
nothing. Found by the suite under torch 2.11.0 (``make test-host-torch``)."""
from __future__ import annotations

from pathlib import Path

HEADER = "c10/util/Float8_e4m3fn.h"


def needed() -> bool:
    """Whether this torch's AOTInductor C shim leaves the float8 header out."""
    import torch

    shim = Path(torch.__file__).parent / "include" / "torch" / "csrc" / "inductor" / "aoti_torch" / "c" / "shim.h"
    try:
        return HEADER not in shim.read_text()
    except OSError:             # no headers at all: the C++ compile has nothing to add an include to
        return False


def install() -> bool:
    """Idempotent; True when the wrapper's header now includes the float8 type (this torch needed it)."""
    if not needed():
        return False
    from torch._inductor.codegen.cpp_wrapper_cpu import CppWrapperCpu
    from torch._inductor.virtualized import V

    write_header = CppWrapperCpu.write_header
    if getattr(write_header, "_l4_fp8", False):
        return True

    def with_fp8(self):
        write_header(self)
        if V.graph.aot_mode and not V.graph.is_const_graph:     # a constant graph's header is the main module's
            self.header.splice(f"#include <{HEADER}>")

    with_fp8._l4_fp8 = True
    CppWrapperCpu.write_header = with_fp8
    return True
