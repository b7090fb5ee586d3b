# T tokens, E experts, H hidden, I expert width, B batch, S context
"""Train the ``tiny-trained`` fixture: a small byte-level Llama 4 that has actually learned English.

Why: quantization (and anything else judged by perplexity or greedy text) needs weights that encode
something; random presets cannot tell a good Int4 scheme from a broken one.

Corpus: the string contents of the stdlib's ``pydoc_data/topics.py`` (Python's language-reference help
topics, ~465 KB of English), present in every CPython install. Bytes are tokens (ids 0-255) plus
BOS 256 / EOS 257 / PAD 258. The last 5% of the byte stream is held out.

Model: ``Llama4ForCausalLM``, 4 layers (layer 3 is NoPE), hidden 128, 4 heads / 2 kv heads of 32, 8 routed
experts of width 256 + shared expert, top-1, attention chunk 32 < context 128, qk-norm, floor_scale 32 (so
NoPE temperature tuning is active inside the context). Training runs the transformers model through
``l4compile.program.CausalLMHarness`` (same position-derived masks as the compiler) with the MoE block's
forward swapped for a mathematically identical sparse one (only the selected expert per token), so a few
minutes of CPU suffice. A small switch-style load-balancing loss keeps every expert in use.

    python benchmarks/train_tiny.py                       # writes l4compile/data/tiny-trained/
    python benchmarks/train_tiny.py --steps 50 --out /tmp/t   # smoke run
    python benchmarks/train_tiny.py --tokenizer-only          # (re)writes only its tokenizer.json

The checkpoint ships a ``tokenizer.json`` (Hugging Face ``tokenizers``) that maps each UTF-8 byte to its own id, so
``l4compile run ENGINE --prompt TEXT`` works on its engines.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "l4compile" / "data" / "tiny-trained"
BOS, EOS, PAD, VOCAB = 256, 257, 258, 259
CONTEXT = 128


def corpus_bytes() -> bytes:
    """The English corpus: every help topic of pydoc_data.topics, in sorted key order."""
    import pydoc_data.topics as topics

    return "".join(topics.topics[k] for k in sorted(topics.topics)).encode("utf-8")


def split(data: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (train ids, held-out ids): the last 5% of the stream is held out."""
    ids = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    cut = int(len(ids) * 0.95)
    return ids[:cut], ids[cut:]


def text_config():
    from transformers import Llama4TextConfig

    return Llama4TextConfig(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=256, intermediate_size_mlp=512,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        num_local_experts=8, num_experts_per_tok=1, interleave_moe_layer_step=1, moe_layers=[0, 1, 2, 3],
        attention_chunk_size=32, max_position_embeddings=512, floor_scale=32, attn_scale=0.1,
        use_qk_norm=True, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        initializer_range=0.02, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
        tie_word_embeddings=False)


SPECIAL_TOKENS = {BOS: "<|begin_of_text|>", EOS: "<|end_of_text|>", PAD: "<|pad|>"}


def _bytes_to_unicode() -> dict[int, str]:
    """The byte-level alphabet (GPT-2's): printable bytes stand for themselves, the others for chars from 256 up."""
    chars = {b: chr(b) for b in (*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100))}
    return chars | {b: chr(256 + n) for n, b in enumerate(b for b in range(256) if b not in chars)}


def write_tokenizer(out: Path) -> Path:
    """``out/tokenizer.json``: byte b -> id b (no merges), BOS / EOS / PAD as special tokens 256-258; no BOS is added
    (the model was trained on the raw byte stream)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    chars = _bytes_to_unicode()
    tok = Tokenizer(models.BPE({chars[b]: b for b in range(256)}, [], ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(SPECIAL_TOKENS[i], special=True) for i in sorted(SPECIAL_TOKENS)])
    assert all(tok.token_to_id(t) == i for i, t in SPECIAL_TOKENS.items())
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    return out / "tokenizer.json"


class _AuxLoss:
    """Collects the switch load-balancing term of every MoE block in one forward."""
    terms: list[torch.Tensor] = []


def sparse_moe_forward(self, hidden_states):
    """Drop-in for Llama4TextMoe.forward (same math, top-1 only): computes only the selected expert."""
    x = hidden_states.reshape(-1, self.hidden_dim)                        # [T, H]
    logits = F.linear(x, self.router.weight)                              # [T, E]
    val, idx = torch.topk(logits, 1, dim=1)                               # [T, 1]
    score = torch.sigmoid(val.float()).to(x.dtype)                        # [T, 1]
    out = self.shared_expert(x)                                           # [T, H]
    z = x * score                                                         # [T, H] score scales the INPUT
    idx = idx[:, 0]
    routed = torch.zeros_like(x)
    gu, dn = self.experts.gate_up_proj, self.experts.down_proj            # [E, H, 2I], [E, I, H]
    for e in range(gu.shape[0]):
        sel = (idx == e).nonzero(as_tuple=True)[0]
        if sel.numel():
            gate, up = (z[sel] @ gu[e]).chunk(2, dim=-1)                  # [t, I] each
            routed = routed.index_add(0, sel, (up * F.silu(gate)) @ dn[e])
    if self.training:
        n_exp = gu.shape[0]
        frac = torch.bincount(idx, minlength=n_exp).float() / idx.numel()  # [E] tokens per expert
        prob = logits.float().softmax(-1).mean(0)                          # [E]
        _AuxLoss.terms.append(n_exp * (frac * prob).sum())
    return out + routed, logits


def batches(train: torch.Tensor, batch: int, g: torch.Generator):
    n = len(train) - CONTEXT - 1
    while True:
        starts = torch.randint(0, n, (batch,), generator=g)
        chunk = torch.stack([train[s:s + CONTEXT + 1] for s in starts.tolist()])   # [B, S+1]
        yield chunk[:, :-1], chunk[:, 1:]


@torch.no_grad()
def perplexity(harness, ids: torch.Tensor, *, context: int = CONTEXT, max_windows: int | None = None) -> float:
    """Per-byte perplexity over non-overlapping windows of ``context`` bytes (each predicts its 127 next)."""
    n = (len(ids) - 1) // context
    if max_windows is not None:
        n = min(n, max_windows)
    nll, count = 0.0, 0
    for i in range(0, n, 16):
        rows = [ids[j * context:(j + 1) * context + 1] for j in range(i, min(n, i + 16))]
        x = torch.stack([r[:-1] for r in rows])
        y = torch.stack([r[1:] for r in rows])
        logits = harness(x).float()
        nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum"))
        count += y.numel()
    return math.exp(nll / count)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--max-seconds", type=float, default=420.0, help="wall-clock cap on the training loop")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=1, help="1: with other work on the box, 2 threads spin")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16", help="checkpoint dtype")
    ap.add_argument("--tokenizer-only", action="store_true", help="write only tokenizer.json into --out")
    args = ap.parse_args(argv)
    if args.tokenizer_only:
        print(write_tokenizer(args.out))
        return 0

    from transformers import Llama4ForCausalLM
    from transformers.models.llama4 import modeling_llama4

    from l4compile.program import CausalLMHarness

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train, held = split(corpus_bytes())
    model = Llama4ForCausalLM(text_config())
    modeling_llama4.Llama4TextMoe.forward = sparse_moe_forward          # training-time only, same math
    harness = CausalLMHarness(model)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "norm" not in n]
    other = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "norm" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    warmup = min(100, args.steps // 10)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        t = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))

    g = torch.Generator().manual_seed(args.seed)
    model.train()
    t0 = time.perf_counter()
    step = 0
    for step, (x, y) in enumerate(batches(train, args.batch, g)):
        if step >= args.steps or time.perf_counter() - t0 > args.max_seconds:
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        _AuxLoss.terms = []
        logits = harness(x)
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))
        total = loss + 0.01 * torch.stack(_AuxLoss.terms).mean()
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0:
            print(f"step {step:5d}  loss {loss.item():.3f}  ({time.perf_counter() - t0:.0f}s)", flush=True)
    train_s = time.perf_counter() - t0
    model.eval()
    model = model.to(getattr(torch, args.dtype)).float()                 # evaluate what is saved
    harness = CausalLMHarness(model)
    ppl = perplexity(harness, held)
    print(f"held-out perplexity per byte: {ppl:.3f} after {step} steps, {train_s:.0f}s", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    model.to(getattr(torch, args.dtype)).save_pretrained(args.out)
    for stray in ("generation_config.json",):
        (args.out / stray).unlink(missing_ok=True)
    write_tokenizer(args.out)
    cmd = "python benchmarks/train_tiny.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    record = {"held_out_ppl_per_byte": round(ppl, 4), "steps": step, "batch": args.batch, "context": CONTEXT,
              "tokens_seen": step * args.batch * CONTEXT, "train_seconds": round(train_s, 1),
              "threads": args.threads, "seed": args.seed, "lr": args.lr, "dtype": args.dtype,
              "torch": torch.__version__, "corpus_bytes": len(train) + len(held), "held_out_bytes": len(held)}
    (args.out / "TRAINING.md").write_text(
        "# tiny-trained\n\nA byte-level Llama 4 (4 layers, layer 3 NoPE; hidden 128; 8 experts of width 256, top-1;"
        " chunk 32; qk-norm) trained on the string contents of the stdlib's `pydoc_data/topics.py`"
        " (last 5% held out).\n\n"
        f"- held-out perplexity per byte: **{ppl:.3f}** (context {CONTEXT}, non-overlapping windows)\n"
        f"- {step} steps of batch {args.batch} x {CONTEXT} bytes ({record['tokens_seen']:,} tokens),"
        f" {train_s:.0f} s on {args.threads} CPU threads (torch {torch.__version__})\n"
        f"- command: `{cmd.strip()}`\n\n```json\n{json.dumps(record, indent=1)}\n```\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
