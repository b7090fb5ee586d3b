"""Parity: an engine against transformers eager on the same model, same prompts.

Measures, per prompt, the max relative logit error ``max|engine - eager| / max|eager|`` and the agreement of
greedy tokens over ``steps`` new tokens (both sides decode greedily on their own outputs)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 1e-2}


@dataclass
class PromptResult:
    prompt_len: int
    max_rel_error: float
    tokens_agree: int
    tokens_total: int


@dataclass
class ParityReport:
    backend: str
    dtype: str
    quant: str
    tolerance: float
    prompts: list[PromptResult] = field(default_factory=list)

    @property
    def max_rel_error(self) -> float:
        return max((p.max_rel_error for p in self.prompts), default=0.0)

    @property
    def token_agreement(self) -> float:
        total = sum(p.tokens_total for p in self.prompts)
        return sum(p.tokens_agree for p in self.prompts) / total if total else 1.0

    @property
    def passed(self) -> bool:
        return self.max_rel_error < self.tolerance and self.token_agreement == 1.0

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "dtype": self.dtype, "quant": self.quant, "tolerance": self.tolerance,
                "max_rel_error": self.max_rel_error, "token_agreement": self.token_agreement,
                "status": "pass" if self.passed else "fail", "prompts": [asdict(p) for p in self.prompts]}


def default_prompts(vocab: int, chunk: int, max_seq: int, steps: int, seed: int = 0) -> list[torch.Tensor]:
    """Prompts of 1 token, just past one chunk, and across several chunks (as far as max_seq allows)."""
    g = torch.Generator().manual_seed(seed)
    room = max(1, max_seq - steps)
    lens = sorted({1, min(room, chunk + 3), min(room, 3 * chunk + 5)})
    return [torch.randint(0, vocab, (1, n), generator=g) for n in lens]


@torch.no_grad()
def eager_greedy(lm, ids: torch.Tensor, steps: int) -> torch.Tensor:
    for _ in range(steps):
        nxt = lm(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


@torch.no_grad()
def compare(engine, lm, prompts: list[torch.Tensor], steps: int) -> ParityReport:
    m = engine.manifest
    rep = ParityReport(m["backend"], m["dtype"], m.get("quant", "none"), TOLERANCE[m["dtype"]])
    for ids in prompts:
        ref = lm(input_ids=ids.to(engine.device), use_cache=False).logits.float()
        got = engine.prefill(ids).float()
        err = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
        n = min(steps, engine.max_seq_len - ids.shape[1])
        ours = engine.generate(ids, max_new_tokens=n)[:, ids.shape[1]:].cpu()
        theirs = eager_greedy(lm, ids.to(engine.device), n)[:, ids.shape[1]:].cpu()
        agree = int((ours == theirs).all(0).cumprod(0).sum())  # tokens agreeing before the first divergence
        rep.prompts.append(PromptResult(ids.shape[1], err, agree, n))
    return rep
