"""One small checkpoint for every sharded-execution test, its single-process reference, and plans / sharded
engines compiled on first use (so a test marked slow costs nothing unless it runs).

The checkpoint: 2 layers, layer 0 a dense MLP with RoPE and chunked attention, layer 1 a MoE (8 experts,
top-2, so one token's two assignments land on different ranks) with NoPE full attention (its KV cache holds
the whole context while layer 0's is a ring of one chunk); 4 query heads and 2 kv heads.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import l4compile
from l4compile.plan import PlanRequest, make_plan
from l4compile.plan.layouts import Strategy
from l4compile.plan.memory import GiB
from l4compile.sampling import Sampling
from tests.conftest import QUICK_INDUCTOR, run_cli, save_checkpoint

PROMPT = [3, 17, 250, 9, 41, 77, 123, 5, 300, 64, 12, 201, 88, 19, 150, 222, 7, 99, 31]   # crosses chunks of 8
NEW = 10
MAX_SEQ = 64
SAMPLED = Sampling(temperature=1.0, top_p=0.95, seed=5)      # `run --temperature 1 --top-p 0.95 --seed 5`
CKPT = dict(num_hidden_layers=2, interleave_moe_layer_step=2, no_rope_layers=[1, 0], num_local_experts=8,
            num_experts_per_tok=2, router_std=0.5)


class ShardedSetup:
    """The checkpoint, the single-process engine's logits / greedy tokens, and sharded engines by name."""

    def __init__(self, root):
        self.root = root
        self.ckpt = save_checkpoint(root / "ckpt", **CKPT)
        single = l4compile.compile(str(self.ckpt), out=root / "single", max_seq_len=MAX_SEQ, max_batch_size=1,
                                   inductor_configs=QUICK_INDUCTOR)
        ids = torch.tensor([PROMPT])
        self.logits = single.prefill(ids)[0].float().numpy()                          # [S, V]
        self.generated = single.generate(ids, max_new_tokens=NEW)[0, len(PROMPT):].tolist()
        self.sampled = single.generate(ids, max_new_tokens=NEW, sampling=SAMPLED)[0, len(PROMPT):].tolist()
        self.engines: dict[str, object] = {}
        self.plans: dict[str, dict] = {}

    def plan(self, gpus: int, strategy: Strategy | None = None) -> dict:
        """``l4compile plan --json`` for this checkpoint; with ``strategy``, that (valid) layout's plan."""
        p = make_plan(PlanRequest(str(self.ckpt), gpus=gpus, gpu_mem=8 * GiB, max_seq_len=MAX_SEQ))
        if strategy is not None:
            (p.best,) = [e for e in p.evaluations if e.strategy == strategy and e.invalid is None]
        return p.to_json()

    def engine(self, name: str, plan: dict):
        """Compile (once per name) the sharded engine for ``plan`` -> its directory."""
        if name not in self.engines:
            path = self.root / f"{name}.plan.json"
            path.write_text(json.dumps(plan))
            self.plans[name] = plan
            self.engines[name] = l4compile.compile(str(self.ckpt), out=self.root / name, max_seq_len=MAX_SEQ,
                                                   max_batch_size=1, plan=path, inductor_configs=QUICK_INDUCTOR).path
        return self.engines[name]

    def run(self, name: str, nproc: int, *extra: str) -> tuple[float, list[int]]:
        """``l4compile run ENGINE --nproc N [extra]`` -> (max relative logit error vs single process, tokens)."""
        out = self.root / f"{name}.logits.npy"
        r = run_cli("run", str(self.engines[name]), "--nproc", str(nproc), "--prompt-ids", ",".join(map(str, PROMPT)),
                    "--max-new-tokens", str(NEW), "--logits-out", str(out), *extra)
        assert r.returncode == 0, r.stderr[-3000:]
        logits = np.load(out)
        assert logits.shape == self.logits.shape
        rel = float(np.abs(logits - self.logits).max() / np.abs(self.logits).max())
        print(f"{name} ({nproc} processes): max rel logit error {rel:.3g}")
        return rel, json.loads(r.stdout.strip().splitlines()[-1])["generated_ids"]


@pytest.fixture(scope="session")
def sharded(tmp_path_factory) -> ShardedSetup:
    return ShardedSetup(tmp_path_factory.mktemp("sharded"))
