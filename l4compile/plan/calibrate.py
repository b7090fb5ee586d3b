"""``--calibrate``: measure per-expert routing load on calibration prompts, for load-balanced EP placement.

Only a REAL checkpoint can be calibrated, and only one small enough to run here: routing depends on the
router and expert weights, so the routing of a preset (random weights), or of a small random proxy with the
same expert count, says nothing about the real model's hot experts. A full-size checkpoint would need the
full model in memory; above ``CALIBRATE_MAX_BYTES`` of float32 weights the planner refuses and explains
(place experts evenly, or calibrate on a GPU host with the serving runtime's routing statistics).

Prompts: ``--calibration-ids FILE`` (one prompt per line, comma-separated token ids) or, by default,
``DEFAULT_PROMPTS`` seeded random sequences of ``DEFAULT_LEN`` tokens (real text is better: give a file).
"""
from __future__ import annotations

from pathlib import Path

from l4compile.errors import L4Error

CALIBRATE_MAX_BYTES = 8 << 30
DEFAULT_PROMPTS = 8
DEFAULT_LEN = 128


def read_prompts(path: str, vocab: int) -> list[list[int]]:
    p = Path(path)
    if not p.is_file():
        raise L4Error(f"--calibration-ids file '{path}' does not exist")
    prompts = []
    for i, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            ids = [int(x) for x in line.replace(" ", "").split(",") if x]
        except ValueError:
            raise L4Error(f"{path}:{i}: expected comma-separated token ids") from None
        bad = [x for x in ids if not 0 <= x < vocab]
        if bad:
            raise L4Error(f"{path}:{i}: token id {bad[0]} is outside the vocabulary [0, {vocab})")
        prompts.append(ids)
    if not prompts:
        raise L4Error(f"--calibration-ids file '{path}' holds no prompts")
    return prompts


def measure_loads(model: str, records, cfg, ids_file: str | None) -> dict[int, list[float]]:
    """MODEL (a checkpoint directory) -> {MoE layer: tokens routed to each expert} over the prompts."""
    import torch

    from l4compile import frontend

    if not frontend.is_checkpoint_arg(model):
        raise L4Error(f"--calibrate needs a real checkpoint: preset '{model}' has random weights, and the routing "
                      "of random weights says nothing about the real model's expert loads; omit --calibrate "
                      "(experts are spread evenly) or give a checkpoint directory")
    need = sum(r.numel for r in records) * 4
    if need > CALIBRATE_MAX_BYTES:
        raise L4Error(f"--calibrate runs the checkpoint here in float32 and it needs {need / (1 << 30):.1f} GiB "
                      f"(limit {CALIBRATE_MAX_BYTES >> 30} GiB); omit --calibrate to spread experts evenly")
    vocab = int(cfg.vocab_size)
    if ids_file:
        prompts = read_prompts(ids_file, vocab)
    else:
        g = torch.Generator().manual_seed(0)
        prompts = torch.randint(0, vocab, (DEFAULT_PROMPTS, DEFAULT_LEN), generator=g).tolist()
    lm = frontend.load(model, dtype="float32").model
    k, e = int(cfg.num_experts_per_tok), int(cfg.num_local_experts)
    loads: dict[int, list[float]] = {}
    hooks = []
    for name, mod in lm.named_modules():
        if name.endswith("feed_forward.router"):
            layer = int(name.split("layers.")[1].split(".")[0])
            loads[layer] = [0.0] * e

            def hook(_m, _inp, out, layer=layer):
                logits = out[1] if isinstance(out, tuple) else out          # [T, E]
                idx = torch.topk(logits, k, dim=-1).indices.reshape(-1)
                for ex, c in enumerate(torch.bincount(idx, minlength=e).tolist()):
                    loads[layer][ex] += c
            hooks.append(mod.register_forward_hook(hook))
    if not hooks:
        raise L4Error("--calibrate found no MoE router in the model")
    try:
        with torch.no_grad():
            for ids in prompts:
                lm(input_ids=torch.tensor([ids]), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return loads
