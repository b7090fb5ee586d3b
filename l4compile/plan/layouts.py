"""Candidate layouts: how each kind of weight is split over N ranks, and which experts each rank holds.

# N ranks, E experts, Hq / Hkv query / kv heads, D head_dim, I expert width, Imlp dense width, V vocab
Per weight group (Maverick alternates dense and MoE layers, so the dense MLP has its own choice):

* attention    ``tp``: q/o split by query heads, k/v by kv heads (replicated when N > Hkv); tokens are then
               replicated on every rank.  ``dp``: full attention weights on every rank, each rank serves
               its own sequences (their whole KV cache lives there).
* dense_mlp    ``tp`` (gate/up by rows, down by columns) or ``replicate``.
* shared       ``tp`` or ``replicate`` (the shared expert of each MoE layer).
* experts      ``ep``: whole experts per rank (even split, or balanced on calibrated loads); always, unless
               N > E, where ``tp`` (every expert's width I split over all ranks) is the fallback.
* vocab        ``tp``: embedding and lm_head split by vocabulary rows; ``replicate``.
Router, norms and rotary buffers are always replicated.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from l4compile.plan.inventory import ParamRecord


@dataclass(frozen=True)
class Strategy:
    attention: str = "tp"      # tp | dp
    dense_mlp: str = "tp"      # tp | replicate | n/a (no dense layers)
    shared: str = "tp"         # tp | replicate
    experts: str = "ep"        # ep | tp
    vocab: str = "tp"          # tp | replicate

    def label(self, n: int) -> str:
        if n == 1:
            return "single GPU"
        parts = [f"attn {self.attention.upper()}{n}"]
        if self.dense_mlp != "n/a":
            parts.append(f"dense {_short(self.dense_mlp, n)}")
        parts += [f"shared {_short(self.shared, n)}", f"experts {self.experts.upper()}{n}",
                  f"vocab {_short(self.vocab, n)}"]
        return ", ".join(parts)

    def to_dict(self) -> dict:
        return {"attention": self.attention, "dense_mlp": self.dense_mlp, "shared_expert": self.shared,
                "experts": self.experts, "vocab": self.vocab}


def _short(choice: str, n: int) -> str:
    return f"TP{n}" if choice == "tp" else "replicated" if choice == "replicate" else choice


def has_dense_layers(cfg) -> bool:
    return len(cfg.moe_layers) < cfg.num_hidden_layers


def invalid_reason(s: Strategy, cfg, n: int) -> str | None:
    """Why a strategy cannot run on n ranks, or None."""
    hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    if s.attention == "tp" and (hq % n or (n % hkv and hkv % n)):
        return f"attention TP needs N to divide {hq} query heads and N, {hkv} kv heads to divide one another"
    if s.dense_mlp == "tp" and cfg.intermediate_size_mlp % n:
        return f"dense MLP TP needs N to divide its width {cfg.intermediate_size_mlp}"
    if (s.shared == "tp" or s.experts == "tp") and cfg.intermediate_size % n:
        return f"expert TP needs N to divide the expert width {cfg.intermediate_size}"
    if s.experts == "ep" and n > cfg.num_local_experts:
        return f"expert parallelism needs N <= {cfg.num_local_experts} experts"
    return None


def candidates(cfg, n: int) -> list[Strategy]:
    """Every distinct strategy for n ranks (valid or not; ``invalid_reason`` tells)."""
    if n == 1:
        dense = "replicate" if has_dense_layers(cfg) else "n/a"
        return [Strategy("tp", dense, "replicate", "ep", "replicate")]
    dense = ("tp", "replicate") if has_dense_layers(cfg) else ("n/a",)
    experts = ("ep",) if n <= cfg.num_local_experts else ("tp",)    # EP always; TP only past one expert per rank
    return [Strategy(*c) for c in itertools.product(("tp", "dp"), dense, ("tp", "replicate"), experts,
                                                   ("tp", "replicate"))]


def kv_heads_local(s: Strategy, cfg, n: int) -> int:
    hkv = cfg.num_key_value_heads
    return max(1, hkv // n) if s.attention == "tp" else hkv


# ---------------------------------------------------------------- expert placement

def even_placement(num_experts: int, n: int) -> list[list[int]]:
    """Contiguous blocks; the first E % N ranks hold one more expert."""
    base, extra = divmod(num_experts, n)
    out, start = [], 0
    for r in range(n):
        c = base + (1 if r < extra else 0)
        out.append(list(range(start, start + c)))
        start += c
    return out


def balanced_placement(loads: list[float], n: int) -> list[list[int]]:
    """Greedy longest-processing-time: heaviest expert first onto the least-loaded rank that still has room;
    every rank keeps the even expert count (so memory stays balanced)."""
    caps = [len(x) for x in even_placement(len(loads), n)]
    ranks: list[list[int]] = [[] for _ in range(n)]
    load = [0.0] * n
    for e in sorted(range(len(loads)), key=lambda e: (-loads[e], e)):
        r = min((r for r in range(n) if len(ranks[r]) < caps[r]), key=lambda r: (load[r], r))
        ranks[r].append(e)
        load[r] += loads[e]
    return [sorted(x) for x in ranks]


def rank_loads(placement: list[list[int]], loads: list[float]) -> list[float]:
    return [sum(loads[e] for e in exp) for exp in placement]


# ---------------------------------------------------------------- local weight slices

def local_matrices(rec: ParamRecord, s: Strategy, cfg, n: int, n_local_experts: int) -> tuple[int, int, int]:
    """The rank-local part of one weight as (count, out, in): ``count`` matrices of [out, in] (output channels
    first, whatever the HF layout); per-output-channel / per-group scales follow from it."""
    sh, role = rec.shape, rec.role
    tp = lambda d, choice: d // n if choice == "tp" else d   # noqa: E731
    if role in ("embedding", "lm_head"):
        rows = math.ceil(sh[0] / n) if s.vocab == "tp" else sh[0]
        return 1, rows, sh[1]
    if role == "attn_q":
        return 1, tp(sh[0], s.attention), sh[1]
    if role in ("attn_k", "attn_v"):
        hkv = cfg.num_key_value_heads                # N > Hkv: each rank keeps one (replicated) kv head
        return 1, sh[0] * kv_heads_local(s, cfg, n) // hkv, sh[1]
    if role == "attn_o":
        return 1, sh[0], tp(sh[1], s.attention)
    if role == "dense_in":
        return 1, tp(sh[0], s.dense_mlp), sh[1]
    if role == "dense_out":
        return 1, sh[0], tp(sh[1], s.dense_mlp)
    if role == "shared_in":
        return 1, tp(sh[0], s.shared), sh[1]
    if role == "shared_out":
        return 1, sh[0], tp(sh[1], s.shared)
    if role == "expert_gate_up":            # [E, H, 2I], used as x @ W: out = 2I
        if s.experts == "ep":
            return n_local_experts, sh[2], sh[1]
        return sh[0], sh[2] // n, sh[1]
    if role == "expert_down":               # [E, I, H]: out = H, in = I
        if s.experts == "ep":
            return n_local_experts, sh[2], sh[1]
        return sh[0], sh[2], sh[1] // n
    if len(sh) == 2:
        return 1, sh[0], sh[1]
    return 1, 1, rec.numel
