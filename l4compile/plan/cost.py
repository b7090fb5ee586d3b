"""Cost model: per-token communication and an estimated decode step time per layout.

# N ranks, H hidden, K top-k, V vocab, a activation bytes (bf16 = 2), B batch (sequences in one step)
Communication, in bytes each rank sends per token of the global batch (ring collectives):
* all-reduce of an H-vector (TP attention / TP MLP with tokens replicated): ``2 (N-1)/N * H * a``;
  the same volume as an all-gather + reduce-scatter pair when tokens are rank-local (DP attention).
* expert dispatch + combine all-to-all (DP attention + EP): each token goes to K experts, remote with
  probability (N-1)/N, and comes back: ``2 * K (N-1)/N^2 * H * a`` - N/K times less than an all-reduce.
  With TP attention tokens are already on every rank, so EP needs no dispatch, only the all-reduce that
  sums the partial outputs (fused with the shared expert's).
* vocab-parallel: an all-reduce after the embedding and a gather of fp32 logit slices ``V*4/N``.

Decode step time (memory-bound roofline per rank, the slowest rank counts)::

    t = max_r max(bytes_read_r / HBM_BW, flops_r / PEAK_FLOPS)  +  collectives * LATENCY  +  B * comm / LINK_BW

``bytes_read_r``: every local non-expert weight, the local experts the step's B*K routed tokens are expected
to touch (``1 - (1 - p_e)^B`` for expert e with routing probability p_e: K/E, or the calibrated share), and
the rank's KV cache at the planned context. ``flops_r``: 2 * local weights * tokens the rank processes
(routed tokens by load share) + attention over the cache. Constants are H100 SXM figures; rankings between
layouts hardly depend on them. The planner picks the feasible layout with the lowest ``t``, then the
longest max context.
"""
from __future__ import annotations

from dataclasses import dataclass, field

HBM_BW = 3.35e12            # bytes/s, H100 SXM
LINK_BW = 450e9             # bytes/s per GPU per direction, NVLink 4 through NVSwitch
PEAK_FLOPS = 989e12         # dense bf16
LATENCY = 10e-6             # seconds per collective (NCCL small-message latency, NVLink)
ACT_BYTES = 2               # bf16 activations on the wire


@dataclass
class Comm:
    bytes_per_token: float = 0.0             # bytes each rank sends per token of the global batch
    collectives_per_step: int = 0
    breakdown: dict = field(default_factory=dict)   # kind -> bytes per token

    def add(self, kind: str, nbytes: float, collectives: int, times: int = 1) -> None:
        if times <= 0 or nbytes <= 0:
            return
        self.bytes_per_token += nbytes * times
        self.collectives_per_step += collectives * times
        self.breakdown[kind] = self.breakdown.get(kind, 0.0) + nbytes * times


def communication(s, cfg, n: int) -> Comm:
    """Per-token communication of strategy ``s`` on n ranks (see the module docstring)."""
    c = Comm()
    if n == 1:
        return c
    h, k, v = cfg.hidden_size, cfg.num_experts_per_tok, cfg.vocab_size
    ar = 2 * (n - 1) / n * h * ACT_BYTES
    n_moe = len(cfg.moe_layers)
    n_dense = cfg.num_hidden_layers - n_moe
    replicated_tokens = s.attention == "tp"
    if replicated_tokens:
        c.add("attention all-reduce", ar, 1, cfg.num_hidden_layers)
        if s.dense_mlp == "tp":
            c.add("dense MLP all-reduce", ar, 1, n_dense)
        c.add("MoE all-reduce (experts + shared)", ar, 1, n_moe)
    else:
        if s.dense_mlp == "tp":
            c.add("dense MLP all-gather + reduce-scatter", ar, 2, n_dense)
        if s.experts == "ep":
            c.add("expert all-to-all (dispatch + combine)", 2 * k * (n - 1) / n ** 2 * h * ACT_BYTES, 2, n_moe)
            if s.shared == "tp":
                c.add("shared expert all-gather + reduce-scatter", ar, 2, n_moe)
        else:
            c.add("MoE all-gather + reduce-scatter", ar, 2, n_moe)
    if s.vocab == "tp":
        c.add("embedding all-reduce", ar if replicated_tokens else (n - 1) / n * h * ACT_BYTES, 1)
        c.add("logits gather", (n - 1) / n * v * 4 / n, 1)
    return c


def touched_fraction(p: float, tokens: int) -> float:
    """Probability an expert with routing probability p (per token) is used by at least one of ``tokens``."""
    p = min(max(p, 0.0), 1.0)
    return 1.0 - (1.0 - p) ** max(tokens, 0)


def step_time(bytes_read: float, flops: float, comm: Comm, batch: int) -> dict:
    mem_s, compute_s = bytes_read / HBM_BW, flops / PEAK_FLOPS
    comm_s = comm.collectives_per_step * LATENCY + batch * comm.bytes_per_token / LINK_BW
    return {"memory_s": mem_s, "compute_s": compute_s, "comm_s": comm_s, "step_s": max(mem_s, compute_s) + comm_s}
