"""The ``l4compile`` command line. User errors print one ``error:`` line on stderr and exit 2."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path

# Before torch is imported: a CUDA build of torch on a machine without a GPU driver logs "No CUDA runtime is found"
# when Inductor loads cpp_extension, a line that would precede a user error's one line on stderr
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)

from l4compile.bench import cli as bench_cli
from l4compile.config import DECODE_MODES
from l4compile.engine_options import check_build_options
from l4compile.errors import L4Error
from l4compile.inductor_configs import parse_cli as parse_inductor_configs
from l4compile.pass_options import field_default, parse_cli as parse_pass_options
from l4compile.paths import check_out_file
from l4compile.plan import cli as plan_cli


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, as for every user error
        raise L4Error(f"{message} (see `{self.prog} --help`)")


def _quiet() -> None:
    """Keep library chatter (export/inductor warnings) off the user's terminal."""
    warnings.filterwarnings("ignore")
    for name in ("torch", "torch._inductor", "torch._export", "torch.export", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch._logging
    import transformers

    torch._logging.set_logs(inductor=logging.ERROR, export=logging.ERROR, dynamo=logging.ERROR)
    transformers.logging.set_verbosity_error()   # e.g. Scout's own llama3 RoPE config (low == high factor) warns


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'")
    return v


def _non_negative(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got '{text}'") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got '{text}'")
    return v


def parse_prompt_ids(text: str) -> list[int]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise L4Error("--prompt-ids is empty; give comma-separated token ids, e.g. --prompt-ids 1,2,3")
    ids = []
    for p in parts:
        try:
            ids.append(int(p))
        except ValueError:
            raise L4Error(f"--prompt-ids: '{p}' is not an integer token id (use e.g. --prompt-ids 1,2,3)") from None
    return ids


def _add_model_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="checkpoint directory (config.json + *.safetensors) or preset name")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--seed", type=int, default=0, help="seed for preset weights")
    p.add_argument("--layers", type=_positive, default=None, help="presets only: number of decoder layers")
    p.add_argument("--max-seq-len", type=_positive, default=None)
    p.add_argument("--max-batch-size", type=_positive, default=4)


def add_build_opts(p: argparse.ArgumentParser, inductor_help: str, pass_help: str = "set an option of a pass") -> None:
    """``--pass-option`` and ``--inductor-config``, as compile, parity and bench take them."""
    p.add_argument("--pass-option", dest="pass_options", action="append", default=[], metavar="PASS.KEY=VALUE",
                   help=f"{pass_help}, e.g. quantize.quantize_lm_head=true, quantize.group_size=64, "
                        "kv_cache.ring_buffers=false (repeatable; `l4compile passes` lists each pass's options)")
    p.add_argument("--inductor-config", dest="inductor_configs", action="append", default=[], metavar="KEY=VALUE",
                   help=f"{inductor_help}, e.g. max_autotune=true, combo_kernels=true, cpp.simdlen=0 "
                        "(repeatable; VALUE is JSON, a Python literal or a string)")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="l4compile", description="Compile Llama 4 models into Inductor engines.")
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    c = sub.add_parser("compile", help="compile MODEL into an engine directory")
    _add_model_opts(c)
    c.add_argument("--backend", default="inductor", help="inductor | onnxruntime | tensorrt")
    c.add_argument("--out", required=True, help="engine directory to write")
    c.add_argument("--quant", default="none", help="none | fp8 | int4")
    c.add_argument("--force", action="store_true", help="replace --out if it exists")
    c.add_argument("--pass", dest="passes", action="append", default=[], metavar="MODULE:FUNC",
                   help="add a user pass (repeatable)")
    c.add_argument("--skip-pass", dest="skip_passes", action="append", default=[], metavar="NAME")
    add_build_opts(c, "--backend inductor: an Inductor setting for this engine")
    c.add_argument("--dump-ir", default=None, metavar="DIR", help="write the graph before and after each pass")
    c.add_argument("--verify", action="store_true", help="check the output after every pass; name the first drift")
    c.add_argument("--plan", default=None, metavar="PLAN.json",
                   help="shard experts as `l4compile plan --json` placed them: one artifact set per rank")
    c.add_argument("--stream-weights", action="store_true",
                   help="never hold the float model in memory: trace on the meta device and read each weight when a "
                        "pass needs it (with --quant, only quantized weights are kept; full Scout Int4 fits one H100)")
    c.add_argument("--text-only", action="store_true",
                   help="multimodal checkpoints: compile the text model alone (no vision engine)")
    c.add_argument("--tune-kernels", action="store_true",
                   help="--device cuda --backend inductor: time the Int4 kernels' block configurations on this GPU "
                        "(a decode step's shapes) and build the fastest in (manifest kernel_blocks)")

    r = sub.add_parser("run", help="generate from an engine (greedy, or sampled with --temperature)")
    r.add_argument("engine", metavar="ENGINE")
    r.add_argument("--prompt-ids", default=None, help="comma-separated token ids, e.g. 1,2,3")
    r.add_argument("--prompt", default=None, metavar="TEXT",
                   help="text, encoded with the engine's tokenizer (engines of checkpoints that ship tokenizer.json); "
                        "the JSON line then carries the generated text too")
    r.add_argument("--chat", action="store_true",
                   help="--prompt is a user message: render it with the checkpoint's chat template (as transformers' "
                        "apply_chat_template, with the assistant's header appended)")
    r.add_argument("--system", default=None, metavar="TEXT", help="--chat: a system message before the prompt")
    r.add_argument("--image", dest="images", action="append", default=[], metavar="FILE",
                   help="multimodal engines: an image (PNG, JPEG, ...) for the next <|image|> placeholder in the "
                        "prompt, or in front of it when it has none (repeatable)")
    r.add_argument("--max-new-tokens", type=_non_negative, default=16)
    r.add_argument("--temperature", type=float, default=0.0, help="0 (the default) is greedy; above 0 samples")
    r.add_argument("--top-k", type=_positive, default=None, help="sample among the K most likely tokens")
    r.add_argument("--top-p", type=float, default=None, help="sample within the nucleus of probability mass P")
    r.add_argument("--seed", type=_non_negative, default=None, help="seed of the sampling (default: a fresh one)")
    r.add_argument("--stop-ids", default=None, metavar="IDS",
                   help="comma-separated ids a sequence ends at; `eos` stands for the engine's end-of-sequence ids, "
                        "`none` for no stop (default: eos with --prompt, none with --prompt-ids)")
    r.add_argument("--logits-out", default=None, metavar="FILE.npy",
                   help="write the prompt's logits, float32 [prompt_len, vocab]")
    r.add_argument("--nproc", type=_positive, default=None,
                   help="sharded engines: run N processes with torchrun (one per rank)")
    r.add_argument("--decode-mode", choices=DECODE_MODES, default=None,
                   help="how decode steps run: graph = one CUDA graph replay per step (default for CUDA Inductor "
                        "engines), loop = one engine call per step (default elsewhere), static = graph's steps "
                        "without capture")

    p = sub.add_parser("parity", help="compare engines with transformers eager (backend x quant x dtype)")
    _add_model_opts(p)   # --dtype takes a comma-separated list here
    p.add_argument("--backend", default=None, help="one backend (default inductor); same as --backends B")
    p.add_argument("--backends", default=None, metavar="B1,B2,...",
                   help="the matrix: comma-separated backends, e.g. inductor,onnxruntime,tensorrt")
    p.add_argument("--quant", default=None, metavar="Q1,Q2,...", help="comma-separated: none | fp8 | int4")
    p.add_argument("--engine", default=None, help="use this engine instead of compiling one")
    p.add_argument("--steps", type=_positive, default=32, help="greedy tokens to compare")
    p.add_argument("--json", dest="json_out", default=None, metavar="FILE")
    add_build_opts(p, "an Inductor setting for the inductor engines (with --engine: what it was compiled with)",
                   "compile every engine with this pass option (with --engine: what it was compiled with)")
    # None = not given: the matrix's defaults (float32, cpu, seed 0, quant none); with --engine, the engine's own
    p.set_defaults(dtype=None, device=None, seed=None)

    sub.add_parser("passes", help="list registered passes")
    s = sub.add_parser("presets", help="list model presets")
    s.add_argument("--json", action="store_true")
    s.add_argument("--sizes", action="store_true", help="weight bytes at real dimensions: bf16 / fp8 / int4")
    bench_cli.add_parser(sub)
    plan_cli.add_parser(sub)
    return ap


def cmd_compile(a) -> int:
    from l4compile.compiler import build
    from l4compile.engine import read_manifest
    from l4compile.progress import Progress

    progress = Progress()
    pass_options = parse_pass_options(a.pass_options)
    path = build(a.model, backend=a.backend, out=a.out, quant=a.quant, dtype=a.dtype, device=a.device,
                 max_seq_len=a.max_seq_len, max_batch_size=a.max_batch_size, seed=a.seed, layers=a.layers,
                 force=a.force, passes=tuple(a.passes), skip_passes=tuple(a.skip_passes), verify=a.verify,
                 dump_ir=a.dump_ir, progress=progress, plan=a.plan, text_only=a.text_only,
                 stream_weights=a.stream_weights, pass_options=pass_options,
                 inductor_configs=parse_inductor_configs(a.inductor_configs), tune_kernels=a.tune_kernels)
    m = read_manifest(path)           # not loaded: `run` / `bench` load it (full Scout: ~58 GB of weights)
    size = sum(v["bytes"] for v in m["artifacts"].values())
    out = {"engine": str(path), "backend": m["backend"], "compile_seconds": m["compile_seconds"],
           "engine_bytes": size, "passes": {p["name"]: p["stats"] for p in m["passes"]}}
    if m.get("kernel_blocks"):
        from l4compile.kernels.autotune import summary
        out["tuned_kernels"] = [summary(r) for r in m["kernel_blocks"]["problems"]]
    if a.verify:   # per pass: drift (exact passes) or logit SQNR against its input (lossy passes: quantize)
        out["verify"] = {p["name"]: {k: p[k] for k in ("drift", "logit_sqnr_db") if k in p} for p in m["passes"]}
    print(json.dumps(out))
    return 0


def prompt_tokens(a, engine: str, manifest: dict) -> list[int]:
    """``run``'s prompt: --prompt-ids, or --prompt encoded with the engine's tokenizer (with --chat: the conversation
    [--system, --prompt] through its chat template)."""
    if (a.prompt_ids is None) == (a.prompt is None):
        raise L4Error("give the prompt as --prompt-ids 1,2,3 or as --prompt TEXT" if a.prompt is None else
                      "give --prompt or --prompt-ids, not both")
    if a.system is not None and not a.chat:
        raise L4Error("--system is a chat message: add --chat")
    if a.chat and a.prompt is None:
        raise L4Error("--chat renders a text message: give it as --prompt TEXT")
    if a.chat and a.images:
        raise L4Error("--chat does not take --image yet; put <|image|> in a plain --prompt or in --prompt-ids")
    if a.prompt_ids is not None:
        return parse_prompt_ids(a.prompt_ids)
    if not manifest.get("tokenizer"):
        raise L4Error(f"engine {engine} has no tokenizer (its checkpoint had no tokenizer.json; presets have none): "
                      "give token ids with --prompt-ids")
    if a.chat and not manifest.get("chat_template"):
        raise L4Error(f"engine {engine} has no chat template (its checkpoint had none): drop --chat")
    from l4compile.engine import verify_artifacts
    from l4compile.tokenizer import EngineTokenizer

    text = [manifest["tokenizer"]] + ([manifest["chat_template"]["path"]] if manifest.get("chat_template") else [])
    verify_artifacts(Path(engine), {"artifacts": {rel: manifest["artifacts"].get(rel, {}) for rel in text}})
    tok = EngineTokenizer.of_engine(Path(engine), manifest)
    if not a.chat:
        return tok.encode(a.prompt)
    system = [{"role": "system", "content": a.system}] if a.system is not None else []
    return tok.chat([*system, {"role": "user", "content": a.prompt}])


def run_sampling(a):
    """``run``'s --temperature / --top-k / --top-p / --seed as a checked ``Sampling``."""
    from l4compile.sampling import Sampling
    return Sampling(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed)


def stop_tokens(a, engine: str, manifest: dict) -> list[int]:
    """``run``'s --stop-ids: [] (no stop) or the ids a sequence ends at, checked against the vocabulary."""
    from l4compile.sampling import check_token_ids

    eos = list((manifest.get("generation") or {}).get("eos_token_ids") or [])
    if a.stop_ids is None:
        return eos if a.prompt is not None else []
    items = [x.strip() for x in a.stop_ids.split(",") if x.strip()]
    if items == ["none"]:
        return []
    if not items or "none" in items:
        raise L4Error(f"--stop-ids {a.stop_ids!r}: give token ids and/or eos, or none alone")
    ids: list = []
    for x in items:
        if x == "eos":
            if not eos:
                raise L4Error(f"engine {engine} has no end-of-sequence ids (its checkpoint names none; presets have "
                              "none): give the ids with --stop-ids")
            ids += eos
        else:
            try:
                ids.append(int(x))
            except ValueError:
                raise L4Error(f"--stop-ids: '{x}' is not a token id, eos or none") from None
    return check_token_ids(dict.fromkeys(ids), int(manifest["model_config"]["vocab_size"]), "--stop-ids")


def cmd_run(a) -> int:
    import numpy as np
    import torch

    from l4compile.engine import load_engine, read_manifest

    if getattr(a, "nproc", None):   # sharded engine: one process per rank under torchrun
        from l4compile.dist import launch
        return launch(a)
    manifest = read_manifest(Path(a.engine))
    prompt = prompt_tokens(a, a.engine, manifest)
    sampling = run_sampling(a)
    stops = stop_tokens(a, a.engine, manifest)
    if a.logits_out:
        check_out_file(a.logits_out, "--logits-out")
    t0 = time.perf_counter()
    eng = load_engine(a.engine, decode_mode=a.decode_mode)
    load_s = time.perf_counter() - t0
    ids = torch.tensor([prompt], dtype=torch.int64)
    prepared, vision_s = None, 0.0
    if a.images:   # decode, lay out and encode the images once, before the timed text work
        t_v = time.perf_counter()
        prepared = eng.prepare_prompt(ids, a.images)
        vision_s = time.perf_counter() - t_v
        ids = prepared.ids
    eng.check_input_ids(ids)
    eng.check_room(ids.shape[1], a.max_new_tokens)   # fail before any work is done
    t1 = time.perf_counter()
    logits = eng.prefill(ids, images=prepared)
    prefill_s = time.perf_counter() - t1
    if a.logits_out:
        np.save(a.logits_out, logits[0].float().cpu().numpy())
    t_d = time.perf_counter()
    if a.max_new_tokens > 1:
        eng.prepare_decode(ids.shape[0], sampling)   # static buffers / CUDA graph capture, outside the timed generate
    setup_s = time.perf_counter() - t_d
    t2 = time.perf_counter()
    out = eng.generate(ids, max_new_tokens=a.max_new_tokens, images=prepared, sampling=sampling,
                       stop_ids=stops or None)
    gen_s = time.perf_counter() - t2
    new = out[0, ids.shape[1]:].tolist()
    result = {"generated_ids": new, "finish_reason": "stop" if set(new) & set(stops) else "length"}
    if manifest.get("tokenizer"):
        result["text"] = eng.tokenizer.decode(new)
    if not sampling.greedy:
        result["sampling"] = sampling.to_dict()
    print(json.dumps(result | {
        "prompt_len": int(ids.shape[1]), "images": len(a.images), "vision_ms": round(vision_s * 1e3, 3),
        "load_ms": round(load_s * 1e3, 2), "prefill_ms": round(prefill_s * 1e3, 3),
        "generate_ms": round(gen_s * 1e3, 3), "ms_per_token": round(gen_s * 1e3 / max(1, len(new)), 3),
        "decode_mode": eng.decode_mode, "decode_setup_ms": round(setup_s * 1e3, 3)}
        | ({"cuda_graph_error": eng.cuda_graph_error} if eng.cuda_graph_error else {})))
    return 0


def _csv_choice(text: str, allowed: tuple[str, ...], option: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if not items or bad:
        raise L4Error(f"{option}: unknown value {(bad or [text])[0]!r}; choose from {', '.join(allowed)}")
    return list(dict.fromkeys(items))


def _check_engine_options(a, manifest: dict) -> None:
    """``parity --engine``: the engine fixes what it was compiled with; an option given that says otherwise is an
    error, not silently dropped."""
    cc = manifest["compile_config"]
    given = {"--backend": (a.backend, manifest["backend"]), "--quant": (a.quant, manifest.get("quant", "none")),
             "--dtype": (a.dtype, manifest["dtype"]), "--device": (a.device, manifest["device"]),
             "--seed": (a.seed, cc.get("seed", 0)), "--layers": (a.layers, cc.get("layers")),
             "--max-seq-len": (a.max_seq_len, manifest["max_seq_len"])}
    for flag, (value, engine_value) in given.items():
        if value is not None and str(value) != str(engine_value):
            raise L4Error(f"{flag} {value} contradicts engine {a.engine}, compiled with {flag} {engine_value}; "
                          "drop it (the engine's own settings are used)")
    check_build_options(manifest, a.engine, parse_pass_options(a.pass_options),
                        parse_inductor_configs(a.inductor_configs))


def cmd_parity(a) -> int:
    """One engine (``--engine``) or the matrix backend x quant x dtype; exit 1 if any present backend fails."""
    from l4compile import frontend, parity
    from l4compile.config import BACKENDS, DTYPES, QUANTS
    from l4compile.engine import load_engine

    if a.backend is not None and a.backends is not None:
        raise L4Error("give --backend or --backends, not both")
    matrix = a.backends is not None
    if a.json_out:
        check_out_file(a.json_out, "--json")
    backends = _csv_choice(a.backends or a.backend or "inductor", BACKENDS, "--backends")
    quants = _csv_choice(a.quant or "none", QUANTS, "--quant")
    dtypes = _csv_choice(a.dtype or "float32", DTYPES, "--dtype")
    if a.engine:
        if matrix or len(dtypes) > 1 or len(quants) > 1:
            raise L4Error("--engine compares one existing engine; drop --backends and list options")
        eng = load_engine(a.engine)
        m = eng.manifest
        _check_engine_options(a, m)
        seed = m["compile_config"].get("seed", 0)
        layers = m["compile_config"].get("layers")
        # on the engine's device: full-size presets draw their random weights there (CUDA's draws are not CPU's)
        lm = frontend.load(a.model, dtype=m["dtype"], device=m["device"], seed=seed, layers=layers).model
        if m["model_config"]["vocab_size"] != lm.config.vocab_size:
            raise L4Error(f"engine {a.engine} was not compiled from {a.model} (vocabulary sizes differ)")
        rows = [parity.from_report(_parity_run(eng, lm, a.steps))]
    else:
        def show(row) -> None:   # one line per cell as it completes (compiles take a while)
            print(f"  {row.backend}/{row.quant}/{row.dtype}: {row.status}", file=sys.stderr, flush=True)

        rows = parity.run_matrix(a.model, backends, quants, dtypes, device=a.device or "cpu", seed=a.seed or 0,
                                 layers=a.layers,
                                 max_seq_len=a.max_seq_len, max_batch_size=a.max_batch_size, steps=a.steps,
                                 pass_options=parse_pass_options(a.pass_options),
                                 inductor_configs=parse_inductor_configs(a.inductor_configs),
                                 on_row=show if sys.stderr.isatty() else None)
    print(parity.format_table(rows))
    failed = any(r.status == "fail" for r in rows)
    if a.json_out:
        if matrix:
            d = {"status": "fail" if failed else "pass", "rows": [r.to_dict() for r in rows]}
        else:
            d = rows[0].to_dict()
        Path(a.json_out).write_text(json.dumps(d, indent=2))
    return 1 if failed else 0


def _parity_run(eng, lm, steps: int):
    from l4compile import parity

    prompts = parity.default_prompts(eng.vocab_size, int(lm.config.attention_chunk_size), eng.max_seq_len, steps)
    return parity.compare(eng, lm, prompts, steps)


def cmd_passes(a) -> int:
    from l4compile.pipeline import load_entry_point_passes, select_passes
    from l4compile.passes import registered_passes

    load_entry_point_passes()
    order = {s.name: i for i, s in enumerate(select_passes())}
    vision = {s.name: i for i, s in enumerate(select_passes(kind="vision"))}
    specs = sorted(registered_passes().values(),
                   key=lambda s: (order.get(s.name, 1 << 30), vision.get(s.name, 1 << 30), s.name))
    print(f"{'#':<3}{'pass':<24}{'programs':<13}{'source':<12}{'ordering':<46}description")
    for s in specs:
        pos = str(order[s.name] + 1) if s.name in order else (f"v{vision[s.name] + 1}" if s.name in vision else "-")
        print(f"{pos:<3}{s.name:<24}{','.join(s.programs):<13}{s.source:<12}{s.ordering():<44}  {s.description}")
        if s.options is not None:     # what --pass-option NAME.KEY=VALUE takes, with the defaults
            fields = dataclasses.fields(s.options)
            defaults = (f"{f.name}={json.dumps(field_default(f), default=str)}" for f in fields)
            print(f"{'':<27}options: " + ", ".join(defaults))
    return 0


def cmd_presets(a) -> int:
    from l4compile.presets import PRESETS

    rows = []
    for p in PRESETS.values():
        c = p.text_config_kwargs()
        rows.append({"name": p.name, "layers": c["num_hidden_layers"], "hidden": c["hidden_size"],
                     "experts": c["num_local_experts"], "top_k": c["num_experts_per_tok"],
                     "moe_interleave": c["interleave_moe_layer_step"], "qk_norm": c["use_qk_norm"],
                     "chunk": c["attention_chunk_size"], "vocab": c["vocab_size"], "description": p.description})
    if a.sizes:
        from l4compile.quant import preset_weight_bytes
        for r in rows:
            r["weight_bytes"] = preset_weight_bytes(r["name"])
    if a.json:
        print(json.dumps(rows))
        return 0
    sizes = f"{'bf16 GB':>10}{'fp8 GB':>9}{'int4 GB':>9}" if a.sizes else ""
    print(f"{'preset':<16}{'layers':>7}{'hidden':>8}{'experts':>8}{'vocab':>8}{sizes}  description")
    for r in rows:
        w = r.get("weight_bytes")
        sz = "".join(f"{w[q] / 1e9:>{n}.1f}" for q, n in (("none", 10), ("fp8", 9), ("int4", 9))) if w else ""
        print(f"{r['name']:<16}{r['layers']:>7}{r['hidden']:>8}{r['experts']:>8}{r['vocab']:>8}{sz}  {r['description']}")
    return 0


COMMANDS = {"compile": cmd_compile, "run": cmd_run, "parity": cmd_parity, "passes": cmd_passes,
            "presets": cmd_presets, "bench": bench_cli.run, "plan": plan_cli.run}


def main(argv: list[str] | None = None) -> int:
    _quiet()
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.cmd](args)
    except L4Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
