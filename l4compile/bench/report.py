"""Benchmark reports: assemble report.json (validated against ``report.schema.json``), render report.html
(jinja2 + inline matplotlib SVG, self-contained) and report.md, and compare two reports."""
from __future__ import annotations

import importlib.resources
import io
import json
import math
import re
import time
from pathlib import Path
from typing import Any

from l4compile.errors import L4Error

SCHEMA_VERSION = 1
SCHEMA_FILE = "report.schema.json"
BASELINES = ("eager", "torch-compile")
MODEL_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "head_dim", "intermediate_size", "intermediate_size_mlp", "num_local_experts", "num_experts_per_tok",
              "interleave_moe_layer_step", "moe_layers", "no_rope_layers", "attention_chunk_size",
              "max_position_embeddings", "use_qk_norm", "attention_bias", "tie_word_embeddings")
PALETTE = {"eager": "#7f7f7f", "torch-compile": "#1f77b4", "inductor": "#d62728", "onnxruntime": "#2ca02c",
           "tensorrt": "#9467bd"}


# ---------------------------------------------------------------------------------------------------------------
# Statistics

def percentile(values: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), q in [0, 100]."""
    xs = sorted(values)
    if not xs:
        raise ValueError("no values")
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def stats(values: list[float]) -> dict[str, float]:
    return {"median": round(percentile(values, 50), 4), "p10": round(percentile(values, 10), 4),
            "p90": round(percentile(values, 90), 4)}


def _ratio(base: float | None, x: float | None) -> float | None:
    if base is None or x is None or x <= 0 or base <= 0:
        return None
    return round(base / x, 4)


def summarize(samples: list[dict[str, Any]], decode_steps: int,
              matches: dict[tuple[str, int, int], bool | None] | None = None) -> list[dict[str, Any]]:
    """One row per (backend, batch, prompt): medians and p10/p90, tokens/s, peak memory, speed-ups."""
    groups: dict[tuple[str, int, int], list[dict[str, Any]]] = {}
    for s in samples:
        groups.setdefault((s["backend"], s["batch"], s["prompt_len"]), []).append(s)
    rows = []
    for (name, b, p), ss in groups.items():
        pre = stats([x["prefill_ms"] for x in ss])
        dec = stats([x["decode_ms_per_token"] for x in ss])
        mems = [x["peak_memory_bytes"] for x in ss if x.get("peak_memory_bytes") is not None]
        rows.append({"backend": name, "batch": b, "prompt_len": p, "n": len(ss), "prefill_ms": pre,
                     "decode_ms_per_token": dec,
                     "prefill_tokens_per_s": round(b * p / (pre["median"] / 1e3), 2) if pre["median"] > 0 else None,
                     "decode_tokens_per_s": round(b / (dec["median"] / 1e3), 2) if dec["median"] > 0 else None,
                     "peak_memory_bytes": max(mems) if mems else None,
                     "matches_eager": (matches or {}).get((name, b, p))})
    index = {(r["backend"], r["batch"], r["prompt_len"]): r for r in rows}
    for r in rows:
        for base, key in (("eager", "eager"), ("torch-compile", "torch_compile")):
            ref = index.get((base, r["batch"], r["prompt_len"]))
            r[f"speedup_prefill_vs_{key}"] = _ratio(ref and ref["prefill_ms"]["median"], r["prefill_ms"]["median"])
            r[f"speedup_decode_vs_{key}"] = _ratio(ref and ref["decode_ms_per_token"]["median"],
                                                   r["decode_ms_per_token"]["median"])
    return rows


# ---------------------------------------------------------------------------------------------------------------
# report.json

def decode_position(prompt_len: int, decode_steps: int) -> int:
    """Mean absolute position of the decode steps a bench times: prefill yields the first token, then steps feed
    positions prompt_len .. prompt_len + decode_steps - 2."""
    return prompt_len + (decode_steps - 2) // 2


def build_report(result: dict[str, Any]) -> dict[str, Any]:
    """Turn ``runner.run_bench``'s result into the documented report dict."""
    from l4compile.bench import roofline

    cfg = result["config"]
    mc = result["model_config"]
    model_cfg = {k: mc.get(k) for k in MODEL_KEYS if k in mc}
    rows = summarize(result["samples"], cfg.decode_steps, result.get("matches_eager"))
    backends = [b.to_dict() if hasattr(b, "to_dict") else dict(b) for b in result["backends"]]
    env = result["environment"]
    gpu_name = (env.get("gpu") or {}).get("name")
    roof = None
    if cfg.device == "cuda":
        roof = [dict(roofline.roofline_figures(mc, dtype=cfg.dtype, quant="none" if r["backend"] in BASELINES
                                               else cfg.quant, gpu_name=gpu_name, batch=r["batch"],
                                               prompt_len=r["prompt_len"], prefill_ms=r["prefill_ms"]["median"],
                                               decode_ms_per_step=r["decode_ms_per_token"]["median"],
                                               lm_head_quantized=r["backend"] not in BASELINES
                                               and result.get("lm_head_quantized", False),
                                               decode_position=decode_position(r["prompt_len"], cfg.decode_steps)),
                     backend=r["backend"], batch=r["batch"], prompt_len=r["prompt_len"]) for r in rows]
    decode_methods = {b["name"]: b["decode_method"] for b in backends if b.get("decode_method")}
    return {
        "schema_version": SCHEMA_VERSION, "kind": "l4compile-bench",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": cfg.to_dict(), "config_hash": cfg.stable_hash(),
        "model": {"source": result["model_source"], "config": model_cfg,
                  "active_params": roofline.active_params(mc),
                  "engine_max_seq_len": result.get("engine_max_seq_len"),
                  "lm_head_quantized": bool(result.get("lm_head_quantized", False))},
        "environment": env,
        "methods": {
            "timing": "wall clock (time.perf_counter) around each call"
                      + ("; torch.cuda.synchronize() before and after" if cfg.device == "cuda" else ""),
            "prefill": "one forward pass over the prompt, no cache; engines: Engine.prefill; baselines: the "
                       "transformers model with use_cache=False",
            "decode": "decode ms/token = (time of greedy generate with decode_steps new tokens - prefill time of "
                      "the same repeat) / (decode_steps - 1): the prefill yields the first new token and each of "
                      "the decode_steps - 1 decode steps one more per sequence, so "
                      "decode tokens/s = batch * 1000 / (ms/token)",
            "decode_by_backend": decode_methods,
            "memory": result.get("memory_method", ""),
            "order": "after one warm-up per backend and shape, each repeat runs every shape on every backend; "
                     "the backend order rotates each repeat",
            "speedup": "baseline median / backend median (> 1: faster than the baseline)",
        },
        "backends": backends, "samples": result["samples"], "summary": rows, "roofline": roof,
        **({"profile": result.get("profiles", [])} if cfg.profile else {}),
    }


def schema() -> dict[str, Any]:
    return json.loads(importlib.resources.files("l4compile.bench").joinpath(SCHEMA_FILE).read_text())


_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def _check(value: Any, sch: dict[str, Any], root: dict[str, Any], path: str) -> list[str]:
    """A small JSON Schema (2020-12) subset: $ref, type, enum, const, properties, required,
    additionalProperties, items, minItems, minimum, exclusiveMinimum, pattern, anyOf."""
    if "$ref" in sch:
        ref = sch["$ref"]
        if not ref.startswith("#/$defs/"):
            raise ValueError(f"unsupported $ref {ref}")
        sch = root["$defs"][ref.split("/")[-1]]
    errs: list[str] = []
    if "anyOf" in sch:
        if all(_check(value, s, root, path) for s in sch["anyOf"]):
            errs.append(f"{path}: matches none of anyOf")
    t = sch.get("type")
    if t is not None:
        types = t if isinstance(t, list) else [t]
        ok = False
        for ty in types:
            if ty == "integer":
                ok |= isinstance(value, int) and not isinstance(value, bool)
            elif ty == "number":
                ok |= isinstance(value, (int, float)) and not isinstance(value, bool)
            else:
                ok |= isinstance(value, _TYPES[ty])
        if not ok:
            return errs + [f"{path}: expected {t}, got {type(value).__name__}"]
    if "enum" in sch and value not in sch["enum"]:
        errs.append(f"{path}: {value!r} not in {sch['enum']}")
    if "const" in sch and value != sch["const"]:
        errs.append(f"{path}: expected {sch['const']!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in sch and value < sch["minimum"]:
            errs.append(f"{path}: {value} < minimum {sch['minimum']}")
        if "exclusiveMinimum" in sch and value <= sch["exclusiveMinimum"]:
            errs.append(f"{path}: {value} <= exclusiveMinimum {sch['exclusiveMinimum']}")
    if isinstance(value, str) and "pattern" in sch and not re.search(sch["pattern"], value):
        errs.append(f"{path}: {value!r} does not match {sch['pattern']}")
    if isinstance(value, dict):
        for k in sch.get("required", []):
            if k not in value:
                errs.append(f"{path}: missing '{k}'")
        props = sch.get("properties", {})
        extra = sch.get("additionalProperties", True)
        for k, v in value.items():
            if k in props:
                errs += _check(v, props[k], root, f"{path}.{k}")
            elif extra is False:
                errs.append(f"{path}: unexpected key '{k}'")
            elif isinstance(extra, dict):
                errs += _check(v, extra, root, f"{path}.{k}")
    if isinstance(value, list):
        if len(value) < sch.get("minItems", 0):
            errs.append(f"{path}: fewer than {sch['minItems']} items")
        if "items" in sch:
            for i, v in enumerate(value):
                errs += _check(v, sch["items"], root, f"{path}[{i}]")
    return errs


def validate(report: dict[str, Any]) -> list[str]:
    """Problems with ``report`` against the schema (empty when valid)."""
    sch = schema()
    return _check(report, sch, sch, "$")


# ---------------------------------------------------------------------------------------------------------------
# Formatting shared by the templates, compare and the tests

def fmt_ms(v: float | None) -> str:
    if v is None:
        return "–"
    a = abs(v)
    text = f"{a:#.3g}" if a < 10 else f"{a:.1f}" if a < 1000 else f"{a:,.0f}"
    return ("\u2212" if v < 0 else "") + text


def fmt_range(st: dict[str, float]) -> str:
    return f"{fmt_ms(st['p10'])} to {fmt_ms(st['p90'])}"


def fmt_ratio(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}×"


def fmt_rate(v: float | None) -> str:
    if v is None:
        return "–"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def fmt_bytes(v: float | None) -> str:
    if v is None:
        return "–"
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(v) >= div:
            return f"{v / div:.1f} {unit}"
    return f"{v:.0f} B"


def fmt_s(v: float | None) -> str:
    return "–" if not v else f"{v:.1f} s" if v >= 1 else f"{v * 1e3:.0f} ms"


def fmt_count(v: float | None) -> str:
    if v is None:
        return "–"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= div:
            return f"{v / div:.2f}{unit}"
    return f"{v:.0f}"


def fmt_pct(v: float | None) -> str:
    if v is None:
        return "–"
    if 0 < v < 1e-5:
        return "<0.001%"
    return f"{v * 100:.1f}%" if v >= 0.01 else f"{v * 100:.2g}%"


def fmt_tflops(v: float | None) -> str:
    if v is None:
        return "–"
    return f"{v:.1f}" if v >= 10 else f"{v:.3g}"


FILTERS = {"ms": fmt_ms, "range": fmt_range, "ratio": fmt_ratio, "rate": fmt_rate, "bytes": fmt_bytes, "secs": fmt_s,
           "count": fmt_count, "pct": fmt_pct, "tflops": fmt_tflops}


# ---------------------------------------------------------------------------------------------------------------
# Charts (matplotlib -> inline SVG)

def _svg(fig, salt: str) -> str:
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": salt, "svg.fonttype": "none"}):
        fig.savefig(buf, format="svg", bbox_inches="tight")
    import matplotlib.pyplot as plt
    plt.close(fig)
    text = buf.getvalue()
    text = text[text.index("<svg"):]                    # drop the XML prolog and DOCTYPE: inline in HTML
    text = re.sub(r"\s*<metadata>.*?</metadata>", "", text, flags=re.S)   # creator/date: noise in a report
    # unique ids per chart so several SVGs can live in one page
    return re.sub(r'(id="|url\(#|xlink:href="#|href="#)', lambda m: m.group(1) + salt + "-", text)


def _color(name: str, i: int) -> str:
    import matplotlib
    return PALETTE.get(name) or matplotlib.colormaps["tab10"](i % 10)


def _shape_label(b: int, p: int) -> str:
    return f"b={b}, s={p}"


def charts(report: dict[str, Any]) -> dict[str, str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["summary"]
    if not rows:
        return {}
    names = [b["name"] for b in report["backends"] if b["status"] == "ok"]
    cfg = report["config"]
    shapes = [(b, p) for b in cfg["batch_sizes"] for p in cfg["prompt_lens"]]
    index = {(r["backend"], r["batch"], r["prompt_len"]): r for r in rows}
    plt.rcParams.update({"font.size": 9, "axes.spines.top": False, "axes.spines.right": False,
                         "font.family": "sans-serif"})
    out: dict[str, str] = {}

    # 1. latency by backend: grouped bars per shape, p10-p90 whiskers
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    width = 0.8 / max(1, len(names))
    for ax, key, title in ((axes[0], "prefill_ms", "Prefill latency (ms, median, p10–p90)"),
                           (axes[1], "decode_ms_per_token", "Decode (ms per token, median, p10–p90)")):
        for i, n in enumerate(names):
            xs, ys, lo, hi = [], [], [], []
            for j, (b, p) in enumerate(shapes):
                r = index.get((n, b, p))
                if r is None:
                    continue
                st = r[key]
                xs.append(j + (i - (len(names) - 1) / 2) * width)
                ys.append(st["median"])
                lo.append(max(0.0, st["median"] - st["p10"]))
                hi.append(max(0.0, st["p90"] - st["median"]))
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=n, color=_color(n, i), error_kw={"lw": 0.8})
        ax.set_xticks(range(len(shapes)), [_shape_label(*s) for s in shapes])
        ax.set_title(title, loc="left")
        ax.axhline(0, color="black", lw=0.6)
        ax.grid(axis="y", alpha=0.3)
    axes[1].legend(frameon=False, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    out["latency"] = _svg(fig, "lat")

    # 2. tokens/s by prompt length, one line per backend (and batch size)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    styles = ["-", "--", ":", "-."]
    for ax, key, title in ((axes[0], "prefill_tokens_per_s", "Prefill tokens/s"),
                           (axes[1], "decode_tokens_per_s", "Decode tokens/s")):
        for i, n in enumerate(names):
            for k, b in enumerate(cfg["batch_sizes"]):
                pts = [(p, index[(n, b, p)][key]) for p in cfg["prompt_lens"]
                       if (n, b, p) in index and index[(n, b, p)][key] is not None]
                if pts:
                    label = n if len(cfg["batch_sizes"]) == 1 else f"{n}, b={b}"
                    ax.plot([x for x, _ in pts], [y for _, y in pts], styles[k % 4], marker="o", ms=4,
                            color=_color(n, i), label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(cfg["prompt_lens"], [str(p) for p in cfg["prompt_lens"]])
        ax.minorticks_off()
        ax.set_xlabel("prompt length (tokens)")
        ax.set_title(title, loc="left")
        ax.grid(alpha=0.3)
    axes[1].legend(frameon=False, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    out["throughput"] = _svg(fig, "tps")

    # 3. speed-up over eager
    others = [n for n in names if n != "eager"]
    if "eager" in names and others:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.4), sharey=True)
        width = 0.8 / len(others)
        for ax, key, title in ((axes[0], "speedup_prefill_vs_eager", "Prefill speed-up over eager (×)"),
                               (axes[1], "speedup_decode_vs_eager", "Decode speed-up over eager (×)")):
            for i, n in enumerate(others):
                xs, ys = [], []
                for j, (b, p) in enumerate(shapes):
                    r = index.get((n, b, p))
                    if r is not None and r[key] is not None:
                        xs.append(j + (i - (len(others) - 1) / 2) * width)
                        ys.append(r[key])
                bars = ax.bar(xs, ys, width, label=n, color=_color(n, names.index(n)))
                ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
            ax.axhline(1.0, color="black", lw=0.8, ls="--")
            ax.set_xticks(range(len(shapes)), [_shape_label(*s) for s in shapes])
            ax.set_title(title, loc="left")
            ax.grid(axis="y", alpha=0.3)
        axes[1].legend(frameon=False, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        fig.tight_layout()
        out["speedup"] = _svg(fig, "spd")

    # 4. roofline (GPU runs only)
    roof = report.get("roofline")
    if cfg["device"] == "cuda" and roof and roof[0].get("hbm_bytes_per_s_peak"):
        bw, peak = roof[0]["hbm_bytes_per_s_peak"], roof[0]["bf16_flops_peak"]
        fig, ax = plt.subplots(figsize=(7, 4.2))
        xs_all = [f["prefill_intensity"] for f in roof] + [f["decode_intensity"] for f in roof]
        ridge = peak / bw
        lo_x, hi_x = min(xs_all + [ridge]) / 4, max(xs_all + [ridge]) * 8
        ai = [lo_x * (hi_x / lo_x) ** (i / 100) for i in range(101)]
        ax.plot(ai, [min(peak, x * bw) / 1e12 for x in ai], color="black", lw=1.2,
                label=f"{roof[0]['gpu_peak']} roof ({bw / 1e12:.2f} TB/s, {peak / 1e12:.0f} TFLOP/s bf16)")
        for i, n in enumerate(names):
            pts_p = [(f["prefill_intensity"], f["prefill_tflops"]) for f in roof
                     if f["backend"] == n and f["prefill_tflops"]]
            pts_d = [(f["decode_intensity"], f["decode_flops_per_step"] / f["decode_bytes_per_step"]
                      * f["decode_bytes_per_s"] / 1e12) for f in roof if f["backend"] == n and f["decode_bytes_per_s"]]
            if pts_p:
                ax.scatter(*zip(*pts_p), marker="o", color=_color(n, i), label=f"{n} prefill")
            if pts_d:
                ax.scatter(*zip(*pts_d), marker="^", color=_color(n, i), label=f"{n} decode")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("arithmetic intensity (FLOP per byte read: weights, and KV at decode)")
        ax.set_ylabel("TFLOP/s")
        ax.set_title("Roofline", loc="left")
        ax.grid(alpha=0.3, which="major")
        ax.legend(frameon=False, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        fig.tight_layout()
        out["roofline"] = _svg(fig, "roof")
    return out


# ---------------------------------------------------------------------------------------------------------------
# Rendering

def _env():
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(importlib.resources.files("l4compile.templates"))),
                             autoescape=jinja2.select_autoescape(["html", "html.j2"]), trim_blocks=True,
                             lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    env.filters.update(FILTERS)
    return env


def _context(report: dict[str, Any]) -> dict[str, Any]:
    names = [b["name"] for b in report["backends"] if b["status"] == "ok"]
    order = {n: i for i, n in enumerate(names)}
    rows = sorted(report["summary"], key=lambda r: (r["batch"], r["prompt_len"], order.get(r["backend"], 99)))
    src = report["model"]["source"]
    model_name = src.get("name") or Path(src.get("path", "?")).name
    cfg = report["config"]      # build options, as KEY=VALUE words (absent from reports made without them)
    inductor = [f"{k}={json.dumps(v)}" for k, v in cfg.get("inductor_configs", ())]
    passes = [f"{p}.{k}={json.dumps(v)}" for p, opts in cfg.get("pass_options", ()) for k, v in opts]
    return {"r": report, "rows": rows, "ok": names, "model_name": model_name, "headline": headline(report),
            "skipped": [b for b in report["backends"] if b["status"] != "ok"],
            "has_tc": "torch-compile" in names, "has_eager": "eager" in names,
            "inductor_settings": inductor, "pass_settings": passes}


def headline(report: dict[str, Any]) -> list[str]:
    """A few sentences a reader wants first: the fastest backend per shape, and caveats."""
    out = []
    rows = report["summary"]
    cfg = report["config"]
    shapes = [(b, p) for b in cfg["batch_sizes"] for p in cfg["prompt_lens"]]
    if len(shapes) > 4:                     # keep the headline short: smallest and largest shapes
        shapes = [shapes[0], shapes[-1]]
    for b, p in shapes:
        rs = [r for r in rows if r["batch"] == b and r["prompt_len"] == p]
        if len(rs) < 2:
            continue
        parts = []
        for key, what, ratio in (("prefill_ms", "prefill", "speedup_prefill_vs_eager"),
                                 ("decode_ms_per_token", "decode", "speedup_decode_vs_eager")):
            best = min(rs, key=lambda r: r[key]["median"] if r[key]["median"] > 0 else float("inf"))
            vs = f" ({fmt_ratio(best[ratio])} eager)" if best["backend"] != "eager" and best[ratio] else ""
            parts.append(f"fastest {what}: {best['backend']} {fmt_ms(best[key]['median'])} ms{vs}")
        out.append(f"batch {b}, prompt {p}: " + "; ".join(parts))
    slow = [b["name"] for b in report["backends"]
            if b["status"] == "ok" and "recomputing" in (b.get("decode_method") or "")]
    if slow:
        out.append(f"{', '.join(slow)}: no KV cache in the engine, so every decode step recomputes the whole prefix "
                   "(the baselines use transformers' cache); decode figures there are not like for like")
    spread = [r["prefill_ms"]["p90"] / r["prefill_ms"]["p10"] for r in rows if r["n"] >= 3 and r["prefill_ms"]["p10"] > 0]
    if spread and max(spread) > 2:
        out.append(f"noisy run: prefill p90/p10 reaches {max(spread):.1f}x; the machine was busy, so trust medians "
                   "over many --repeats and ratios more than absolute times")
    bad = sorted({r["backend"] for r in rows if r["matches_eager"] is False})
    if bad:
        out.append(f"greedy tokens differ from eager for: {', '.join(bad)}")
    skipped = [b["name"] for b in report["backends"] if b["status"] != "ok"]
    if skipped:
        out.append(f"skipped: {', '.join(skipped)} (reasons under Backends)")
    return out


def render_html(report: dict[str, Any]) -> str:
    figs = dict.fromkeys(("latency", "throughput", "speedup", "roofline")) | charts(report)
    return _env().get_template("bench_report.html.j2").render(charts=figs, **_context(report))


def render_md(report: dict[str, Any]) -> str:
    return _env().get_template("bench_report.md.j2").render(**_context(report))


def write_report(report: dict[str, Any], out: Path) -> dict[str, Path]:
    problems = validate(report)
    if problems:  # a bug in l4compile, not a user error
        raise RuntimeError("benchmark report does not match its schema: " + "; ".join(problems[:5]))
    texts = {"json": json.dumps(report, indent=1) + "\n", "html": render_html(report), "md": render_md(report)}
    out.mkdir(parents=True, exist_ok=True)
    paths = {k: out / f"report.{k}" for k in texts}
    for k, text in texts.items():
        paths[k].write_text(text)
    return paths


# ---------------------------------------------------------------------------------------------------------------
# compare

def load_report(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        p = p / "report.json"
    if not p.is_file():
        raise L4Error(f"benchmark report '{path}' does not exist; give a report.json written by `l4compile bench`")
    try:
        rep = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise L4Error(f"cannot read benchmark report {p}: {e}") from None
    if not isinstance(rep, dict) or rep.get("kind") != "l4compile-bench":
        raise L4Error(f"{p} is not an l4compile bench report")
    if rep.get("schema_version") != SCHEMA_VERSION:
        raise L4Error(f"{p} has report schema version {rep.get('schema_version')!r}; this l4compile reads "
                      f"version {SCHEMA_VERSION}")
    problems = validate(rep)
    if problems:
        raise L4Error(f"{p} does not match the bench report schema ({problems[0]})")
    return rep


def _delta(a: float | None, b: float | None) -> str:
    if a is None or b is None or a == 0:
        return "–"
    return f"{(b - a) / abs(a) * 100:+.1f}%"


def compare(a: dict[str, Any], b: dict[str, Any], name_a: str = "A", name_b: str = "B") -> str:
    """A text table of B against A for every (backend, batch, prompt) both reports measured."""
    lines = [f"A: {name_a}  ({a['created']}, config {a['config_hash']})",
             f"B: {name_b}  ({b['created']}, config {b['config_hash']})"]
    if a["config_hash"] != b["config_hash"]:
        diff = sorted(k for k in set(a["config"]) | set(b["config"]) if a["config"].get(k) != b["config"].get(k))
        lines.append(f"note: the runs used different settings ({', '.join(diff)})")
    for key in ("torch", "transformers"):
        if a["environment"].get(key) != b["environment"].get(key):
            lines.append(f"note: {key} {a['environment'].get(key)} -> {b['environment'].get(key)}")
    ca, cb = a["environment"]["cpu"]["model"], b["environment"]["cpu"]["model"]
    ga, gb = (a["environment"].get("gpu") or {}).get("name"), (b["environment"].get("gpu") or {}).get("name")
    if (ca, ga) != (cb, gb):
        lines.append(f"note: different machines ({ga or ca} vs {gb or cb}): compare ratios, not times")
    ia = {(r["backend"], r["batch"], r["prompt_len"]): r for r in a["summary"]}
    ib = {(r["backend"], r["batch"], r["prompt_len"]): r for r in b["summary"]}
    common = [k for k in ia if k in ib]
    if not common:
        lines.append("no (backend, batch, prompt) in common; nothing to compare")
        return "\n".join(lines)
    hdr = (f"{'backend':<14}{'batch':>6}{'prompt':>7}  {'prefill ms A':>12}{'B':>9}{'delta':>9}  "
           f"{'decode ms/tok A':>15}{'B':>9}{'delta':>9}  {'vs eager A':>10}{'B':>8}")
    lines += ["", hdr, "-" * len(hdr)]
    for k in common:
        ra, rb = ia[k], ib[k]
        pa, pb = ra["prefill_ms"]["median"], rb["prefill_ms"]["median"]
        da, db = ra["decode_ms_per_token"]["median"], rb["decode_ms_per_token"]["median"]
        lines.append(f"{k[0]:<14}{k[1]:>6}{k[2]:>7}  {fmt_ms(pa):>12}{fmt_ms(pb):>9}{_delta(pa, pb):>9}  "
                     f"{fmt_ms(da):>15}{fmt_ms(db):>9}{_delta(da, db):>9}  "
                     f"{fmt_ratio(ra.get('speedup_decode_vs_eager')):>10}{fmt_ratio(rb.get('speedup_decode_vs_eager')):>8}")
    only = sorted(set(ia) ^ set(ib))
    if only:
        lines.append(f"(measured in one report only: {', '.join(f'{n} b={x} s={y}' for n, x, y in only)})")
    lines.append("delta: (B - A) / A; negative is faster. 'vs eager': decode speed-up over eager in each run.")
    return "\n".join(lines)
