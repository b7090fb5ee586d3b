"""Tracing: a transformers Llama 4 causal LM -> ``Program`` (an FX graph plus the metadata passes need).

The harness computes the attention masks itself, from positions (chunked-causal for RoPE layers, full causal
for NoPE layers), and hands them to transformers as a prepared mask dict. transformers' own mask builders
branch on batch == 1 and on cache state, which pins dynamic dimensions; explicit masks let one graph serve
every batch in [1, max_batch] and every length in [1, max_seq_len].

Graph form handed to passes (``Program.gm``): an *unlifted* ``torch.fx.GraphModule`` (``ExportedProgram.module()``)
whose weights are ``get_attr`` nodes with targets ``lm.<transformers parameter name>`` and whose call nodes
carry ``nn_module_stack`` metadata naming the transformers module they came from. One input ``input_ids``
[B, S] int64, one output ``logits`` [B, S, V]. The text program of a multimodal model has two more inputs,
``image_embeds`` [B, S, H] and ``image_mask`` [B, S] bool: where the mask is set, the projected image feature
replaces the token embedding (``MultimodalLMHarness``). The vision tower is its own program (``kind="vision"``,
``l4compile.vision.program``).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch.export import Dim

from l4compile.errors import L4Error

PARAM_PREFIX = "lm."  # get_attr targets are PARAM_PREFIX + transformers parameter name


class CausalLMHarness(torch.nn.Module):
    """input_ids [B, S] -> logits [B, S, V], with explicit position-derived masks and no cache."""

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm
        self.chunk = int(lm.config.attention_chunk_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._logits(input_ids.shape, input_ids=input_ids)

    def _logits(self, shape: torch.Size, **inputs: torch.Tensor) -> torch.Tensor:
        """Run the LM on ``input_ids`` or ``inputs_embeds`` of ``shape`` [B, S, ...] with explicit masks."""
        b, s = shape[0], shape[1]
        device = next(iter(inputs.values())).device
        pos = torch.arange(s, device=device)                      # [S]
        q, k = pos[:, None], pos[None, :]
        causal = k <= q                                           # [S, S] bool, True = visible
        chunked = causal & ((k // self.chunk) == (q // self.chunk))
        masks = {"full_attention": causal[None, None], "chunked_attention": chunked[None, None]}
        out = self.lm(**inputs, attention_mask=masks, position_ids=pos[None].expand(b, s), use_cache=False)
        return out.logits


class MultimodalLMHarness(CausalLMHarness):
    """(input_ids [B, S], image_embeds [B, S, H], image_mask [B, S] bool) -> logits [B, S, V].

    The placement of image features is split between runtime and graph: the runtime scatters the vision
    engine's feature rows to the image-patch positions (a data-dependent count, so it stays out of the graph),
    and the graph selects ``where(image_mask, image_embeds, embed(input_ids))``: static shapes, one graph for
    prompts with and without images, and decode steps pass an all-false mask."""

    def forward(self, input_ids: torch.Tensor, image_embeds: torch.Tensor,   # type: ignore[override]
                image_mask: torch.Tensor) -> torch.Tensor:
        embeds = self.lm.get_input_embeddings()(input_ids)                  # [B, S, H]
        embeds = torch.where(image_mask[..., None], image_embeds.to(embeds.dtype), embeds)
        return self._logits(input_ids.shape, inputs_embeds=embeds)


@contextlib.contextmanager
def size_oblivious():
    """Let export keep dimensions whose range starts at 1 symbolic (no 0/1 specialisation)."""
    with torch.fx.experimental._config.patch(backed_size_oblivious=True):
        yield


def dynamic_shapes(max_batch: int, max_seq: int) -> tuple:
    # The upper bounds sit above the engine's limits (which the runtime enforces): export specialises a
    # dimension whose example value equals its declared maximum.
    batch = Dim("batch", min=1, max=max_batch + 2)
    seq = Dim("seq", min=1, max=max_seq + 2)
    return ({0: batch, 1: seq},)


def example_inputs(vocab: int, max_seq: int, device: str = "cpu", image_hidden: int | None = None,
                   dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    """A [2, min(max_seq, 16)] sample: not 0/1 in either dynamic dimension (export would specialise on it).
    With ``image_hidden``: also image_embeds [2, S, H] and an image_mask with some positions set."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, max(2, min(max_seq, 16))), generator=g).to(device)
    if image_hidden is None:
        return (ids,)
    embeds = torch.randn(*ids.shape, image_hidden, generator=g).to(device=device, dtype=dtype)
    mask = torch.zeros(ids.shape, dtype=torch.bool, device=device)
    mask[:, 1:3] = True
    return ids, embeds, mask


@dataclass
class Program:
    """The unit passes transform and backends emit."""

    gm: torch.fx.GraphModule
    model_config: Any                                # transformers Llama4TextConfig
    example_inputs: tuple
    max_batch: int
    max_seq: int
    metadata: dict = field(default_factory=dict)     # source, param provenance, signature, ...
    kind: str = "text"                               # "text" | "vision" (selects passes; see pipeline)
    shapes: tuple | None = None                      # dynamic shapes of non-text programs
    weights: Any = None                              # --stream-weights: WeightSource of the gm's META weights

    def place(self, device: str) -> int:
        """Make the graph runnable on ``device`` once the passes are done: meta weights are loaded from
        ``weights`` (then None), tensors elsewhere (e.g. RoPE tables a pass built on the CPU) are moved, device
        arguments traced on meta are re-pointed, and the example inputs follow. Returns the bytes loaded."""
        from l4compile.weights import StateDictWeights, materialize_module, retarget_devices

        loaded = materialize_module(self.gm, self.weights or StateDictWeights({}), device, prefix=PARAM_PREFIX)
        retarget_devices(self.gm, device)
        for shard in self.gm.meta.get("l4_shards") or ():          # compile --plan: one graph per rank
            materialize_module(shard, StateDictWeights({}), device)
            retarget_devices(shard, device)
        if any(t.is_meta for t in self.example_inputs):
            if self.kind != "text" or len(self.example_inputs) != 1:
                raise L4Error("only text-only programs can be traced on meta and placed later")
            self.example_inputs = example_inputs(self.model_config.vocab_size, self.max_seq, device)
        self.example_inputs = tuple(t.to(device) for t in self.example_inputs)
        self.weights = None
        return loaded

    @property
    def kv_layout(self) -> dict | None:
        """The KV-cache layout once the kv_cache pass has run (the graph is then a prefill/decode step)."""
        return self.gm.meta.get("l4_kv_cache")

    def call_inputs(self) -> tuple[tuple, tuple]:
        """(example inputs, dynamic shapes) for the graph's current signature."""
        if self.kind != "text":
            return self.example_inputs, self.shapes
        layout = self.kv_layout
        dims = dynamic_shapes(self.max_batch, self.max_seq)[0]
        text_shapes = (dims,) * len(self.example_inputs)      # ids [, image_embeds, image_mask]: batch, seq
        if layout is None:
            return self.example_inputs, text_shapes
        ids = self.example_inputs[0]
        _, n_kv, _, head_dim = layout["shape"]
        dtype = getattr(torch, layout["dtype"])
        caches = [torch.zeros(ids.shape[0], n_kv, layer["slots"], head_dim, dtype=dtype, device=ids.device)
                  for layer in layout["layers"] for _ in (0, 1)]
        start = torch.zeros(1, dtype=torch.int64, device=ids.device)
        return (*self.example_inputs, start, *caches), (*text_shapes, None, *({0: dims[0]} for _ in caches))

    def run_example(self) -> torch.Tensor:
        """Run the graph on its example inputs -> logits (for verify mode)."""
        inputs, _ = self.call_inputs()
        out = self.gm(*inputs)
        return out[0] if isinstance(out, (tuple, list)) else out

    def export(self) -> torch.export.ExportedProgram:
        """Re-export the (pass-rewritten) graph for a backend; batch and sequence stay dynamic."""
        inputs, shapes = self.call_inputs()
        with size_oblivious():
            return torch.export.export(self.gm, inputs, dynamic_shapes=shapes, strict=False)

    def param_provenance(self) -> dict[str, str]:
        """get_attr target -> transformers parameter name, for every weight the graph reads."""
        out = {}
        for n in self.gm.graph.nodes:
            if n.op == "get_attr" and str(n.target).startswith(PARAM_PREFIX):
                out[str(n.target)] = str(n.target)[len(PARAM_PREFIX):]
        return out


def trace(lm: torch.nn.Module, *, max_batch: int, max_seq: int, device: str = "cpu",
          image_inputs: bool = False) -> Program:
    """torch.export ``lm`` (a Llama4ForCausalLM in eval mode) with dynamic batch and sequence. With
    ``image_inputs`` the graph also takes image_embeds / image_mask (``MultimodalLMHarness``)."""
    dtype = next(lm.parameters()).dtype
    harness = (MultimodalLMHarness(lm) if image_inputs else CausalLMHarness(lm)).eval()
    inputs = example_inputs(lm.config.vocab_size, max_seq, device,
                            image_hidden=int(lm.config.hidden_size) if image_inputs else None, dtype=dtype)
    dims = dynamic_shapes(max_batch, max_seq)[0]
    with size_oblivious(), torch.no_grad():
        ep = torch.export.export(harness, inputs, dynamic_shapes=(dims,) * len(inputs), strict=False)
    gm = ep.module(check_guards=False)  # the engine enforces the limits; passes may run on any size
    prog = Program(gm=gm, model_config=lm.config, example_inputs=inputs, max_batch=max_batch, max_seq=max_seq)
    prog.metadata["max_seq"] = max_seq
    dname = str(dtype).replace("torch.", "")
    sig_inputs = [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]}]
    if image_inputs:
        sig_inputs += [{"name": "image_embeds", "dtype": dname, "shape": ["batch", "seq", int(lm.config.hidden_size)]},
                       {"name": "image_mask", "dtype": "bool", "shape": ["batch", "seq"]}]
    prog.metadata["signature"] = {
        "inputs": sig_inputs,
        "outputs": [{"name": "logits", "dtype": dname,
                     "shape": ["batch", "seq", int(lm.config.vocab_size)]}],
        "dynamic": {"batch": [1, max_batch], "seq": [1, max_seq]},
    }
    return prog
