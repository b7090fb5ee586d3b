"""One decode step of l4::attention_cached at Scout's attention shape, against K/V expanded per query head.

    python benchmarks/bench_attention.py [--contexts 1024,4096,8192] [--batch 1] [--device cpu|cuda]
                                         [--dtype float32|bfloat16] [--eager-only] [--repeats 20] [--out FILE.json]

Scout: 40 query heads, 8 kv heads, head_dim 128. A global (NoPE) layer's cache holds CONTEXT slots and the step
decodes position CONTEXT-1 (a full cache); a chunked layer's ring buffer is the same shape at CONTEXT = 8192.

Variants, measured in the same run on the same inputs:
    expanded  K/V copied to every query head before attention (transformers' ``repeat_kv``; l4compile before
              the grouped form): the cache is written once more and read 5 more times
    grouped   l4compile's op: the 5 query heads of a kv head folded into the query length, K/V read as they are
Both run eagerly and, unless --eager-only, compiled by Inductor (``torch.compile``, static shapes) as the engine
compiles them; the compiled step returns the output alone, so like an engine's it copies no cache (eager's
out-of-place cache updates, the same for both variants, stay in its times). "cache MB" is what the step cannot avoid reading (k and v caches); "GB/s" is that over the time, so
it is comparable across variants, not a measured bandwidth. Also reports max |grouped - expanded|.
"""
# B batch, L cache slots
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from bench_kernels import timer  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 40, 8, 128


def attend_expanded(q, k, v, mask, n_heads, n_kv_heads, scaling):
    """The baseline: q [B, Hq, T, D], k/v [B, Hkv, N, D] expanded (copied) to [B, Hq, N, D]."""
    b, _, n, d = k.shape
    rep = n_heads // n_kv_heads
    k = k[:, :, None].expand(b, n_kv_heads, rep, n, d).reshape(b, n_heads, n, d)
    v = v[:, :, None].expand(b, n_kv_heads, rep, n, d).reshape(b, n_heads, n, d)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask[None, None], scale=scaling)
    return out.transpose(1, 2).reshape(b, q.shape[2], n_heads * d)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="1024,4096,8192")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--eager-only", action="store_true")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default=None, metavar="FILE.json")
    a = ap.parse_args(argv)
    try:
        contexts = [int(c) for c in a.contexts.split(",")]
        if not contexts or min(contexts) < 2 or a.batch < 1 or a.repeats < 1:
            raise ValueError
        device = torch.device(a.device)
        dtype = getattr(torch, a.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
        if not isinstance(dtype, torch.dtype) or dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError
    except (ValueError, RuntimeError, AttributeError):
        print(f"error: bad arguments (contexts '{a.contexts}' >= 2, batch/repeats >= 1, device '{a.device}' present, "
              f"dtype '{a.dtype}' one of float32/bfloat16/float16)", file=sys.stderr)
        return 2
    import l4compile.ops.attention as attn

    time_ms = timer(device, a.repeats)
    g = torch.Generator(device=device).manual_seed(0)
    attrs = (HEADS, KV_HEADS, HEAD_DIM, False, False, 0, True, 8192.0, 0.1, 1 / math.sqrt(HEAD_DIM), 1e-5)
    cos = sin = torch.zeros(1, HEAD_DIM // 2, device=device)                    # NoPE: the tables are unused
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{name}; torch {torch.__version__}; {dtype}; batch {a.batch}; Scout attention {HEADS}/{KV_HEADS} heads "
          f"x {HEAD_DIM}; one decode step")
    print("| context | variant | mode | ms | cache MB | GB/s | vs expanded |")
    print("|---|---|---|---|---|---|---|", flush=True)
    rows = []
    for ctx in contexts:
        q = torch.randn(a.batch, 1, HEADS * HEAD_DIM, generator=g, device=device).to(dtype)
        k, v = (torch.randn(a.batch, 1, KV_HEADS * HEAD_DIM, generator=g, device=device).to(dtype) for _ in "kv")
        kc, vc = (torch.randn(a.batch, KV_HEADS, ctx, HEAD_DIM, generator=g, device=device).to(dtype) for _ in "kv")
        start = torch.tensor([ctx - 1], device=device)
        args = (q, k, v, kc, vc, start, cos, sin, *attrs)
        cache_bytes = 2 * kc.numel() * kc.element_size()
        outs, ms = {}, {}
        for variant in ("expanded", "grouped"):
            patch = mock.patch.object(attn, "_attend", attend_expanded) if variant == "expanded" else mock.patch.dict({})
            with patch:
                modes = {"eager": attn.attention_cached_impl}
                if not a.eager_only:
                    torch._dynamo.reset()
                    # the output alone, as an engine uses it: Inductor then drops the out-of-place copies of the
                    # caches that attention_cached_impl also returns (an engine writes its one new row in place)
                    modes["inductor"] = torch.compile(lambda *x: attn.attention_cached_impl(*x)[0], dynamic=False,
                                                      fullgraph=True)
                for mode, fn in modes.items():
                    with torch.no_grad():
                        res = fn(*args)
                        outs[variant, mode] = (res[0] if isinstance(res, tuple) else res).float()
                        ms[variant, mode] = time_ms(lambda: fn(*args))
        for (variant, mode), t in ms.items():
            base = ms["expanded", mode]
            err = float((outs[variant, mode] - outs["expanded", "eager"]).abs().max())
            rows.append({"context": ctx, "variant": variant, "mode": mode, "ms": t, "cache_bytes": cache_bytes,
                         "speedup_vs_expanded": base / t, "max_abs_diff_vs_expanded_eager": err})
            print(f"| {ctx} | {variant} | {mode} | {t:.3f} | {cache_bytes / 1e6:.1f} | {cache_bytes / t / 1e6:.1f} | "
                  f"{base / t:.2f}x |", flush=True)
    worst = max(r["max_abs_diff_vs_expanded_eager"] for r in rows)
    print(f"max |grouped - expanded| over all rows: {worst:.2e}")
    if a.out:
        Path(a.out).write_text(json.dumps({"device": name, "torch": torch.__version__, "dtype": str(dtype),
                                           "batch": a.batch, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
