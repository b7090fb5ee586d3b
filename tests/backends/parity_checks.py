"""Checks every backend's engines share: `l4compile run` against transformers eager (float32)."""
from __future__ import annotations

import json

import numpy as np
import torch
from transformers import Llama4ForCausalLM

from l4compile.cli import main

TOL = 1e-4


def rel_err(a, b) -> float:
    a, b = torch.as_tensor(a).float(), torch.as_tensor(b).float()
    return float((a - b).abs().max() / b.abs().max())


def eager_greedy(model, prompt: torch.Tensor, steps: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """transformers full recompute at every step -> (tokens [B, S + steps], last-position logits per step)."""
    seq, step_logits = prompt, []
    with torch.no_grad():
        for _ in range(steps):
            last = model(seq).logits[:, -1]
            step_logits.append(last)
            seq = torch.cat([seq, last.argmax(-1, keepdim=True)], 1)
    return seq, step_logits


def check_run_matches_eager(engine_dir, ckpt, tmp_path, capsys, steps: int = 32) -> None:
    """`l4compile run --logits-out` on a prompt crossing 5 chunks: prompt logits rel < TOL, then `steps` greedy
    tokens through the engine's cache identical to transformers'."""
    ref_model = Llama4ForCausalLM.from_pretrained(ckpt).eval()
    chunk = ref_model.config.attention_chunk_size
    prompt = torch.randint(0, ref_model.config.vocab_size, (1, 5 * chunk + 3), generator=torch.Generator().manual_seed(1))
    logits_file = tmp_path / "logits.npy"
    capsys.readouterr()
    assert main(["run", str(engine_dir), "--prompt-ids", ",".join(map(str, prompt[0].tolist())),
                 "--max-new-tokens", str(steps), "--logits-out", str(logits_file)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    with torch.no_grad():
        ref = ref_model(prompt).logits[0]
    got = np.load(logits_file)
    assert got.dtype == np.float32 and got.shape == tuple(ref.shape)
    assert rel_err(got, ref) < TOL
    seq, _ = eager_greedy(ref_model, prompt, steps)
    assert result["generated_ids"] == seq[0, prompt.shape[1]:].tolist()
