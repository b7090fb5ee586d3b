"""Decode modes: the static-buffer step (what a CUDA graph replays) gives the loop's tokens on the CPU, greedy or
sampled with a seed; on a GPU the captured graph gives them too. Stop ids end each sequence of a batch on its own."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import l4compile
from l4compile.errors import L4Error
from l4compile.sampling import GREEDY, Sampling
from tests.conftest import run_cli

NEW = 40


def test_static_decode_matches_loop(engines):
    """Two batch sizes, each decoder used twice: ``start`` must reset every static buffer (token, position, all
    caches), and 40 steps after a 13-token prompt wrap the chunk-8 ring buffers several times."""
    eng = l4compile.load_engine(engines["maverick-top2-odd"])
    assert eng.decode_mode == "loop"                       # the CPU default
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(3, eng.vocab_size, (2, 13), generator=g),
               torch.randint(3, eng.vocab_size, (1, 30), generator=g)]
    want = [eng.generate(p, max_new_tokens=NEW) for p in prompts]
    eng.decode_mode = "static"
    for p, w in zip(prompts * 2, want * 2):
        assert torch.equal(eng.generate(p, max_new_tokens=NEW), w)
    assert sorted(eng._decoders) == [("static", 1, GREEDY), ("static", 2, GREEDY)]
    dec = eng._decoders[("static", 2, GREEDY)]
    eng.decode_mode = "loop"                               # switching modes keeps a built decoder (no rebuild,
    eng.decode_mode = "static"                             # which in "graph" mode would be a new capture)
    assert torch.equal(eng.generate(prompts[0], max_new_tokens=NEW), want[0])
    assert eng._decoders[("static", 2, GREEDY)] is dec
    assert eng.cuda_graph_error is None
    # one new token needs no decode step, and zero none at all
    assert torch.equal(eng.generate(prompts[1], max_new_tokens=1), want[1][:, :31])


def test_sampled_decode_is_seeded_and_the_same_in_every_mode(engines):
    """One seed, one draw per step outside the step: the loop and the static decoder (a CUDA graph's steps) sample the
    same tokens; another seed samples others; top_k 1 is greedy. The decoder is built per sampling setting, not
    per seed."""
    eng = l4compile.load_engine(engines["maverick-top2-odd"])
    prompt = torch.randint(3, eng.vocab_size, (2, 13), generator=torch.Generator().manual_seed(5))
    s = Sampling(temperature=1.0, top_k=40, top_p=0.9, seed=7)
    loop = eng.generate(prompt, max_new_tokens=NEW, sampling=s)
    assert torch.equal(eng.generate(prompt, max_new_tokens=NEW, sampling=s), loop)
    other = eng.generate(prompt, max_new_tokens=NEW, sampling={"temperature": 1.0, "top_k": 40, "top_p": 0.9,
                                                                 "seed": 8})
    assert other.shape == loop.shape and torch.equal(other[:, :13], prompt)
    assert (other[:, 13:] != loop[:, 13:]).float().mean() > 0.5           # a high-entropy model: most draws differ
    greedy = eng.generate(prompt, max_new_tokens=NEW)
    assert not torch.equal(loop, greedy)
    assert torch.equal(eng.generate(prompt, max_new_tokens=NEW, sampling=Sampling(temperature=1.0, top_k=1)), greedy)
    eng.decode_mode = "static"
    assert torch.equal(eng.generate(prompt, max_new_tokens=NEW, sampling=s), loop)
    assert torch.equal(eng.generate(prompt, max_new_tokens=NEW, sampling=Sampling(temperature=1.0, top_k=40,
                                                                                  top_p=0.9, seed=8)), other)
    assert torch.equal(eng.generate(prompt, max_new_tokens=NEW), greedy)
    assert sorted(k[2].to_dict().get("top_k", 0) for k in eng._decoders) == [0, 40]   # the seed is not in the key
    with pytest.raises(L4Error, match="top_k must be a positive integer"):
        eng.generate(prompt, max_new_tokens=4, sampling={"temperature": 1.0, "top_k": 0})


@pytest.mark.parametrize("mode", ["loop", "static"])
def test_stop_ids_end_each_sequence(engines, mode):
    """A sequence ends at its first stop id and is padded after it (with the stop id: the checkpoint names no pad);
    generation ends when every sequence has ended, or at max_new_tokens."""
    eng = l4compile.load_engine(engines["maverick-top2-odd"], decode_mode=mode)
    assert eng.eos_ids == (2,) and eng.manifest["generation"]["source"] == "generation_config.json"
    prompt = torch.randint(3, eng.vocab_size, (2, 13), generator=torch.Generator().manual_seed(6))
    full = eng.generate(prompt, max_new_tokens=NEW)[:, 13:]                  # [2, NEW]
    row0 = full[0].tolist()
    stop = next(t for t in row0[3:] if t not in full[1].tolist())            # row 0 stops, row 1 never does
    end = row0.index(stop)
    got = eng.generate(prompt, max_new_tokens=NEW, stop_ids=[stop])
    want = full.clone()
    want[0, end + 1:] = stop
    assert torch.equal(got[:, 13:], want)
    both = full[1, 5].item()                                                 # now row 1 stops too, so generation ends
    got = eng.generate(prompt, max_new_tokens=NEW, stop_ids=[stop, both])
    ends = [next(i for i, t in enumerate(full[r].tolist()) if t in (stop, both)) for r in (0, 1)]
    assert got.shape[1] == 13 + max(ends) + 1
    for r in (0, 1):
        assert got[r, 13:13 + ends[r] + 1].tolist() == full[r, :ends[r] + 1].tolist()
        assert set(got[r, 13 + ends[r] + 1:].tolist()) <= {full[r, ends[r]].item()}
    assert torch.equal(eng.generate(prompt, max_new_tokens=NEW, stop_ids=[]), eng.generate(prompt, NEW))
    with pytest.raises(L4Error, match=r"stop_ids: token id 99999 is outside the vocabulary"):
        eng.generate(prompt, max_new_tokens=4, stop_ids=[99999])


def test_decode_mode_is_checked(engines):
    eng = l4compile.load_engine(engines["scout-like"])
    with pytest.raises(L4Error, match="runs on cpu; use 'static'"):
        eng.decode_mode = "graph"
    with pytest.raises(L4Error, match="unknown decode mode 'fast'"):
        eng.decode_mode = "fast"
    with pytest.raises(L4Error, match="unknown decode mode 'fast'"):
        l4compile.load_engine(engines["scout-like"], decode_mode="fast")
    assert eng.decode_mode == "loop"
    eng.manifest = dict(eng.manifest, kv_cache=None)      # as an engine compiled with --skip-pass kv_cache
    with pytest.raises(L4Error, match="needs an engine with a KV cache"):
        eng.decode_mode = "static"


def test_cli_run_decode_modes(engines):
    """`run --decode-mode static` reports its mode and the loop's tokens; 'graph' on a CPU engine is a user error."""
    engine = engines["maverick-top2-odd"]
    prompt = [5, 9, 2, 7, 11, 3]
    r = run_cli("run", str(engine), "--prompt-ids", ",".join(map(str, prompt)), "--max-new-tokens", "12",
                "--decode-mode", "static")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["decode_mode"] == "static" and out["decode_setup_ms"] >= 0
    want = l4compile.load_engine(engine).generate(torch.tensor([prompt]), max_new_tokens=12)
    assert out["generated_ids"] == want[0, len(prompt):].tolist()
    r = run_cli("run", str(engine), "--prompt-ids", "1,2", "--decode-mode", "graph")
    assert r.returncode == 2 and r.stderr.startswith("error:") and "use 'static'" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype,quant", [("float32", "none"), ("bfloat16", "int4"), ("bfloat16", "fp8")])
def test_cuda_graph_decode_matches_loop(dtype, quant, tmp_path):
    """CUDA engines decode through a captured graph by default (the fused MoE / Int4 / FP8 Triton kernels inside it:
    FP8 engines have no opaque MoE op left to refuse capture) and give the same tokens as one engine call per step,
    greedy and sampled with a seed."""
    eng = l4compile.compile("tiny", out=tmp_path / "e", device="cuda", dtype=dtype, quant=quant, max_seq_len=96,
                            max_batch_size=2)
    assert eng.decode_mode == "graph"
    prompt = torch.randint(3, eng.vocab_size, (2, 17), generator=torch.Generator().manual_seed(3))
    sampled = Sampling(temperature=1.0, top_k=64, top_p=0.9, seed=3)
    got = eng.generate(prompt, max_new_tokens=NEW)
    got_s = eng.generate(prompt, max_new_tokens=NEW, sampling=sampled)   # sort / topk / noise race inside the graph
    assert eng.cuda_graph_error is None and eng._decoders[("graph", 2, GREEDY)].graph is not None
    assert eng._decoders[("graph", 2, dataclasses.replace(sampled, seed=None))].graph is not None
    again = eng.generate(prompt, max_new_tokens=NEW)        # a replayed decoder restarts cleanly
    eng.decode_mode = "loop"
    want = eng.generate(prompt, max_new_tokens=NEW)
    assert torch.equal(got.cpu(), want.cpu()) and torch.equal(again.cpu(), want.cpu())
    assert torch.equal(got_s.cpu(), eng.generate(prompt, max_new_tokens=NEW, sampling=sampled).cpu())
