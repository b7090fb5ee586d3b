"""Quantization checks shared by the quantize-pass and backend tests: independent reference quantizers
(written from the schemes' definitions, not from l4compile.quant), a plain-torch fake-quantized copy of a
transformers model (the spec every quantized engine must reproduce), and held-out perplexity on text."""
from __future__ import annotations

import copy
import math
import types

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn


# ---- independent reference quantizers (written from the scheme's definition, not from l4compile.quant) -----

def ref_int4_codes(w: torch.Tensor, group: int):
    """Loop form: -> codes [N, K] in [-8, 7] (int64) and scales [N, K/g] (bf16-rounded, as float)."""
    n_out, k = w.shape
    g = group if k % group == 0 else math.gcd(k, group)
    codes = torch.empty(n_out, k, dtype=torch.int64)
    scales = torch.empty(n_out, k // g)
    for n in range(n_out):
        for j in range(k // g):
            blk = w[n, j * g:(j + 1) * g].float()
            s = float((blk.abs().max() / 7).to(torch.bfloat16))
            scales[n, j] = s
            for i in range(g):
                codes[n, j * g + i] = int(max(-8, min(7, round(float(blk[i]) / s))))
    return codes, scales


def ref_pack(codes: torch.Tensor) -> torch.Tensor:
    rows = [[(int(r[i]) + 8) | ((int(r[i + 1]) + 8) << 4) for i in range(0, len(r), 2)] for r in codes.tolist()]
    return torch.tensor(rows, dtype=torch.uint8)


def ref_fake_int4(w: torch.Tensor, group: int) -> torch.Tensor:
    """w [..., N, K] -> dequantized int4 weights (vectorised, same definition as ref_int4_codes)."""
    k = w.shape[-1]
    g = group if k % group == 0 else math.gcd(k, group)
    blocks = w.float().unflatten(-1, (k // g, g))
    s = (blocks.abs().amax(-1, keepdim=True) / 7).to(torch.bfloat16).float()
    return (torch.round(blocks / s).clamp(-8, 7) * s).flatten(-2)


def ref_fake_fp8(w: torch.Tensor) -> torch.Tensor:
    """Per-row (output channel for weights, token for activations) e4m3 round trip."""
    s = w.float().abs().amax(-1, keepdim=True) / 448.0
    s = torch.where(s > 0, s, torch.ones_like(s))                 # all-zero rows (unrouted tokens) stay zero
    return (w.float() / s).to(FP8).float() * s


def fake_quant_copy(lm, scheme: str):
    """A plain-torch copy of the HF model with fake-quantized weights (and fp8 activations): the engine's spec."""
    m = copy.deepcopy(lm)
    fq_w = ref_fake_fp8 if scheme == "fp8" else (lambda w: ref_fake_int4(w, 128))
    act = (lambda x: ref_fake_fp8(x).to(x.dtype)) if scheme == "fp8" else (lambda x: x)
    with torch.no_grad():
        for name, mod in m.named_modules():
            if isinstance(mod, torch.nn.Linear) and (".self_attn." in name or ".shared_expert." in name):
                mod.weight.copy_(fq_w(mod.weight))
                mod.register_forward_pre_hook(lambda _m, a: (act(a[0]),))
            elif type(mod).__name__ == "Llama4TextExperts":
                mod.gate_up_proj.copy_(fq_w(mod.gate_up_proj.transpose(1, 2)).transpose(1, 2))
                mod.down_proj.copy_(fq_w(mod.down_proj.transpose(1, 2)).transpose(1, 2))

                def fwd(self, hs):
                    hs = act(hs.view(self.gate_up_proj.shape[0], -1, self.hidden_size))
                    gate, up = torch.bmm(hs, self.gate_up_proj).chunk(2, dim=-1)
                    return torch.bmm(act(up * F.silu(gate)), self.down_proj).view(-1, self.hidden_size)
                mod.forward = types.MethodType(fwd, mod)
    return m


def rel(a, b) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def held_out() -> torch.Tensor:
    import pydoc_data.topics as topics
    data = "".join(topics.topics[k] for k in sorted(topics.topics)).encode("utf-8")
    ids = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    return ids[int(len(ids) * 0.95):]


def windows(n: int, ctx: int = 128) -> torch.Tensor:
    ids = held_out()
    return torch.stack([ids[i * ctx:(i + 1) * ctx + 1] for i in range(n)])              # [n, ctx + 1]


def perplexity(fn, rows: torch.Tensor, batch: int = 4) -> float:
    nll = 0.0
    for i in range(0, len(rows), batch):
        r = rows[i:i + batch]
        logits = fn(r[:, :-1]).float()
        nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), r[:, 1:].reshape(-1), reduction="sum"))
    return math.exp(nll / rows[:, 1:].numel())
