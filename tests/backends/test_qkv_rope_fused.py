"""backends.qkv_rope_fused: a CUDA engine's step transforms each RoPE layer's queries and keys (RoPE, qk-norm) in
the epilogue of its Int4 qkv GEMM, and the attention takes q and k as they come. The rewritten step graph, run here
on CPU tensors with the Triton kernels under the interpreter, gives the step graph's logits; what does not match is
left as it is."""
from __future__ import annotations

import copy

import pytest
import torch

from backends.inductor import caches_in_place, split_k_locks_chained
from backends.qkv_rope_fused import qkv_rope_fused
from tests.backends.test_norm_router_fused import _program, _targets
from tests.kernels.conftest import rel_err, require_interpreter


@pytest.fixture(scope="module")
def step():
    """tiny Int4's step graph with its caches written in place (what the rewrite runs on), and the program."""
    from l4compile.kernels.dispatch import attention_cached_in_place

    prog = _program("int4")
    return caches_in_place(prog.gm, attention_cached_in_place), prog


@pytest.fixture(scope="module")
def maverick_step():
    """tiny-maverick's (no qk-norm, plain RoPE, dense/MoE interleave 2), as ``step``."""
    from l4compile.kernels.dispatch import attention_cached_in_place

    prog = _program("int4", "tiny-maverick")
    return caches_in_place(prog.gm, attention_cached_in_place), prog


def _fused(gm):
    from l4compile.kernels import dispatch

    return qkv_rope_fused(gm, {dispatch.attention_cached_in_place}, dispatch.linear_int4_rope)


def _rope_layers(prog) -> int:
    return sum(1 for flag in prog.model_config.no_rope_layers if flag)


def _run(gm, prog, caches, ids, start):
    with torch.no_grad():
        return gm(ids, torch.tensor([start]), *caches)


@pytest.mark.parametrize("model", ["tiny", "tiny-maverick"])
def test_step_graph_with_qkv_rope_fused_gives_the_same_logits(model, request):
    """The 3 RoPE layers of tiny (qk-norm) and of tiny-maverick (RoPE alone) are rewritten (the NoPE layer is not):
    their qkv GEMMs became ``linear_int4_rope`` over q's and k's columns (0 .. (Hq + Hkv) * D) and their attention
    calls take q and k as they come. A 13-token prefill and two decode steps of a batch of 2 give the graph's logits
    (and caches)."""
    require_interpreter()
    from l4compile.kernels.dispatch import attention_cached_in_place

    gm, prog = request.getfixturevalue("step" if model == "tiny" else "maverick_step")
    fused, count = _fused(gm)
    n_rope = _rope_layers(prog)
    assert count == n_rope == 3
    before, after = _targets(gm), _targets(fused)
    assert after.count("linear_int4_rope") == n_rope
    assert after.count("l4.linear_int4.default") == before.count("l4.linear_int4.default") - n_rope
    assert after.count("aten.rsqrt.default") == before.count("aten.rsqrt.default")   # the k norm is in the op body
    ready = [(n.kwargs.get("k_ready", False), n.kwargs.get("q_ready", False)) for n in fused.graph.nodes
             if n.target is attention_cached_in_place]
    assert sorted(ready) == [(False, False)] + [(True, True)] * n_rope
    cfg = prog.model_config
    spans = {n.args[6:9] for n in fused.graph.nodes if getattr(n.target, "__name__", "") == "linear_int4_rope"}
    assert spans == {(0, (cfg.num_attention_heads + cfg.num_key_value_heads) * cfg.head_dim, cfg.head_dim)}

    _, n_kv, _, d = prog.kv_layout["shape"]
    caches = [[torch.zeros(2, n_kv, layer["slots"], d) for layer in prog.kv_layout["layers"] for _ in (0, 1)]
              for _ in range(2)]
    ids = torch.randint(0, prog.model_config.vocab_size, (2, 15), generator=torch.Generator().manual_seed(5))
    for x, start in ((ids[:, :13], 0), (ids[:, 13:14], 13), (ids[:, 14:], 14)):
        ref, got = _run(gm, prog, caches[0], x, start), _run(fused, prog, caches[1], x, start)
        assert rel_err(got, ref) < 1e-5, start
        for a, b in zip(*caches):
            assert rel_err(b, a) < 1e-5, start


def test_rope_gemm_joins_the_counter_chain(step, monkeypatch):
    """Where its blocks split K, the rewritten qkv GEMM takes a block of the step's zeroed counters
    (``linear_int4_rope_chained``), and the step still gives the graph's logits."""
    require_interpreter()
    from l4compile.kernels import dispatch, ops
    from l4compile.kernels.layout import SPLIT_K_LOCK_WORDS, Int4Blocks

    gm, prog = step
    fused, _ = _fused(gm)
    monkeypatch.setattr(ops, "default_int4_blocks", lambda w, s: Int4Blocks(16, 16, 16, True, 2))
    chains = {dispatch.linear_int4_rope: (dispatch.linear_int4_rope_chained, dispatch.int4_rope_splits)}
    chained = split_k_locks_chained(fused, chains, SPLIT_K_LOCK_WORDS)
    assert _targets(chained).count("linear_int4_rope_chained") == _rope_layers(prog)
    _, n_kv, _, d = prog.kv_layout["shape"]
    caches = [torch.zeros(2, n_kv, layer["slots"], d) for layer in prog.kv_layout["layers"] for _ in (0, 1)]
    ids = torch.randint(0, prog.model_config.vocab_size, (2, 4), generator=torch.Generator().manual_seed(6))
    ref = _run(gm, prog, [c.clone() for c in caches], ids, 0)
    assert rel_err(_run(chained, prog, caches, ids, 0), ref) < 1e-5


def test_what_does_not_match_is_left_alone(step):
    """A layer whose k slice is read by another node and one whose qkv output is: both keep their GEMM and their
    attention's own k transform; the NoPE layer is never taken."""
    gm, prog = step
    gm = copy.deepcopy(gm)
    qkvs = [n for n in gm.graph.nodes if n.target is torch.ops.l4.linear_int4.default
            and any(u.target is torch.ops.aten.slice.Tensor for u in n.users)]
    assert len(qkvs) == len(prog.kv_layout["layers"])
    k_slice = [u for u in qkvs[0].users][1]
    with gm.graph.inserting_after(k_slice):
        gm.graph.call_function(torch.ops.aten.mul.Tensor, (k_slice, 2.0))       # k read twice
    with gm.graph.inserting_after(qkvs[1]):
        gm.graph.call_function(torch.ops.aten.mul.Tensor, (qkvs[1], 2.0))       # the qkv output read elsewhere
    fused, count = _fused(gm)
    assert count == _rope_layers(prog) - 2
    assert _targets(fused).count("linear_int4_rope") == count


def test_qkv_rope_can_be_turned_off(monkeypatch):
    """L4COMPILE_QKV_ROPE=0 builds a CUDA engine without the fusion (to time a step both ways)."""
    from backends.inductor import qkv_rope_enabled

    assert qkv_rope_enabled()
    monkeypatch.setenv("L4COMPILE_QKV_ROPE", "0")
    assert not qkv_rope_enabled()
