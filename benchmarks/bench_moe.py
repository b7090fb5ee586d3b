"""Benchmark fuse_moe on this machine: (a) the MoE block alone, (b) whole-model prefill.

    python benchmarks/bench_moe.py [--tokens 1,16,512] [--configs scout,maverick] [--no-aoti] [--no-compile]
                                   [--threads 1]

Baselines: transformers eager and ``torch.compile`` of the transformers module, on the same inputs, in the
same run (ratios, not absolute times, are what to compare across machines). Prints markdown tables of
median milliseconds and speed-ups.
"""
# T tokens, E experts, H hidden, I expert width, K top-k
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import Llama4ForCausalLM, Llama4TextConfig

import l4compile.ops  # noqa: F401  (torch.ops.l4.moe)
from l4compile.passes import PassContext
from l4compile.passes.fuse_moe import FuseMoeOptions, fuse_moe
from l4compile.program import trace

CONFIGS = {
    # Scout-proportioned: every layer MoE, 16 experts, top-1, expert width 2x hidden, qk-norm
    "scout": dict(hidden_size=512, intermediate_size=1024, intermediate_size_mlp=2048, num_local_experts=16,
                  interleave_moe_layer_step=1, use_qk_norm=True),
    # Maverick-proportioned: 128 experts, MoE on odd layers, dense MLP (2x expert width) on even ones
    "maverick": dict(hidden_size=256, intermediate_size=512, intermediate_size_mlp=1024, num_local_experts=128,
                     interleave_moe_layer_step=2, use_qk_norm=False),
}
COMMON = dict(vocab_size=2048, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, head_dim=32,
              num_experts_per_tok=1, attention_chunk_size=8192, max_position_embeddings=4096)


def build(name: str) -> Llama4ForCausalLM:
    torch.manual_seed(0)
    lm = Llama4ForCausalLM(Llama4TextConfig(**COMMON, **CONFIGS[name])).eval()
    for n, p in lm.named_parameters():
        if ".experts." in n or ".router." in n:
            torch.nn.init.normal_(p, std=0.1)
    return lm


def medians_ms(fns: dict, *, min_reps: int = 5, budget_s: float = 4.0) -> dict:
    """Median ms of each callable, measured round-robin (one call of each per round) so that load from
    other processes on this shared machine hits every variant alike. A callable that fails -> None."""
    live = {}
    for k, fn in fns.items():
        if fn is None:
            continue
        try:
            fn()                                             # warm-up (and compile)
            live[k] = fn
        except Exception as e:  # a baseline that fails to compile is reported, not fatal
            print(f"  [{k} failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}]", file=sys.stderr)
    times = {k: [] for k in live}
    t_end = time.perf_counter() + budget_s
    rounds = 0
    while rounds < min_reps or (time.perf_counter() < t_end and rounds < 50):
        for k, fn in live.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
        rounds += 1
    return {k: (1e3 * statistics.median(times[k]) if k in times else None) for k in fns}


def fmt(ms):
    return "n/a" if ms is None else (f"{ms:.2f}" if ms < 100 else f"{ms:.0f}")


def ratio(a, b):
    return "n/a" if a is None or b is None else f"{a / b:.1f}x"


def bench_block(lm, name, tokens, do_compile):
    moe = next(m for m in lm.modules() if type(m).__name__ == "Llama4TextMoe")
    se = moe.shared_expert
    args = (moe.router.weight, moe.experts.gate_up_proj, moe.experts.down_proj, se.gate_proj.weight,
            se.up_proj.weight, se.down_proj.weight, moe.top_k)
    compiled = torch.compile(moe, dynamic=False) if do_compile else None
    rows = []
    for t in tokens:
        x = torch.randn(t, lm.config.hidden_size)
        m = medians_ms({"eager": lambda: moe(x), "compile": (lambda: compiled(x)) if do_compile else None,
                        "fused": lambda: torch.ops.l4.moe(x, *args)})
        eager, comp, fused = m["eager"], m["compile"], m["fused"]
        rows.append(f"| {name} | E={moe.num_experts} | {t} | {fmt(eager)} | {fmt(comp)} | {fmt(fused)} | "
                    f"{ratio(eager, fused)} | {ratio(comp, fused)} |")
        print(rows[-1], file=sys.stderr)
    return rows


def bench_model(lm, name, tokens, do_compile, do_aoti, workdir):
    cfg = lm.config
    prog = trace(lm, max_batch=4, max_seq=max(tokens))
    res = fuse_moe(prog.gm, PassContext(model_config=cfg, compile_config=None, options=FuseMoeOptions()))
    prog.gm = res.gm
    ep = prog.export()
    # Program.gm (ExportedProgram.module()) guards batch >= 2 and seq >= 2; run the re-exported fused
    # graph eagerly instead (same graph, same l4.moe nodes) so batch-1 prefill can be measured.
    gm = ep.module(check_guards=False)
    aoti = None
    if do_aoti:
        t0 = time.perf_counter()
        pt2 = torch._inductor.aoti_compile_and_package(ep, package_path=str(workdir / f"{name}.pt2"))
        aoti = torch._inductor.aoti_load_package(pt2)
        print(f"  [{name}: AOTI compile {time.perf_counter() - t0:.0f} s]", file=sys.stderr)
    compiled = torch.compile(lm) if do_compile else None
    rows = []
    for t in tokens:
        ids = torch.randint(0, cfg.vocab_size, (1, t), generator=torch.Generator().manual_seed(t))
        m = medians_ms({"eager": lambda: lm(input_ids=ids, use_cache=False),
                        "compile": (lambda: compiled(input_ids=ids, use_cache=False)) if do_compile else None,
                        "fused gm": lambda: gm(ids), "AOTI": (lambda: aoti(ids)) if aoti is not None else None})
        eager, comp, fused, fa = m["eager"], m["compile"], m["fused gm"], m["AOTI"]
        ref = lm(input_ids=ids, use_cache=False).logits
        out = gm(ids) if fused is not None else aoti(ids) if fa is not None else None
        err = float("nan") if out is None else ((out - ref).abs().max() / ref.abs().max()).item()
        rows.append(f"| {name} | {t} | {fmt(eager)} | {fmt(comp)} | {fmt(fused)} | {fmt(fa)} | "
                    f"{ratio(eager, fused)} | {ratio(comp, fused)} | {ratio(eager, fa)} | {ratio(comp, fa)} | "
                    f"{err:.1e} |")
        print(rows[-1], file=sys.stderr)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="1,16,512")
    ap.add_argument("--configs", default="scout,maverick")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    ap.add_argument("--no-aoti", action="store_true", help="skip the AOTInductor column")
    ap.add_argument("--threads", type=int, default=1,
                    help="intra-op threads (default 1: on a shared 2-core box, 2 OpenMP threads competing with "
                         "another process make timings erratic by 5-10x)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    tokens = [int(t) for t in a.tokens.split(",")]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", file=sys.stderr)
    block_rows, model_rows = [], []
    with torch.inference_mode(False), torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
        for name in a.configs.split(","):
            lm = build(name)
            block_rows += bench_block(lm, name, tokens, not a.no_compile)
            model_rows += bench_model(lm, name, tokens, not a.no_compile, not a.no_aoti, Path(tmp))
            torch._dynamo.reset()
    print("\n### MoE block (median ms)\n")
    print("| config | experts | tokens | HF eager | torch.compile | l4.moe | vs eager | vs compile |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(block_rows))
    print("\n### Whole-model prefill, batch 1 (median ms)\n")
    print("| config | tokens | HF eager | torch.compile | fused gm | fused AOTI | gm vs eager | gm vs compile "
          "| AOTI vs eager | AOTI vs compile | rel err |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(model_rows))


if __name__ == "__main__":
    main()
