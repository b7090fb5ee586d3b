"""Sharded (expert- and tensor-parallel) engines on torch.distributed: the torchrun entry point and ``run --nproc``.

    torchrun --nproc-per-node N -m l4compile.dist ENGINE --prompt-ids 1,2,3 [the other `run` options, not --nproc]
    l4compile run ENGINE --nproc N --prompt-ids 1,2,3          # spawns the torchrun line above (--standalone)

Every process joins the default process group (gloo for CPU engines, NCCL for CUDA engines, one GPU per
process: ``cuda:LOCAL_RANK``), loads its rank's artifact (``rank{r}/model.pt2``) and runs exactly what
``l4compile run`` runs (the same ``Engine``: prefill, then generate through the KV cache, each rank
holding the caches of its own kv heads). Tokens are replicated: every rank feeds the same tokens at every
step and all ranks produce the same logits (sampling draws with one seed on every rank: ``--seed``, else one
rank 0 draws and broadcasts); only the collective ops in the graphs (``l4::moe_ep``, and
``l4::all_reduce`` after tensor-parallel matmuls) talk to each other. Rank 0 alone prints the JSON line and
writes ``--logits-out``. Multi-node: torchrun's rendezvous, e.g. on each of 2 nodes with 4 GPUs
``torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint HOST:29500 --rdzv-id JOB
-m l4compile.dist ENGINE ...``.
"""
from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

from l4compile.errors import L4Error
from l4compile.paths import check_out_file


def _run_args(argv: list[str]):
    from l4compile import cli

    args = cli.build_parser().parse_args(["run", *argv])
    if getattr(args, "nproc", None):
        raise L4Error("--nproc is for `l4compile run`; under torchrun the process count is --nproc-per-node")
    return args


def preflight(args) -> dict:
    """User errors (bad engine, bad ids, wrong process count) before any process is spawned: -> manifest."""
    from l4compile.cli import prompt_tokens, run_sampling, stop_tokens
    from l4compile.engine import read_manifest

    m = read_manifest(Path(args.engine))
    prompt = prompt_tokens(args, args.engine, m)
    run_sampling(args)
    stop_tokens(args, args.engine, m)
    vocab, max_seq = int(m["model_config"]["vocab_size"]), int(m["max_seq_len"])
    bad = [t for t in prompt if not 0 <= t < vocab]
    if bad:
        raise L4Error(f"token id {bad[0]} is outside the vocabulary [0, {vocab})")
    if len(prompt) + args.max_new_tokens > max_seq:
        raise L4Error(f"prompt ({len(prompt)} tokens) + --max-new-tokens ({args.max_new_tokens}) exceeds the "
                      f"engine's max sequence length {max_seq}")
    world = (m.get("sharding") or {}).get("world_size")
    nproc = getattr(args, "nproc", None) or int(os.environ.get("WORLD_SIZE", "0")) or None
    if world and nproc and nproc != world:
        raise L4Error(f"engine {args.engine} is sharded over {world} ranks; use {world} processes, not {nproc}")
    if not world and nproc and nproc > 1:   # every process would compute the same thing
        raise L4Error(f"engine {args.engine} is not sharded; run it without --nproc (or compile with --plan to "
                      f"shard it over {nproc} processes)")
    if args.images and not m.get("vision"):
        raise L4Error(f"engine {args.engine} has no vision engine" + ("; sharded engines are text-only" if world
                                                                     else ""))
    if args.logits_out:
        check_out_file(args.logits_out, "--logits-out")
    return m


def launch(args) -> int:
    """``l4compile run ENGINE --nproc N``: torchrun (standalone rendezvous) over ``-m l4compile.dist``."""
    preflight(args)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
           "-m", "l4compile.dist", str(args.engine), "--max-new-tokens", str(args.max_new_tokens),
           "--temperature", repr(args.temperature)]
    for flag, value in (("--prompt-ids", args.prompt_ids), ("--prompt", args.prompt), ("--system", args.system),
                        ("--top-k", args.top_k), ("--top-p", args.top_p), ("--seed", args.seed),
                        ("--stop-ids", args.stop_ids), ("--logits-out", args.logits_out),
                        ("--decode-mode", args.decode_mode)):
        if value is not None:
            cmd.append(f"{flag}={value}")      # one word: a prompt may start with '-'
    cmd += ["--chat"] if args.chat else []
    for image in args.images:
        cmd += ["--image", str(image)]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc)))
    rc = subprocess.run(cmd, env=env).returncode
    return 2 if rc == 2 else rc


def init_process_group(manifest: dict) -> None:
    import torch
    import torch.distributed as dist

    if manifest["device"] == "cuda":
        if not torch.cuda.is_available():
            raise L4Error("this engine was built for CUDA and this machine has no CUDA GPU")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl", device_id=torch.device("cuda", torch.cuda.current_device()))
    else:
        dist.init_process_group("gloo")


def shared_seed(manifest: dict) -> int:
    """A fresh sampling seed drawn on rank 0 and broadcast: the ranks replicate the tokens, so they sample alike."""
    import torch
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if manifest["device"] == "cuda" else "cpu"
    seed = torch.tensor([int.from_bytes(os.urandom(7), "little")], dtype=torch.int64, device=device)
    dist.broadcast(seed, src=0)
    return int(seed.item())


def main(argv: list[str] | None = None) -> int:
    import torch.distributed as dist

    from l4compile import cli

    cli._quiet()
    try:
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise L4Error("l4compile.dist runs under torchrun: `torchrun --nproc-per-node N -m l4compile.dist "
                          "ENGINE --prompt-ids ...` (or `l4compile run ENGINE --nproc N ...`)")
        args = _run_args(sys.argv[1:] if argv is None else argv)
        manifest = preflight(args)
        init_process_group(manifest)
        try:
            rank = dist.get_rank()
            if args.temperature > 0 and args.seed is None:   # every rank must draw the same tokens
                args.seed = shared_seed(manifest)
            if rank != 0:          # every rank computes; rank 0 alone reports
                args.logits_out = None
            with contextlib.redirect_stdout(io.StringIO()) if rank != 0 else contextlib.nullcontext():
                rc = cli.cmd_run(args)
            dist.barrier()
            return rc
        finally:
            dist.destroy_process_group()
    except L4Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    code = main()
    # A worker's work is done (process group destroyed, output written): skip interpreter teardown. Destroying the
    # native thread pools (gloo, AOTInductor runtime) in static-destructor order occasionally aborted a rank with
    # "terminate called without an active exception" (SIGABRT) after a successful run; torchrun then fails the job.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
