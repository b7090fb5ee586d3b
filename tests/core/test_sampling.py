"""l4compile.sampling on its own: the draws follow the cut distribution, the cuts keep exactly the tokens they name,
the noise is seeded, and stopped sequences pad; every bad setting is one L4Error."""
from __future__ import annotations

import math

import pytest
import torch

from l4compile.errors import L4Error
from l4compile.sampling import GREEDY, NoiseSource, Sampling, StopTracker, check_token_ids, pick

N = 40_000          # draws per distribution check: frequencies within ~4 standard deviations of 0.0025


def draws(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """N draws from one row of logits [V] -> frequencies [V]."""
    rows = logits.expand(N, -1)
    noise = NoiseSource(sampling, torch.device("cpu")).fill(torch.empty(N, sampling.noise_width(rows.shape[-1])))
    tok = pick(rows, sampling, noise)
    assert tok.shape == (N, 1) and tok.dtype == torch.int64
    return torch.bincount(tok[:, 0], minlength=logits.shape[-1]).double() / N


LOGITS = torch.tensor([2.0, 1.5, 0.5, 0.0, -1.0, -3.0])


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_draws_follow_the_tempered_softmax(temperature):
    freq = draws(LOGITS, Sampling(temperature=temperature, seed=0))
    want = (LOGITS.double() / temperature).softmax(-1)
    assert float((freq - want).abs().max()) < 0.01, (freq, want)


def test_top_k_keeps_the_k_largest_renormalised():
    freq = draws(LOGITS, Sampling(temperature=1.0, top_k=3, seed=1))
    want = torch.cat([LOGITS[:3].double().softmax(-1), torch.zeros(3, dtype=torch.float64)])
    assert torch.all(freq[3:] == 0) and float((freq - want).abs().max()) < 0.01
    uncut = draws(LOGITS, Sampling(temperature=1.0, top_k=99, seed=1))                     # k >= V: no cut
    assert float((uncut - LOGITS.double().softmax(-1)).abs().max()) < 0.01


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    probs = torch.tensor([0.5, 0.3, 0.1, 0.06, 0.04])
    logits = probs.log()
    # mass before token 2 is 0.8: a top_p just under it stops there, just over it takes token 2 in too
    for top_p, support in ((0.79, 2), (0.81, 3), (0.49, 1), (0.51, 2), (1.0, 5)):
        freq = draws(logits, Sampling(temperature=1.0, top_p=top_p, seed=2))
        assert int((freq > 0).sum()) == support, (top_p, freq)
        want = torch.zeros(5, dtype=torch.float64)
        want[:support] = probs[:support].double() / probs[:support].sum()
        assert float((freq - want).abs().max()) < 0.01, (top_p, freq, want)


def test_top_k_and_top_p_together_and_per_row():
    """The cuts apply per row: each row of a batch keeps its own nucleus."""
    logits = torch.stack([LOGITS, LOGITS.flip(0)])                        # [2, V]: the second row prefers token 5
    s = Sampling(temperature=1.0, top_k=2, top_p=0.5, seed=3)
    tok = pick(logits, s, NoiseSource(s, torch.device("cpu")).fill(torch.empty(2, 2)))
    assert tok.tolist() == [[0], [5]]          # softmax of the top 2 gives the first 0.62: the nucleus is one token


def test_greedy_and_top_k_1_are_argmax():
    logits = torch.randn(64, 300, generator=torch.Generator().manual_seed(0))
    want = logits.argmax(-1, keepdim=True)
    assert torch.equal(pick(logits, GREEDY), want)
    s = Sampling(temperature=1.0, top_k=1, seed=4)
    assert torch.equal(pick(logits, s, NoiseSource(s, torch.device("cpu")).fill(torch.empty(64, 1))), want)
    assert torch.equal(pick(logits.bfloat16(), GREEDY), logits.bfloat16().argmax(-1, keepdim=True))


def test_noise_is_seeded_and_never_zero(monkeypatch):
    def noise(seed):
        return NoiseSource(Sampling(temperature=1.0, seed=seed), torch.device("cpu")).fill(torch.empty(4, 1000))
    assert torch.equal(noise(5), noise(5)) and not torch.equal(noise(5), noise(6))
    unseeded = Sampling(temperature=1.0)
    a = NoiseSource(unseeded, torch.device("cpu")).fill(torch.empty(4, 1000))
    b = NoiseSource(unseeded, torch.device("cpu")).fill(torch.empty(4, 1000))
    assert not torch.equal(a, b)                                           # a fresh seed per call
    monkeypatch.setattr(torch.Tensor, "uniform_", lambda self, generator=None: self.fill_(1.0))   # -log(1) = 0
    z = NoiseSource(unseeded, torch.device("cpu")).fill(torch.empty(2, 3))
    assert torch.all(z > 0)
    masked = torch.tensor([[0.0, -math.inf, 1.0]])                         # p / q stays finite: no NaN argmax
    assert pick(masked, Sampling(temperature=1.0), z[:1]).item() == 2


def test_stop_tracker_pads_after_the_stop():
    t = StopTracker(torch.tensor([7, 9]), pad_id=0, batch=3)
    steps = [[5, 7, 1], [9, 3, 2], [4, 8, 7], [6, 6, 6]]
    out = []
    for step in steps:
        out.append(t.update(torch.tensor(step)[:, None])[:, 0].tolist())
        if t.all_done():
            break
    assert out == [[5, 7, 1], [9, 0, 2], [0, 0, 7]]                       # each row ends at its first stop id


@pytest.mark.parametrize("kwargs,needle", [
    (dict(temperature=-0.1), "temperature must be a finite number >= 0"),
    (dict(temperature=float("nan")), "temperature must be a finite number"),
    (dict(temperature=True), "temperature must be"),
    (dict(temperature=1.0, top_k=0), "top_k must be a positive integer"),
    (dict(temperature=1.0, top_k=2.5), "top_k must be a positive integer"),
    (dict(temperature=1.0, top_p=0.0), r"top_p must be a number in \(0, 1\]"),
    (dict(temperature=1.0, top_p=1.5), r"top_p must be a number in \(0, 1\]"),
    (dict(temperature=1.0, seed=-1), "seed must be a non-negative integer"),
    (dict(top_k=5, seed=1), "top_k, seed only apply when sampling; set a temperature above 0"),
])
def test_bad_settings_are_refused(kwargs, needle):
    with pytest.raises(L4Error, match=needle):
        Sampling(**kwargs)


def test_sampling_of_and_to_dict():
    assert Sampling.of(None) is GREEDY and GREEDY.to_dict() == {}
    s = Sampling.of({"temperature": 0.7, "top_p": 0.9})
    assert s == Sampling(temperature=0.7, top_p=0.9) and s.to_dict() == {"temperature": 0.7, "top_p": 0.9}
    with pytest.raises(L4Error, match="unknown sampling field 'top_n'"):
        Sampling.of({"temperature": 1, "top_n": 3})
    with pytest.raises(L4Error, match="sampling takes a Sampling, a dict or None, got float"):
        Sampling.of(0.7)


def test_check_token_ids():
    assert check_token_ids([1, torch.tensor(2), 3], 10, "stop_ids") == [1, 2, 3]
    with pytest.raises(L4Error, match=r"stop_ids: token id 10 is outside the vocabulary \[0, 10\)"):
        check_token_ids([10], 10, "stop_ids")
    with pytest.raises(L4Error, match="stop_ids: '7' is not an integer token id"):
        check_token_ids(["7"], 10, "stop_ids")
    with pytest.raises(L4Error, match="stop_ids must be a list of token ids, got int"):
        check_token_ids(7, 10, "stop_ids")
