# B batch, V vocab, W sampling candidates, L cache slots, Hkv kv heads, D head_dim
"""Decode from static buffers, replayed as one CUDA graph per batch size.

Why: at batch 1 a decode step of full Scout is about a thousand small kernels. Launched one at a time from the
host (AOTInductor launches each from C++, a few microseconds apiece), the launches rather than HBM bound the step:
48 layers x ~20 launches x ~4 us is ~4 ms, the whole budget of 250 tokens/s. A CUDA graph replays every launch
of a step with one call.

Contract. ``StaticDecoder(step, batch, caches, sampling, vocab)`` owns static buffers

    tok    [B, 1] int64          the last token of every sequence
    pos    [1] int64             its absolute position
    caches [B, Hkv, L_i, D] x 2 per layer, the engine's layout: the ``caches`` it is given, which it owns from then on
    noise  [B, W] float32        sampling decoders only: the Exp(1) draws ``pick`` races (W = sampling.noise_width(V))

and one step: ``logits, *new = step(tok, pos, *caches)``; ``caches <- new`` (nothing to copy where the step
updated ``caches`` in place and returned them, as Inductor engines do); ``tok <- pick(logits[:, -1])``: argmax, or
with a sampling decoder the draw ``noise`` selects (the caller refills ``noise`` before each ``advance()``, outside
the graph); ``pos += 1``. ``start(tok, pos, caches)`` loads a sequence after its prefill, ``advance()`` runs one step
and leaves the new token in ``tok``: a graph replay after ``capture()`` (CUDA only), the same step run eagerly
otherwise (``Engine.decode_mode == "static"``, which is how the CPU tests check it). A captured graph reads and
writes the static buffers at fixed addresses; a functional step's outputs live in the graph's memory pool and are
copied into the static caches inside the graph. Not thread-safe: one sequence batch at a time per decoder.

AOTInductor packages must be loaded with ``run_single_threaded=True`` for capture: the default runner's
cross-thread bookkeeping is not permitted while a stream is capturing (pytorch/pytorch#148601).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from l4compile.sampling import GREEDY, Sampling, pick

Step = Callable[..., Sequence[Tensor]]      # (tok [B, 1], pos [1], *caches) -> (logits [B, 1, V], *caches')


class StaticDecoder:
    def __init__(self, step: Step, batch: int, caches: Sequence[Tensor], sampling: Sampling = GREEDY,
                 vocab: int | None = None):
        device = caches[0].device
        self.step = step
        self.sampling = sampling
        self.tok = torch.zeros(batch, 1, dtype=torch.int64, device=device)          # [B, 1]
        self.pos = torch.zeros(1, dtype=torch.int64, device=device)                 # [1]
        self.caches = list(caches)
        self.noise = (None if sampling.greedy else
                      torch.ones(batch, sampling.noise_width(vocab), dtype=torch.float32, device=device))
        self.graph: torch.cuda.CUDAGraph | None = None

    def _body(self) -> None:
        logits, *new = self.step(self.tok, self.pos, *self.caches)
        for static, fresh in zip(self.caches, new, strict=True):
            if fresh is not static:          # Inductor engines write the step into the caches they are given
                static.copy_(fresh)
        self.tok.copy_(pick(logits[:, -1], self.sampling, self.noise))
        self.pos.add_(1)

    def capture(self, pool=None) -> None:
        """Record one step as a CUDA graph (``pool``: a ``torch.cuda.graph_pool_handle()`` to share between the
        decoders of one engine; they never run at once and keep no outputs in it). Two eager warm-up steps on a
        side stream first, so lazy initialisation (kernel loads, library handles) stays out of the capture. The
        static buffers' contents are scratch until ``start``."""
        torch.cuda.synchronize()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._body()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            self._body()
        self.graph = graph

    def start(self, tok: Tensor, pos: int, caches: Sequence[Tensor]) -> None:
        """Load a sequence: ``tok`` [B, 1], the position ``pos`` of that token, the caches that hold 0..pos-1."""
        self.tok.copy_(tok)
        self.pos.fill_(pos)
        for static, c in zip(self.caches, caches, strict=True):
            static.copy_(c)

    def advance(self) -> Tensor:
        """One step; returns the static ``tok`` [B, 1] (clone it to keep it past the next step)."""
        if self.graph is not None:
            self.graph.replay()
        else:
            self._body()
        return self.tok
