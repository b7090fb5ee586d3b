# N out features, K in features, G Int4 scale group, E experts, H hidden, I expert width
"""Blocks measured on the GPU an engine is built for (``autotune``), in place of ``layout``'s static choice.

A table maps a GEMM problem to ``Int4Blocks``:

    ("int4_mm", N, K, G, dtype)          -> Int4Blocks                  l4::int4_mm / int4_mm_chained on [N, K/2]
    ("moe_q",  E, H, I, Gh, Gi, dtype)   -> (gate_up, down) Int4Blocks   l4::moe_q_fused

where dtype is the scales' dtype (the engine's: the quantize pass makes scales in the model dtype). While a table is
active (``use``), ``ops.default_int4_blocks`` and ``ops.fused_moe_int4`` launch what it holds for their problem, and
``layout``'s choice for any other. The choice is made when a triton_op body is traced, so an AOTInductor package
keeps it in its kernels; the jit runtime traces program.pt2 when it loads, and activates the engine's table
(manifest ``kernel_blocks``) around each call (``backends.inductor``).

Nothing here imports Triton.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator

import torch

from .layout import Int4Blocks

Key = tuple
Choice = Int4Blocks | tuple[Int4Blocks, Int4Blocks]

_ACTIVE: list[dict[Key, Choice]] = []


def int4_key(n_out: int, k_in: int, group: int, dtype: torch.dtype) -> Key:
    return ("int4_mm", int(n_out), int(k_in), int(group), _dtype_name(dtype))


def moe_key(n_exp: int, hidden: int, inter: int, group_h: int, group_i: int, dtype: torch.dtype) -> Key:
    return ("moe_q", int(n_exp), int(hidden), int(inter), int(group_h), int(group_i), _dtype_name(dtype))


def _dtype_name(dtype: torch.dtype | str) -> str:
    return dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")


@contextlib.contextmanager
def use(table: dict[Key, Choice] | None) -> Iterator[None]:
    """Activate ``table`` (None or empty: nothing changes) for the body; nests, the innermost table first."""
    if not table:
        yield
        return
    _ACTIVE.append(table)
    try:
        yield
    finally:
        _ACTIVE.pop()


def lookup(key: Key) -> Choice | None:
    """The active table's blocks for ``key``, or None (then ``layout``'s static choice applies)."""
    for table in reversed(_ACTIVE):
        if key in table:
            return table[key]
    return None


def label(b: Int4Blocks, down: Int4Blocks | None = None) -> str:
    """A configuration in a line: "BN64 BK128" plus what differs from ``layout``'s defaults (``down``: a MoE's second
    GEMM, whose split may differ; its other fields are taken to be gate_up's)."""
    splits = (b.split_k, down.split_k) if down is not None else (b.split_k,)
    return (f"BN{b.block_n} BK{b.block_k}" + (" SK" + "/".join(map(str, splits)) if max(splits) > 1 else "")
            + (" bf16x2" if b.bf16x2 else "") + (f" NS{b.num_stages}" if b.num_stages else "")
            + (f" NW{b.num_warps}" if b.num_warps else "") + ("" if b.fma_unpack else " bytes"))


def choice_label(choice: Choice) -> str:
    return label(*choice) if isinstance(choice, tuple) else label(choice)


def blocks_to_dict(b: Int4Blocks) -> dict[str, Any]:
    return dataclasses.asdict(b)


def blocks_from_dict(d: dict[str, Any]) -> Int4Blocks:
    fields = {f.name for f in dataclasses.fields(Int4Blocks)}
    if not isinstance(d, dict) or set(d) - fields or not {"block_m", "block_n", "block_k", "scale_per_block"} <= set(d):
        raise ValueError(f"not an Int4Blocks record: {d!r}")
    return Int4Blocks(**d)


def choice_to_json(choice: Choice) -> Any:
    return [blocks_to_dict(b) for b in choice] if isinstance(choice, tuple) else blocks_to_dict(choice)


def choice_from_json(key: Key, value: Any) -> Choice:
    if key[0] == "moe_q":
        if not isinstance(value, list) or len(value) != 2:
            raise ValueError(f"{key}: expected [gate_up, down] blocks, got {value!r}")
        return blocks_from_dict(value[0]), blocks_from_dict(value[1])
    if key[0] == "int4_mm":
        return blocks_from_dict(value)
    raise ValueError(f"unknown kernel problem {key!r}")


def table_of(kernel_blocks: dict[str, Any] | None) -> dict[Key, Choice]:
    """The table of a tuning result (``autotune.tune``'s, a manifest's ``kernel_blocks``; None: empty). Problems
    without a correct candidate (``blocks`` None) keep layout's choice; ValueError for a record that is not one."""
    table: dict[Key, Choice] = {}
    for r in (kernel_blocks or {}).get("problems", ()):
        if r.get("blocks") is not None:
            key = tuple(r["key"])
            table[key] = choice_from_json(key, r["blocks"])
    return table
