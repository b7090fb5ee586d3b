"""One decode step of l4::attention_cached at Scout's attention shape, against K/V expanded per query head.

    python benchmarks/bench_attention.py [--contexts 1024,4096,8192] [--positions full,511] [--batch 1]
                                         [--device cpu|cuda] [--dtype float32|bfloat16] [--eager-only]
                                         [--repeats 20] [--out FILE.json]

Scout: 40 query heads, 8 kv heads, head_dim 128. A global (NoPE) layer's cache holds CONTEXT slots; the step
decodes at each of ``--positions`` ("full": CONTEXT-1, a full cache; a number: a sequence that far into a cache
sized for CONTEXT, as an engine compiled for a longer --max-seq-len holds it). A chunked layer's ring buffer is
the same shape at CONTEXT = 8192.

Variants, measured in the same run on the same inputs:
    expanded  K/V copied to every query head before attention (transformers' ``repeat_kv``; l4compile before
              the grouped form): the cache is written once more and read 5 more times
    grouped   l4compile's op: the 5 query heads of a kv head folded into the query length, K/V read as they are
    fused     (CUDA with Triton) ``l4::attention_fused``, which reads only the visible keys (by position, in
              place; no cat of cache and new key, no mask): the functional form of the kernels CUDA engines run
              (their step's ``l4::attention_fused_chained`` also writes the caches and merges its key splits in
              the same launch: ``bench_kernels.py`` times that one)
Both run eagerly and, unless --eager-only, compiled by Inductor (``torch.compile``, static shapes) as the engine
compiles them; the compiled step returns the output alone, so like an engine's it copies no cache (eager's
out-of-place cache updates, the same for every variant, stay in its times). "read MB" is what the step cannot
avoid reading (the k and v of the visible positions); "GB/s" is that over the time, so it is comparable across
variants, not a measured bandwidth. Also reports the largest |variant - expanded eager|.
"""
# B batch, L cache slots
from __future__ import annotations

import argparse
import functools
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
    ap.add_argument("--positions", default="full,511")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--eager-only", action="store_true")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default=None, metavar="FILE.json")
    a = ap.parse_args(argv)
    try:
        contexts = [int(c) for c in a.contexts.split(",")]
        positions = [p if p == "full" else int(p) for p in a.positions.split(",")]
        if not contexts or min(contexts) < 2 or a.batch < 1 or a.repeats < 1 or \
                any(p != "full" and p < 1 for p in positions):
            raise ValueError
        device = torch.device(a.device)
        dtype = getattr(torch, a.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
        if not isinstance(dtype, torch.dtype) or dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError
    except (ValueError, RuntimeError, AttributeError):
        print(f"error: bad arguments (contexts '{a.contexts}' >= 2, positions '{a.positions}' 'full' or >= 1, "
              f"batch/repeats >= 1, device '{a.device}' present, "
              f"dtype '{a.dtype}' one of float32/bfloat16/float16)", file=sys.stderr)
        return 2
    import l4compile.ops.attention as attn

    variants = ["expanded", "grouped"]
    if device.type == "cuda":
        from l4compile.kernels.dispatch import load_triton_ops
        if load_triton_ops():
            variants.append("fused")
        else:
            print("(no Triton: the fused variant is left out)")

    time_ms = timer(device, a.repeats)
    g = torch.Generator(device=device).manual_seed(0)
    attrs = (HEADS, KV_HEADS, HEAD_DIM, False, False, 0, True, 8192.0, 0.1, 1 / math.sqrt(HEAD_DIM), 1e-5)
    cos = sin = torch.zeros(1, HEAD_DIM // 2, device=device)                    # NoPE: the tables are unused
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{name}; torch {torch.__version__}; {dtype}; batch {a.batch}; Scout attention {HEADS}/{KV_HEADS} heads "
          f"x {HEAD_DIM}; one decode step")
    print("| context | position | variant | mode | ms | read MB | GB/s | vs expanded |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    rows = []
    cases = [(ctx, ctx - 1 if p == "full" else p) for ctx in contexts for p in positions]
    for ctx, pos in [(c, p) for c, p in cases if p < c]:
        q = torch.randn(a.batch, 1, HEADS * HEAD_DIM, generator=g, device=device).to(dtype)
        k, v = (torch.randn(a.batch, 1, KV_HEADS * HEAD_DIM, generator=g, device=device).to(dtype) for _ in "kv")
        kc, vc = (torch.randn(a.batch, KV_HEADS, ctx, HEAD_DIM, generator=g, device=device).to(dtype) for _ in "kv")
        start = torch.tensor([pos], device=device)
        args = (q, k, v, kc, vc, start, cos, sin, *attrs)
        read_bytes = 2 * a.batch * KV_HEADS * (pos + 1) * HEAD_DIM * kc.element_size()   # positions 0..pos
        outs, ms = {}, {}
        for variant in variants:
            patch = mock.patch.object(attn, "_attend", attend_expanded) if variant == "expanded" else \
                mock.patch.dict({})
            step = attn.attention_cached_impl if variant != "fused" else functools.partial(
                attn.attention_cached_impl, fused_attend=torch.ops.l4.attention_fused)
            with patch:
                modes = {"eager": step}
                if not a.eager_only:
                    torch._dynamo.reset()
                    # the output alone, as an engine uses it: Inductor then drops the out-of-place copies of the
                    # caches that attention_cached_impl also returns (an engine writes its one new row in place)
                    modes["inductor"] = torch.compile(lambda *x, step=step: step(*x)[0], dynamic=False,
                                                      fullgraph=True)
                for mode, fn in modes.items():
                    with torch.no_grad():
                        res = fn(*args)
                        outs[variant, mode] = (res[0] if isinstance(res, tuple) else res).float()
                        ms[variant, mode] = time_ms(lambda: fn(*args))
        for (variant, mode), t in ms.items():
            base = ms["expanded", mode]
            err = float((outs[variant, mode] - outs["expanded", "eager"]).abs().max())
            rows.append({"context": ctx, "position": pos, "variant": variant, "mode": mode, "ms": t,
                         "read_bytes": read_bytes, "speedup_vs_expanded": base / t,
                         "max_abs_diff_vs_expanded_eager": err})
            print(f"| {ctx} | {pos} | {variant} | {mode} | {t:.3f} | {read_bytes / 1e6:.1f} | "
                  f"{read_bytes / t / 1e6:.1f} | {base / t:.2f}x |", flush=True)
    if not rows:
        print("error: no --positions inside the --contexts", file=sys.stderr)
        return 2
    worst = max(r["max_abs_diff_vs_expanded_eager"] for r in rows)
    print(f"max |variant - expanded eager| over all rows: {worst:.2e}")
    if a.out:
        Path(a.out).write_text(json.dumps({"device": name, "torch": torch.__version__, "dtype": str(dtype),
                                           "batch": a.batch, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
