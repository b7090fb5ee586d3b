"""The engine directory and its runtime.

Layout: ``manifest.json`` (format version, backend, model config, quant, dtype, device, passes with stats,
signature, limits, sha256 of every artifact, library versions, compile seconds) plus the backend's
artifacts. An engine is built in a hidden sibling directory and renamed into place only when complete (the
manifest is written last), so a killed compile never leaves anything that looks like an engine. Loading
verifies every checksum before any artifact is opened.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator, Mapping, NamedTuple, Sequence

import torch

from l4compile.config import DECODE_MODES
from l4compile.errors import L4Error
from l4compile.paths import check_dir_path
from l4compile.sampling import NoiseSource, Sampling, StopTracker, check_token_ids, pick
from l4compile.weights import normalize

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_TMP_TAG = ".l4tmp-"
_OLD_TAG = ".l4old-"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_out_dir(out: Path, force: bool) -> None:
    """Refuse an existing ``out`` unless ``force``; never touch it here."""
    check_dir_path(out, "--out")
    if out.exists() and not force:
        raise L4Error(f"output directory {out} already exists; pass --force to replace it")


def _clean_stale(out: Path) -> None:
    """Remove half-written siblings of ``out`` left by compiles that were killed."""
    for p in out.parent.glob(f".{out.name}{_TMP_TAG}*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def engine_writer(out: Path, force: bool) -> Iterator[Path]:
    """Yield a scratch directory; on success it becomes ``out`` atomically (replacing it if ``force``)."""
    out = out.resolve()
    check_out_dir(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(out)
    tmp = out.parent / f".{out.name}{_TMP_TAG}{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if not (tmp / MANIFEST).is_file():
            raise RuntimeError("engine writer finished without a manifest")
        if out.exists():
            check_out_dir(out, force)
            old = out.parent / f".{out.name}{_OLD_TAG}{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_manifest(engine_dir: Path, manifest: dict[str, Any], artifacts: Sequence[str],
                   digests: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Checksum ``artifacts`` (paths relative to ``engine_dir``) and write the manifest last. ``digests``: the sha256
    of artifacts hashed as they were written (``tensorfile.write(hasher=)``), taken as they are."""
    digests = digests or {}
    manifest = dict(manifest, format_version=FORMAT_VERSION,
                    artifacts={a: {"sha256": digests.get(a) or sha256_file(engine_dir / a),
                                   "bytes": (engine_dir / a).stat().st_size} for a in artifacts})
    tmp = engine_dir / (MANIFEST + ".part")
    with tmp.open("w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, engine_dir / MANIFEST)
    return manifest


def read_manifest(path: Path) -> dict[str, Any]:
    mf = path / MANIFEST
    if not path.is_dir() or not mf.is_file():
        raise L4Error(f"'{path}' is not an l4compile engine (no {MANIFEST}); build one with `l4compile compile`")
    try:
        manifest = json.loads(mf.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise L4Error(f"engine manifest {mf} is corrupt ({e}); recompile the engine") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        got = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise L4Error(f"engine {path} has format version {got!r}; this l4compile reads version {FORMAT_VERSION}: "
                      "recompile the engine")
    for key in ("backend", "artifacts", "model_config", "max_seq_len", "max_batch_size", "dtype", "device"):
        if key not in manifest:
            raise L4Error(f"engine manifest {mf} lacks '{key}'; recompile the engine")
    return manifest


def verify_artifacts(path: Path, manifest: dict[str, Any], only: Sequence[str] | None = None) -> None:
    """Every artifact's (or ``only`` those) size and sha256 against the manifest; L4Error on the first mismatch."""
    for rel, info in manifest["artifacts"].items():
        if only is not None and rel not in only:
            continue
        f = path / rel
        if not f.is_file():
            raise L4Error(f"engine artifact '{rel}' is missing from {path}; recompile the engine")
        if sha256_file(f) != info.get("sha256"):
            raise L4Error(f"engine artifact '{rel}' does not match its checksum in {MANIFEST}: the engine was "
                          "modified or corrupted; recompile it")


class PreparedPrompt(NamedTuple):
    """An image prompt after layout and vision encoding (``Engine.prepare_prompt``)."""

    ids: torch.Tensor               # [1, S'] with each image's token block
    image_embeds: torch.Tensor      # [1, S', H], image features at the <|patch|> positions
    image_mask: torch.Tensor        # [1, S'] bool


class Engine:
    """A loaded engine. ``prefill`` and ``generate`` validate their inputs against the engine's limits."""

    def __init__(self, path: Path, manifest: dict[str, Any], runner: Any, vision_runner: Any = None):
        self.path = path
        self.manifest = manifest
        self._runner = runner
        self.runtime: str | None = getattr(runner, "runtime", None)   # what runs the step (Inductor: aoti | jit)
        self._vision = vision_runner         # pixel_values [T, 3, S, S] -> image features [T, P, H] (multimodal)
        self.vocab_size = int(manifest["model_config"]["vocab_size"])
        self.max_seq_len = int(manifest["max_seq_len"])
        self.max_batch_size = int(manifest["max_batch_size"])
        self.device = torch.device(manifest["device"])
        self.load_seconds = 0.0
        self._decode_mode = "loop"
        self._decoders: dict[tuple[str, int, Sampling], Any] = {}   # (decode mode, batch, sampling) -> StaticDecoder
        self._graph_pool = None
        self.cuda_graph_error: str | None = None    # why capture failed, if it did (generate then uses "loop")
        self._tokenizer = None

    def __repr__(self) -> str:
        m = self.manifest
        return f"Engine({str(self.path)!r}, backend={m['backend']}, dtype={m['dtype']}, quant={m.get('quant')})"

    def check_input_ids(self, input_ids: Any) -> torch.Tensor:
        """LongTensor [B, S] (or [S], or a list) -> validated LongTensor [B, S] on the engine's device."""
        ids = torch.as_tensor(input_ids)
        if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
            raise L4Error(f"token ids must be integers, got {ids.dtype}")
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise L4Error(f"token ids must have shape [batch, seq] with seq >= 1, got {list(ids.shape)}")
        if ids.shape[0] > self.max_batch_size:
            raise L4Error(f"batch {ids.shape[0]} exceeds the engine's max batch size {self.max_batch_size}; "
                          "recompile with a larger --max-batch-size")
        if ids.shape[1] > self.max_seq_len:
            raise L4Error(f"prompt of {ids.shape[1]} tokens exceeds the engine's max sequence length "
                          f"{self.max_seq_len}; recompile with a larger --max-seq-len")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.vocab_size:
            bad = lo if lo < 0 else hi
            raise L4Error(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        return ids.to(device=self.device, dtype=torch.int64).contiguous()   # AOTI assumes dense strides

    def check_room(self, prompt_len: int, max_new_tokens: int) -> None:
        if prompt_len + max_new_tokens > self.max_seq_len:
            raise L4Error(f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                          f"engine's max sequence length {self.max_seq_len}")

    @property
    def decode_mode(self) -> str:
        return self._decode_mode

    @decode_mode.setter
    def decode_mode(self, mode: str) -> None:
        if mode not in DECODE_MODES:
            raise L4Error(f"unknown decode mode {mode!r}; choose one of: {', '.join(DECODE_MODES)}")
        if mode != "loop" and self.kv_cache is None:
            raise L4Error(f"decode mode '{mode}' needs an engine with a KV cache (this one was compiled with "
                          "--skip-pass kv_cache)")
        if mode != "loop" and self.manifest.get("sharding"):
            raise L4Error(f"decode mode '{mode}' is for single-process engines; sharded engines decode with 'loop'")
        if mode == "graph" and self.device.type != "cuda":
            raise L4Error(f"decode mode 'graph' captures CUDA graphs and engine {self.path} runs on "
                          f"{self.device.type}; use 'static' for the same steps without capture")
        self._decode_mode = mode

    def _decoder(self, batch: int, sampling: Sampling):
        """The StaticDecoder for ``batch`` and ``sampling``'s way of picking tokens (built, and captured in "graph"
        mode, on first use; the seed is not part of it); None when capture failed, which also switches this engine
        to "loop" and records why in ``cuda_graph_error``."""
        from l4compile.decode_graph import StaticDecoder

        sampling = dataclasses.replace(sampling, seed=None)
        key = (self._decode_mode, batch, sampling)
        dec = self._decoders.get(key)
        if dec is not None:
            return dec
        image = self._no_image(torch.empty(batch, 1)) if self.multimodal else None   # decode steps: no image

        def step(tok: torch.Tensor, pos: torch.Tensor, *caches: torch.Tensor):
            return self._runner(*self._text_inputs(tok, image), pos, *caches)

        dec = StaticDecoder(step, batch, self.new_caches(batch), sampling, self.vocab_size)
        if self._decode_mode == "graph":
            try:
                if self._graph_pool is None:
                    self._graph_pool = torch.cuda.graph_pool_handle()
                dec.capture(self._graph_pool)
            except Exception as e:   # capture refused (an op that syncs with the host, the runtime's threads...)
                self.cuda_graph_error = (f"{type(e).__name__}: {e}".splitlines() or [""])[0][:300]
                warnings.warn(f"CUDA graph capture failed ({self.cuda_graph_error}); decoding without graphs")
                self._decode_mode = "loop"
                return None
        self._decoders[key] = dec
        return dec

    def prepare_decode(self, batch: int, sampling: "Sampling | dict | None" = None) -> None:
        """Build (and in "graph" mode capture) the decoder ``generate`` uses for ``batch`` sequences (and the same
        ``sampling``, seed aside) now rather than in the first generate; a no-op in "loop" mode."""
        if self._decode_mode != "loop":
            self._decoder(batch, Sampling.of(sampling))

    @property
    def tokenizer(self):
        """The checkpoint's tokenizer (``l4compile.tokenizer.EngineTokenizer``: encode / decode / chat); L4Error for
        an engine without one (presets, or a checkpoint that had no tokenizer.json)."""
        if self._tokenizer is None:
            from l4compile.tokenizer import EngineTokenizer
            self._tokenizer = EngineTokenizer.of_engine(self.path, self.manifest)
        return self._tokenizer

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """The ids a sequence ends at, from the checkpoint's generation config (empty for presets)."""
        return tuple(self._generation.get("eos_token_ids") or ())

    @property
    def _generation(self) -> dict[str, Any]:
        return self.manifest.get("generation") or {}      # engines compiled before it was recorded have none

    @property
    def multimodal(self) -> bool:
        """The engine has a vision engine and its text graph takes image_embeds / image_mask."""
        return bool(self.manifest.get("vision"))

    def _image_setup(self):
        from l4compile.vision import ImageSpec, ImageTokens

        v = self.manifest.get("vision")
        if not v:
            raise L4Error(f"engine {self.path} has no vision engine (compile a multimodal checkpoint or preset, "
                          "without --text-only, to prompt with images)")
        return ImageSpec.from_dict(v["image"]), ImageTokens.from_dict(v["tokens"])

    @torch.no_grad()
    def prepare_prompt(self, input_ids: Any, images: Sequence[Any]) -> "PreparedPrompt":
        """Token ids with ``<|image|>`` placeholders + images -> (ids [1, S'] with each image's token block,
        image_embeds [1, S', H], image_mask [1, S']). Runs the vision engine once per image; pass the result as
        ``images=`` to prefill / generate to reuse it (their ``input_ids`` are then ignored)."""
        from l4compile.vision import expand_prompt, place_features, preprocess

        spec, tokens = self._image_setup()
        ids = self.check_input_ids(input_ids)
        if ids.shape[0] != 1:
            raise L4Error(f"image prompts take batch 1 (got {ids.shape[0]} sequences): image blocks make prompts "
                          "of different lengths")
        if len(images) == 0:
            raise L4Error("images is empty; pass at least one image or none at all")
        processed = [preprocess(img, spec) for img in images]
        full = torch.tensor([expand_prompt(ids[0].tolist(), [p.aspect_ratio for p in processed],
                                           spec.tokens_per_tile, tokens)], dtype=torch.int64)
        full = self.check_input_ids(full)
        dtype = getattr(torch, self.manifest["dtype"])
        feats = []
        for p in processed:
            out = self._vision(p.pixel_values.to(device=self.device, dtype=dtype).contiguous())
            feats.append(out.reshape(-1, out.shape[-1]))
        embeds, mask = place_features(full, torch.cat(feats), tokens.patch)
        return PreparedPrompt(full, embeds, mask)

    def _no_image(self, ids: torch.Tensor):
        hidden = int(self.manifest["model_config"]["hidden_size"])
        dtype = getattr(torch, self.manifest["dtype"])
        return (torch.zeros(*ids.shape, hidden, dtype=dtype, device=self.device),
                torch.zeros(ids.shape, dtype=torch.bool, device=self.device))

    def _text_inputs(self, ids: torch.Tensor, image: tuple | None) -> tuple:
        """The graph's leading inputs: (ids,) or, for multimodal engines, (ids, image_embeds, image_mask)."""
        if not self.multimodal:
            return (ids,)
        embeds, mask = image if image is not None else self._no_image(ids)
        return ids, embeds.contiguous(), mask.contiguous()

    def _prompt(self, input_ids: Any, images: "Sequence[Any] | PreparedPrompt | None"):
        if images is None:
            return self.check_input_ids(input_ids), None
        if not isinstance(images, PreparedPrompt):
            images = self.prepare_prompt(input_ids, images)
        return images.ids, (images.image_embeds, images.image_mask)

    @property
    def kv_cache(self) -> dict | None:
        """The cache layout (per-layer slots, dtype, bytes per token), or None for a cacheless engine."""
        return self.manifest.get("kv_cache")

    def cache_specs(self, batch: int) -> list[tuple[tuple[int, ...], torch.dtype]]:
        """(shape, dtype) of each cache ``new_caches(batch)`` makes: [k_0, v_0, k_1, v_1, ...], [B, Hkv, slots, D]."""
        layout = self.kv_cache
        if layout is None:
            raise L4Error(f"engine {self.path} has no KV cache (it was compiled with --skip-pass kv_cache)")
        _, n_kv, _, head_dim = layout["shape"]
        dtype = getattr(torch, layout["dtype"])
        return [((batch, n_kv, layer["slots"], head_dim), dtype) for layer in layout["layers"] for _ in (0, 1)]

    def new_caches(self, batch: int) -> list[torch.Tensor]:
        """Zeroed caches for ``batch`` sequences: [k_0, v_0, k_1, v_1, ...], each [B, Hkv, slots, D]."""
        return [torch.zeros(shape, dtype=dtype, device=self.device) for shape, dtype in self.cache_specs(batch)]

    def _step(self, ids: torch.Tensor, start: int, caches: list[torch.Tensor], image: tuple | None = None):
        start_pos = torch.tensor([start], dtype=torch.int64, device=self.device)
        out = self._runner(*self._text_inputs(ids, image), start_pos, *(c.contiguous() for c in caches))
        return out[0], list(out[1:])

    @torch.no_grad()
    def prefill(self, input_ids: Any, images: Sequence[Any] | None = None) -> torch.Tensor:
        """LongTensor [B, S] -> logits [B, S, V] in the engine's dtype. With ``images`` (multimodal engines,
        batch 1) each ``<|image|>`` placeholder is first expanded to its image's token block (``prepare_prompt``),
        so the logits cover the expanded prompt."""
        ids, image = self._prompt(input_ids, images)
        if self.kv_cache is None:
            return self._runner(*self._text_inputs(ids, image))
        return self._step(ids, 0, self.new_caches(ids.shape[0]), image)[0]

    @torch.no_grad()
    def prefill_with_cache(self, input_ids: Any, images: Sequence[Any] | None = None
                           ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """LongTensor [B, S] -> (logits [B, S, V], caches after the prompt); ``images`` as in ``prefill``."""
        ids, image = self._prompt(input_ids, images)
        return self._step(ids, 0, self.new_caches(ids.shape[0]), image)

    @torch.no_grad()
    def decode(self, tokens: Any, start_pos: int, caches: list[torch.Tensor]) -> tuple[torch.Tensor, list]:
        """One step: tokens [B, T] at absolute positions start_pos.. -> (logits [B, T, V], updated caches).
        Use the caches it returns: Inductor engines update the (contiguous) caches they are given in place and
        return those tensors, other backends return new ones."""
        ids = self.check_input_ids(tokens)
        if start_pos < 0 or start_pos + ids.shape[1] > self.max_seq_len:
            raise L4Error(f"positions {start_pos}..{start_pos + ids.shape[1] - 1} fall outside the engine's max "
                          f"sequence length {self.max_seq_len}")
        self.check_caches(caches, ids.shape[0])
        return self._step(ids, start_pos, caches)

    def check_caches(self, caches: Sequence[torch.Tensor], batch: int) -> None:
        """L4Error unless ``caches`` is the layout ``new_caches(batch)`` makes (count, shape, dtype, device): a
        cache of the wrong shape would be read, and on Inductor engines written, out of its bounds."""
        want = self.cache_specs(batch)
        device = normalize(self.device)      # "cuda" is cuda:<current>; a CUDA tensor always names its index
        if not isinstance(caches, (list, tuple)) or len(caches) != len(want):
            got = len(caches) if isinstance(caches, (list, tuple)) else type(caches).__name__
            raise L4Error(f"caches must be a list of {len(want)} tensors (k and v per layer), got {got}")
        for i, (c, (shape, dtype)) in enumerate(zip(caches, want)):
            name = f"{'kv'[i % 2]}_cache_{i // 2}"
            if not isinstance(c, torch.Tensor):
                raise L4Error(f"{name} must be a tensor, got {type(c).__name__}")
            if tuple(c.shape) != shape or c.dtype != dtype or c.device != device:
                raise L4Error(f"{name} is {list(c.shape)} {str(c.dtype).removeprefix('torch.')} on {c.device}; this "
                              f"engine takes {list(shape)} {str(dtype).removeprefix('torch.')} on {device} "
                              f"(batch {batch}: use the caches prefill_with_cache returns)")

    @torch.no_grad()
    def generate(self, input_ids: Any, max_new_tokens: int = 32, images: Sequence[Any] | None = None, *,
                 sampling: "Sampling | dict | None" = None, stop_ids: Sequence[int] | None = None) -> torch.Tensor:
        """LongTensor [B, S] -> LongTensor [B, S + n]: greedy (``sampling`` None), or sampled (``Sampling`` or a dict
        of its fields: temperature, top_k, top_p, seed).

        n = ``max_new_tokens``, unless ``stop_ids`` is given (e.g. ``eng.eos_ids``): a sequence then ends at its first
        token among them, later positions hold the engine's pad id (else that stop token), and generation ends early
        when every sequence has ended. With a KV cache (the default) the prompt is prefilled once and each new token
        is one decode step; engines compiled with ``--skip-pass kv_cache`` recompute the whole prefix at every step
        instead. With ``images`` the returned prompt part is the expanded one (see ``prefill``)."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise L4Error(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
        sampling = Sampling.of(sampling)
        stops = None if stop_ids is None else check_token_ids(stop_ids, self.vocab_size, "stop_ids")
        ids, image = self._prompt(input_ids, images)
        self.check_room(ids.shape[1], max_new_tokens)
        if max_new_tokens == 0:
            return ids
        batch, start = ids.shape
        noise = None if sampling.greedy else NoiseSource(sampling, self.device)
        buf = None if noise is None else torch.empty(batch, sampling.noise_width(self.vocab_size),
                                                     dtype=torch.float32, device=self.device)     # [B, W]
        tracker = None
        if stops:
            pad_id = self._generation.get("pad_token_id")
            tracker = StopTracker(torch.tensor(stops, device=self.device),
                                  stops[0] if pad_id is None else pad_id, batch)

        def next_token(logits: torch.Tensor) -> torch.Tensor:       # logits [B, V] -> [B, 1]
            return pick(logits, sampling, None if noise is None else noise.fill(buf))

        def emit(tok: torch.Tensor) -> bool:                         # -> generation is over
            out.append(tok if tracker is None else tracker.update(tok))
            return len(out) > max_new_tokens or (tracker is not None and tracker.all_done())

        out = [ids]
        if self.kv_cache is None:
            while True:
                seq = torch.cat(out, dim=1)
                if image is not None:   # recompute: the image features stay at their positions
                    pad = seq.shape[1] - image[1].shape[1]
                    pad_ = torch.nn.functional.pad
                    image = (pad_(image[0], (0, 0, 0, pad)), pad_(image[1], (0, pad)))
                logits = self._runner(*self._text_inputs(seq, image))
                if emit(next_token(logits[:, -1])):
                    return torch.cat(out, dim=1)
        logits, caches = self._step(ids, 0, self.new_caches(batch), image)
        first = next_token(logits[:, -1])
        if emit(first):
            return torch.cat(out, dim=1)
        dec = self._decoder(batch, sampling) if self._decode_mode != "loop" else None
        if dec is not None:        # static buffers (replayed as a CUDA graph in "graph" mode)
            dec.start(first, start, caches)
            del logits, caches
            while True:
                if noise is not None:
                    noise.fill(dec.noise)        # outside the graph: the step itself holds no RNG state
                if emit(dec.advance().clone()):
                    return torch.cat(out, dim=1)
        tok = first
        for i in range(max_new_tokens - 1):
            logits, caches = self._step(tok, start + i, caches)
            tok = next_token(logits[:, -1])
            if emit(tok):
                break
        return torch.cat(out, dim=1)


def check_process_group(path: Path, manifest: dict[str, Any]) -> int:
    """A sharded engine (compile --plan) runs one rank per process: -> this process's rank, or L4Error."""
    world = int(manifest["sharding"]["world_size"])
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise L4Error(f"engine {path} is sharded over {world} ranks and needs one process per "
                      f"rank: run `l4compile run {path} --nproc {world} --prompt-ids ...` or `torchrun "
                      f"--nproc-per-node {world} -m l4compile.dist {path} --prompt-ids ...`")
    if dist.get_world_size() != world:
        raise L4Error(f"engine {path} is sharded over {world} ranks; this process group has "
                      f"{dist.get_world_size()} (use --nproc {world})")
    return dist.get_rank()


def _unloaded_shards(path: Path, manifest: dict[str, Any]):
    def run(*inputs):
        check_process_group(path, manifest)
        raise L4Error(f"engine {path} was opened before its process group existed; load it again")
    return run


# Artifacts only a safe parser reads (safetensors: no code runs, whatever the bytes): their checksums are verified
# while the backend loads them, not before. Full Scout Int4's ~58 GB weights.safetensors takes ~35 s to hash
# (SHA-256 at ~1.7 GB/s), and the load reads and copies it all again (2 GiB on the 2-core CPU machine, copied to
# host memory: 1.95-2.08 s one after the other, 1.54-1.63 s together). Code (an AOTInductor .so, an exported
# program, a TensorRT plan, ONNX graphs) is verified before anything loads it.
_DATA_SUFFIX = ".safetensors"


def load_engine(path: str | os.PathLike, *, defer_shards: bool = False, decode_mode: str | None = None) -> Engine:
    """Open an engine directory: read the manifest, verify every checksum, load the backend's runtime (weights files
    are verified while they load, and the engine is returned only when they match).
    A sharded engine loads this process's rank (torch.distributed must be initialised); with
    ``defer_shards`` and no process group it opens without a runtime (running it raises the L4Error).
    ``decode_mode`` (``DECODE_MODES``): default "graph" for single-process Inductor engines on CUDA with a KV cache
    (AOTInductor's single-threaded runner is capturable), else "loop"."""
    from l4compile.backends import get_backend

    p = Path(path)
    manifest = read_manifest(p)
    data = [rel for rel in manifest["artifacts"] if rel.endswith(_DATA_SUFFIX)]
    verify_artifacts(p, manifest, [rel for rel in manifest["artifacts"] if rel not in data])
    if manifest.get("sharding"):
        import torch.distributed as dist
        if defer_shards and not (dist.is_available() and dist.is_initialized()):
            verify_artifacts(p, manifest, data)
            return Engine(p, manifest, _unloaded_shards(p, manifest))
        check_process_group(p, manifest)
    backend = get_backend(manifest["backend"])
    t0 = time.perf_counter()
    with ThreadPoolExecutor(1, thread_name_prefix="l4-verify") as pool:
        checked = pool.submit(verify_artifacts, p, manifest, data)      # hashed while the backend reads them
        try:
            runner = backend.load(p, manifest)
            vision_runner = None
            if manifest.get("vision"):   # the vision engine: same backend, artifacts under vision/, own backend_info
                vision_runner = backend.load(p / "vision", dict(manifest, sharding=None,
                                                                backend_info=manifest["vision"]["backend_info"]))
        except Exception:
            checked.result()             # a corrupt weights file is the error to report, not what it made fail
            raise
        checked.result()
    eng = Engine(p, manifest, runner, vision_runner)
    eng.load_seconds = time.perf_counter() - t0
    if decode_mode is None:
        graphs = (manifest["backend"] == "inductor" and eng.device.type == "cuda" and eng.kv_cache is not None
                  and not manifest.get("sharding"))
        decode_mode = "graph" if graphs else "loop"
    eng.decode_mode = decode_mode
    return eng
