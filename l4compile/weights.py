"""Weight sources: where a compile's weights come from, one tensor at a time.

A compile normally builds the whole transformers model in memory (checkpoints: float32 staging, then a cast).
With ``--stream-weights`` the model is built and traced on the META device, and a weight's values are read from
a ``WeightSource`` only when something needs them:

* the quantize pass loads each float weight, quantizes it and keeps only the packed result (``PassContext.weight``),
  so the float model never exists in memory at once: full Scout is 218 GB in bf16 and ~58 GB in Int4;
* ``materialize`` then loads what the graph still reads (embeddings, norms, router, unquantized projections)
  straight into the engine's dtype on the engine's device, moves buffers the passes made (RoPE tables) there too,
  and re-points the device arguments that tracing on meta left in the graph (``arange(.., device=meta)``).

Sources (``load(name, dtype, device) -> Tensor``; ``name`` is a transformers parameter or buffer name)::

    CheckpointWeights   a checkpoint's safetensors files, read tensor by tensor (validated by the frontend first)
    RandomWeights       seeded random weights for full-size presets, drawn per tensor on the target device
    StateDictWeights    tensors already in memory (computed buffers such as RoPE inv_freq; tests)
    Overlay             the first of several sources that has the name
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Protocol

import torch
from torch import Tensor

from l4compile.errors import L4Error


class WeightSource(Protocol):
    def __contains__(self, name: str) -> bool: ...

    def load(self, name: str, dtype: torch.dtype, device: str | torch.device) -> Tensor: ...


def _cast(t: Tensor, dtype: torch.dtype, device) -> Tensor:
    """Floating tensors take the engine dtype; integer/bool tensors keep theirs."""
    return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)


@dataclass(frozen=True)
class StateDictWeights:
    tensors: Mapping[str, Tensor]

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def load(self, name: str, dtype: torch.dtype, device) -> Tensor:
        return _cast(self.tensors[name], dtype, device)


@dataclass(frozen=True)
class CheckpointWeights:
    """``index``: parameter name -> (safetensors file, tensor name in it), as the frontend validated it."""

    index: Mapping[str, tuple[Path, str]]

    def __contains__(self, name: str) -> bool:
        return name in self.index

    def load(self, name: str, dtype: torch.dtype, device) -> Tensor:
        from safetensors import SafetensorError, safe_open

        f, key = self.index[name]
        try:
            with safe_open(str(f), framework="pt") as fh:
                t = fh.get_tensor(key)
        except (SafetensorError, OSError) as e:
            raise L4Error(f"cannot read tensor '{key}' from {f}: {e}") from None
        return _cast(t, dtype, device)


def tensor_seed(seed: int, name: str) -> int:
    """One generator seed per (seed, tensor name): a tensor's values do not depend on load order."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


RANDOM_CHUNK = 1 << 26          # float32 elements drawn at once (256 MB): Scout's gate_up would be 5.4 GB at once


@dataclass(frozen=True)
class RandomWeights:
    """Random weights by role: norms 1, routed experts N(0, expert_std), everything else N(0, std). Drawn in float32
    chunks of leading rows on ``device`` with a per-tensor generator, so the same seed gives the same weights on the
    same device kind, whatever order tensors are loaded in."""

    shapes: Mapping[str, tuple[int, ...]]
    seed: int
    std: float
    expert_std: float | None = None

    def __contains__(self, name: str) -> bool:
        return name in self.shapes

    def load(self, name: str, dtype: torch.dtype, device) -> Tensor:
        from l4compile.quant import role_of

        shape = self.shapes[name]
        role = role_of(name)
        if role == "norm":
            return torch.ones(shape, dtype=dtype, device=device)
        std = self.expert_std if role.startswith("expert_") and self.expert_std is not None else self.std
        g = torch.Generator(device=device).manual_seed(tensor_seed(self.seed, name))
        out = torch.empty(shape, dtype=dtype, device=device)
        rows = max(1, RANDOM_CHUNK // max(1, out[0].numel())) if out.dim() else 1
        for r0 in range(0, max(1, shape[0] if shape else 1), rows):   # float32 draws one chunk at a time
            part = out[r0:r0 + rows] if out.dim() else out
            part.copy_(torch.randn(part.shape, generator=g, device=device, dtype=torch.float32) * std)
        return out


@dataclass(frozen=True)
class Overlay:
    sources: tuple

    def __contains__(self, name: str) -> bool:
        return any(name in s for s in self.sources)

    def load(self, name: str, dtype: torch.dtype, device) -> Tensor:
        for s in self.sources:
            if name in s:
                return s.load(name, dtype, device)
        raise KeyError(name)


# ---- filling meta tensors -------------------------------------------------------------------------------------

def normalize(device) -> torch.device:
    """``cuda`` -> ``cuda:<current>`` so tensors already there compare equal."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _set(root: torch.nn.Module, name: str, value: Tensor) -> None:
    owner_path, _, leaf = name.rpartition(".")
    owner = root.get_submodule(owner_path) if owner_path else root
    if leaf in owner._parameters:
        owner._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)
    elif leaf in owner._buffers:
        owner._buffers[leaf] = value
    else:
        setattr(owner, leaf, value)


def _tensors(root: torch.nn.Module) -> Iterable[tuple[str, Tensor]]:
    """Every parameter and buffer, each storage once (tied weights keep the first name)."""
    yield from root.named_parameters(remove_duplicate=False)
    yield from root.named_buffers(remove_duplicate=False)


def materialize_module(root: torch.nn.Module, source: WeightSource, device, prefix: str = "") -> int:
    """Replace every meta tensor of ``root`` by ``source.load(prefix-less name)`` on ``device`` (same dtype), and move
    every other tensor to ``device``. Tied tensors (one meta tensor under two names) are loaded once.
    Returns the bytes loaded from the source."""
    device = normalize(device)
    done: dict[int, Tensor] = {}
    loaded = 0
    for name, t in list(_tensors(root)):
        if id(t) in done:
            _set(root, name, done[id(t)])
            continue
        if t.is_meta:
            key = name[len(prefix):] if prefix and name.startswith(prefix) else name
            if key not in source:
                raise L4Error(f"no values for '{key}': it is not in the weight source (a pass created a meta tensor "
                              "that --stream-weights cannot fill)")
            value = source.load(key, t.dtype, device)
            if tuple(value.shape) != tuple(t.shape):
                raise L4Error(f"weight '{key}' has shape {list(value.shape)}, the graph expects {list(t.shape)}")
            loaded += value.numel() * value.element_size()
        elif t.device != device:
            value = t.to(device)
        else:
            done[id(t)] = t
            continue
        done[id(t)] = value
        _set(root, name, value)
    return loaded


def retarget_devices(gm: torch.fx.GraphModule, device) -> int:
    """Point device arguments of graph nodes that are not ``device`` (left by tracing on meta) at ``device``.
    Returns how many nodes changed."""
    device = normalize(device)
    changed = 0

    def fix(v):
        return device if isinstance(v, torch.device) and v != device else v

    for node in gm.graph.nodes:
        args = tuple(fix(a) for a in node.args)
        kwargs = {k: fix(v) for k, v in node.kwargs.items()}
        if args != node.args or kwargs != node.kwargs:
            node.args, node.kwargs = args, kwargs
            changed += 1
    if changed:
        gm.recompile()
    return changed
