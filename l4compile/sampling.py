# B batch, V vocab, W candidates per sequence (k with top-k, else V)
"""How ``Engine.generate`` picks each next token: greedy (the default) or sampled, and where a sequence stops.

    logits [B, V] -> / temperature -> top-k (keep the k largest) -> top-p (keep the smallest prefix of the sorted
                  distribution whose mass reaches p) -> softmax p [B, W] -> argmax(p / q) -> token [B, 1]

Sampling draws with the exponential race: ``argmax(p_i / q_i)`` with ``q_i ~ Exp(1)`` independent is a draw from
``p``. The noise ``q`` [B, W] comes from a ``torch.Generator`` seeded per ``generate`` call and is drawn into a
buffer before each step, outside the step itself: so the step is free of RNG state (a CUDA graph replays it as it
is) and the "loop", "static" and "graph" decode modes draw the same tokens for the same seed. Every operation has a
static shape and no host synchronisation, so a decode step that samples can be captured.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import Tensor

from l4compile.errors import L4Error

_TINY = 1e-20          # Exp(1) draws of exactly 0 would make p / q infinite (or 0 / 0 for masked tokens)


@dataclass(frozen=True)
class Sampling:
    """Next-token selection. ``temperature`` 0 is greedy (argmax) and takes no other field; above 0 the
    distribution ``softmax(logits / temperature)`` is cut to its ``top_k`` most likely tokens and to its ``top_p``
    nucleus (None: no cut) and sampled with a generator seeded by ``seed`` (None: a fresh seed per call)."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise L4Error(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        object.__setattr__(self, "temperature", float(t))
        k, p, s = self.top_k, self.top_p, self.seed
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise L4Error(f"top_k must be a positive integer, got {k!r}")
        if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1):
            raise L4Error(f"top_p must be a number in (0, 1], got {p!r}")
        if s is not None and (isinstance(s, bool) or not isinstance(s, int) or s < 0):
            raise L4Error(f"seed must be a non-negative integer, got {s!r}")
        if self.greedy and (k, p, s) != (None, None, None):
            given = ", ".join(n for n, v in (("top_k", k), ("top_p", p), ("seed", s)) if v is not None)
            raise L4Error(f"{given} only apply when sampling; set a temperature above 0 (0 is greedy)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def noise_width(self, vocab: int) -> int:
        """Draws per sequence and step: one per candidate token (the top k, else the whole vocabulary)."""
        return min(self.top_k or vocab, vocab)

    def to_dict(self) -> dict[str, Any]:
        """What a report records: {} for greedy, else the fields that are set."""
        if self.greedy:
            return {}
        return {k: v for k, v in (("temperature", self.temperature), ("top_k", self.top_k), ("top_p", self.top_p),
                                  ("seed", self.seed)) if v is not None}

    @classmethod
    def of(cls, value: "Sampling | dict | None") -> "Sampling":
        """``generate(sampling=...)``: a Sampling, a dict of its fields, or None (greedy)."""
        if value is None:
            return GREEDY
        if isinstance(value, Sampling):
            return value
        if isinstance(value, dict):
            unknown = sorted(set(value) - {"temperature", "top_k", "top_p", "seed"})
            if unknown:
                raise L4Error(f"unknown sampling field {unknown[0]!r}; the fields are temperature, top_k, top_p, seed")
            return cls(**value)
        raise L4Error(f"sampling takes a Sampling, a dict or None, got {type(value).__name__}")


GREEDY = Sampling()


def pick(logits: Tensor, sampling: Sampling, noise: Tensor | None = None) -> Tensor:
    """logits [B, V] -> next tokens [B, 1] int64. ``noise`` [B, sampling.noise_width(V)] float32 holds Exp(1) draws
    (``NoiseSource``); greedy takes none. The cuts rank the candidates (top-k: ``topk``, top-p alone: a full sort)
    and the draw races in rank order, so no [B, V] scatter back is needed; the noise is iid, so which candidate
    gets which draw does not matter."""
    if sampling.greedy:
        return logits.argmax(-1, keepdim=True)
    x = logits.float() / sampling.temperature                                  # [B, V]
    order = None
    if sampling.top_k is not None and sampling.top_k < x.shape[-1]:
        x, order = x.topk(sampling.top_k, dim=-1)                              # [B, k] each, largest first
    elif sampling.top_p is not None and sampling.top_p < 1:
        x, order = x.sort(dim=-1, descending=True)                             # [B, V] each
    if sampling.top_p is not None and sampling.top_p < 1:
        p = x.softmax(-1)
        x = x.masked_fill(p.cumsum(-1) - p >= sampling.top_p, -math.inf)   # the mass before reaches top_p: cut
    choice = (x.softmax(-1) / noise).argmax(-1, keepdim=True)                 # [B, 1]: a rank, or a token id
    return choice if order is None else order.gather(-1, choice)


class NoiseSource:
    """The Exp(1) draws one ``generate`` call samples with: a generator on ``device`` seeded by ``sampling.seed``.
    ``fill(buf)`` overwrites ``buf`` [B, noise_width] with the next draws, -log(U) with U uniform on [0, 1) (on the
    CPU ~6x faster than ``exponential_``), clamped away from 0."""

    def __init__(self, sampling: Sampling, device: torch.device):
        self.generator = torch.Generator(device=device)
        if sampling.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(sampling.seed)

    def fill(self, buf: Tensor) -> Tensor:
        return buf.uniform_(generator=self.generator).log_().neg_().clamp_min_(_TINY)


class StopTracker:
    """Per-sequence stopping for ``generate``: a sequence ends at the first token in ``stop_ids``; later positions
    of an ended sequence hold ``pad_id``. ``update(tok)`` [B, 1] -> the tokens to emit [B, 1]."""

    def __init__(self, stop_ids: Tensor, pad_id: int, batch: int):
        self.stop_ids = stop_ids                                                # [n] int64
        self.pad_id = pad_id
        self.done = torch.zeros(batch, 1, dtype=torch.bool, device=stop_ids.device)   # [B, 1]

    def update(self, tok: Tensor) -> Tensor:
        tok = tok.masked_fill(self.done, self.pad_id)
        self.done |= torch.isin(tok, self.stop_ids)
        return tok

    def all_done(self) -> bool:
        return bool(self.done.all())      # one host synchronisation per step


def check_token_ids(ids: Iterable[Any], vocab_size: int, what: str) -> list[int]:
    """Integers in [0, vocab_size) -> list, else L4Error naming ``what``."""
    try:
        out = list(ids)
    except TypeError:
        raise L4Error(f"{what} must be a list of token ids, got {type(ids).__name__}") from None
    checked = []
    for t in out:
        try:
            if isinstance(t, bool):
                raise TypeError
            t = operator.index(t)        # int, numpy and 0-d torch integers
        except TypeError:
            raise L4Error(f"{what}: {t!r} is not an integer token id") from None
        if not 0 <= t < vocab_size:
            raise L4Error(f"{what}: token id {t} is outside the vocabulary [0, {vocab_size})")
        checked.append(t)
    return checked
