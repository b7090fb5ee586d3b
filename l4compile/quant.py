# N output features, K input features, G group size, E experts
"""Quantization schemes: named presets of validated, frozen dataclasses, and the weight quantizers they use.

Schemes (``--quant``):

* ``fp8``  — W8A8: weights ``float8_e4m3fn`` with one float32 scale per output channel
  (``scale[n] = max_k |W[n, k]| / 448``); activations quantized dynamically per token to e4m3 the same way
  (on CPU the reference fake-quantizes them, then multiplies in float32).
* ``int4`` — weight-only, symmetric, one bfloat16 scale per group of ``group_size`` (128) consecutive inputs
  (``scale = max |W| / 7``, ``q = clamp(round(W / scale), -8, 7)``), two values per byte: byte
  ``k // 2`` of row n holds ``q[n, k] + 8`` in its low nibble for even k and in its high nibble for odd k.
  Where K is not a multiple of the group, the group shrinks to ``gcd(K, group_size)`` (e.g. K = 64 -> 64).

Which weights are quantized is decided by named predicates over the parameter's role
(``l4compile.plan.inventory.classify``, the same table the planner sizes memory with): attention
projections, dense MLPs, the shared expert and the routed experts are; the router, norms, embeddings and
buffers never are; the lm_head only with ``quantize_lm_head``.

Weights are quantized in nn.Linear orientation ``[..., N, K]`` (output, input); the routed experts' HF
layouts (``gate_up`` [E, H, 2I], ``down`` [E, I, H], used as ``x @ W``) are transposed first.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from l4compile.errors import L4Error

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
INT4_MAX = 7                     # symmetric: q in [-8, 7], scale = amax / 7
SCALE_EPS = 1e-12


@dataclass(frozen=True)
class QuantScheme:
    """One named scheme. ``weight``: storage of quantized weights; ``activations``: what happens to a
    quantized layer's input at run time; ``group_size`` None means one scale per output channel."""

    name: str
    weight: str                          # "fp8_e4m3" | "int4"
    activations: str                     # "fp8_e4m3_per_token" | "none"
    group_size: int | None               # None: per output channel
    scale_dtype: str                     # torch dtype name of the scales
    quantize_lm_head: bool = False

    def __post_init__(self) -> None:
        if self.weight not in ("fp8_e4m3", "int4"):
            raise L4Error(f"quant scheme '{self.name}': weight must be fp8_e4m3 or int4, got {self.weight!r}")
        if self.activations not in ("fp8_e4m3_per_token", "none"):
            raise L4Error(f"quant scheme '{self.name}': activations must be fp8_e4m3_per_token or none")
        if self.weight == "int4":
            g = self.group_size
            if isinstance(g, bool) or not isinstance(g, int) or g < 2 or g % 2:
                raise L4Error(f"quant scheme '{self.name}': int4 group_size must be an even integer >= 2, got {g!r}")
            if self.activations != "none":
                raise L4Error(f"quant scheme '{self.name}': int4 is weight-only (activations 'none')")
        elif self.group_size is not None:
            raise L4Error(f"quant scheme '{self.name}': fp8 uses per-output-channel scales (group_size None)")
        if self.scale_dtype not in ("float32", "bfloat16", "float16"):
            raise L4Error(f"quant scheme '{self.name}': scale_dtype must be float32, bfloat16 or float16")

    def with_options(self, **over) -> "QuantScheme":
        known = {f.name for f in dataclasses.fields(self)} - {"name", "weight"}
        bad = sorted(set(over) - known)
        if bad:
            raise L4Error(f"unknown quantize option(s) {', '.join(bad)}; known: {', '.join(sorted(known))}")
        return dataclasses.replace(self, **over)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SCHEMES: dict[str, QuantScheme] = {s.name: s for s in (
    QuantScheme("fp8", weight="fp8_e4m3", activations="fp8_e4m3_per_token", group_size=None, scale_dtype="float32"),
    QuantScheme("int4", weight="int4", activations="none", group_size=128, scale_dtype="bfloat16"),
)}


def get_scheme(name: str) -> QuantScheme:
    try:
        return SCHEMES[name]
    except KeyError:
        raise L4Error(f"unknown quantization scheme '{name}'; choose one of: none, {', '.join(SCHEMES)}") from None


# ---- which weights: named predicates over the parameter's role --------------------------------------------

def role_of(param_name: str) -> str:
    """transformers parameter name (``model.layers.0.self_attn.q_proj.weight``) -> role (``attn_q``)."""
    from l4compile.plan.inventory import classify

    return classify(param_name)[0]


def is_router(role: str) -> bool:
    return role == "router"


def is_norm(role: str) -> bool:
    return role == "norm"


def is_embedding(role: str) -> bool:
    return role == "embedding"


def is_lm_head(role: str) -> bool:
    return role == "lm_head"


def is_projection(role: str) -> bool:
    """Attention projections, dense MLPs, the shared expert and the routed experts."""
    return role.startswith(("attn_", "dense_", "shared_", "expert_"))


NEVER_QUANTIZED: tuple[Callable[[str], bool], ...] = (is_router, is_norm, is_embedding)


def should_quantize(role: str, scheme: QuantScheme) -> bool:
    if any(p(role) for p in NEVER_QUANTIZED):
        return False
    if is_lm_head(role):
        return scheme.quantize_lm_head
    return is_projection(role)


# ---- quantizers (plain torch; the custom ops in l4compile.ops.quant dequantize what these produce) ---------

def group_for(k: int, group_size: int) -> int:
    """The group actually used for K inputs: ``group_size`` if it divides K, else gcd(K, group_size)."""
    g = math.gcd(k, group_size)
    if g < 2 or g % 2:
        raise L4Error(f"int4: input dimension {k} has no even group <= {group_size} dividing it")
    return g


def quantize_fp8(w: Tensor, scale_dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """w [..., N, K] -> (q [..., N, K] float8_e4m3fn, scale [..., N])."""
    wf = w.float()
    scale = (wf.abs().amax(dim=-1) / FP8_MAX).clamp_min(SCALE_EPS).to(scale_dtype)     # [..., N]
    q = (wf / scale.float().unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def quantize_int4(w: Tensor, group_size: int = 128,
                  scale_dtype: torch.dtype = torch.bfloat16) -> tuple[Tensor, Tensor]:
    """w [..., N, K] -> (packed [..., N, K/2] uint8, scale [..., N, K/G])."""
    *lead, n, k = w.shape
    g = group_for(k, group_size)
    wg = w.float().reshape(*lead, n, k // g, g)                                          # [..., N, K/G, G]
    scale = (wg.abs().amax(dim=-1) / INT4_MAX).clamp_min(SCALE_EPS).to(scale_dtype)      # [..., N, K/G]
    q = torch.round(wg / scale.float().unsqueeze(-1)).clamp(-8, 7).to(torch.int16) + 8  # [..., N, K/G, G] 0..15
    q = q.reshape(*lead, n, k // 2, 2)                                                   # pairs (even, odd)
    packed = (q[..., 0] | (q[..., 1] << 4)).to(torch.uint8)                              # [..., N, K/2]
    return packed, scale


def quantize(w: Tensor, scheme: QuantScheme) -> tuple[Tensor, Tensor]:
    sd = getattr(torch, scheme.scale_dtype)
    if scheme.weight == "fp8_e4m3":
        return quantize_fp8(w, sd)
    return quantize_int4(w, scheme.group_size, sd)


def weight_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# ---- accuracy: per-layer output SQNR on calibration prompts ---------------------------------------------------

def sqnr_db(ref: Tensor, out: Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(sum ref^2 / sum (ref - out)^2)."""
    ref, out = ref.detach().double(), out.detach().double()
    noise = (ref - out).pow(2).sum().clamp_min(1e-300)
    return float(10 * torch.log10(ref.pow(2).sum() / noise))


@torch.no_grad()
def layer_sqnr(lm: torch.nn.Module, scheme: QuantScheme, input_ids: Tensor) -> dict[str, float]:
    """Each quantized weight's output SQNR (dB) against the float layer, on the inputs that layer sees when the
    FLOAT model runs ``input_ids`` [B, S]. Keys are parameter names; routed experts report ``...gate_up_proj``
    and ``...down_proj`` over all their experts, each expert on the tokens routed to it."""
    from l4compile.ops.quant import qlinear
    from l4compile.program import CausalLMHarness

    seen: dict[str, list[Tensor]] = {}
    hooks = []

    def grab(name):
        return lambda mod, args: seen.setdefault(name, []).append(args[0].reshape(-1, args[0].shape[-1]).float())

    for mname, mod in lm.named_modules():
        if isinstance(mod, torch.nn.Linear) and should_quantize(role_of(mname + ".weight"), scheme):
            hooks.append(mod.register_forward_pre_hook(grab(mname + ".weight")))
        elif type(mod).__name__ == "Llama4TextExperts" and should_quantize(role_of(mname + ".gate_up_proj"), scheme):
            hooks.append(mod.register_forward_pre_hook(grab(mname)))
    try:
        CausalLMHarness(lm)(input_ids)
    finally:
        for h in hooks:
            h.remove()
    out: dict[str, float] = {}
    for name, xs in seen.items():
        x = torch.cat(xs)                                                      # [T, K]
        if name.endswith(".weight"):
            w = lm.get_parameter(name).float()
            q, s = quantize(w, scheme)
            out[name] = sqnr_db(torch.nn.functional.linear(x, w), qlinear(x, q, s))
            continue
        mod = lm.get_submodule(name)
        gu, dn = mod.gate_up_proj.float(), mod.down_proj.float()               # [E, H, 2I], [E, I, H]
        n_exp, hidden = gu.shape[0], gu.shape[1]
        gu_q, gu_s = quantize(gu.transpose(1, 2), scheme)
        dn_q, dn_s = quantize(dn.transpose(1, 2), scheme)
        x = torch.cat([t.view(n_exp, -1, hidden) for t in xs], dim=1)         # [E, T, H] HF's dense routed_in
        refs = {"gate_up_proj": ([], []), "down_proj": ([], [])}
        for e in range(n_exp):
            z = x[e][x[e].abs().amax(-1) > 0]                                  # tokens routed to expert e
            if not len(z):
                continue
            h = z @ gu[e]                                                      # [c, 2I]
            refs["gate_up_proj"][0].append(h)
            refs["gate_up_proj"][1].append(qlinear(z, gu_q[e], gu_s[e]))
            gate, up = h.chunk(2, dim=-1)
            a = up * torch.nn.functional.silu(gate)                            # [c, I]
            refs["down_proj"][0].append(a @ dn[e])
            refs["down_proj"][1].append(qlinear(a, dn_q[e], dn_s[e]))
        for key, (r, o) in refs.items():
            if r:
                out[f"{name}.{key}"] = sqnr_db(torch.cat(r), torch.cat(o))
    return out


def float_model_from_graph(gm: torch.nn.Module, model_config) -> torch.nn.Module:
    """transformers' Llama4ForCausalLM sharing a traced graph's float weights (``lm.<param>`` attributes, no copy):
    the reference the graph was traced from, as long as no pass has replaced its weights yet (fuse_qkv's fused
    projections are split back into their parameters)."""
    from transformers import Llama4ForCausalLM
    from transformers.models.llama4.modeling_llama4 import Llama4TextRotaryEmbedding

    from l4compile.program import PARAM_PREFIX

    state = {k[len(PARAM_PREFIX):]: v for k, v in gm.state_dict().items() if k.startswith(PARAM_PREFIX)}
    for name, parts in (getattr(gm, "meta", {}).get("l4_fused_qkv") or {}).items():   # passes/fuse_qkv.py
        fused, start = gm.get_buffer(name), 0
        for param, rows in parts:
            state[param] = fused[start:start + rows]                  # [rows, K] view of the fused weight
            start += rows
    with torch.device("meta"):
        lm = Llama4ForCausalLM(model_config)
    missing, _ = lm.load_state_dict(state, strict=False, assign=True)
    if missing:
        raise L4Error(f"cannot rebuild the eager reference: the graph lacks {len(missing)} weights, e.g. {missing[0]}")
    device = next(iter(state.values())).device
    lm.model.rotary_emb = Llama4TextRotaryEmbedding(config=model_config).to(device)
    return lm.eval()


def preset_weight_bytes(model: str) -> dict[str, int]:
    """Weight bytes of MODEL (preset or checkpoint, built on the meta device: no memory) stored bf16 (``none``),
    ``fp8`` or ``int4``, with the planner's storage model (``l4compile.plan.memory``: fp8 + fp32 per-channel
    scales; int4 + bf16 group-128 scales; router, norms, embeddings and lm_head kept bf16)."""
    from l4compile import frontend
    from l4compile.plan import memory as mem
    from l4compile.plan.inventory import from_module

    lm = frontend.load(model, meta=True, dtype="bfloat16").model
    out: dict[str, int] = {}
    for name, scheme in mem.QUANT_SCHEMES.items():
        total = 0
        for rec in from_module(lm):
            sh = rec.shape
            if len(sh) == 3:                                  # HF experts, used as x @ W: [E, in, out]
                cnt, n_out, k = sh[0], sh[2], sh[1]
            elif len(sh) == 2:
                cnt, n_out, k = 1, sh[0], sh[1]
            else:
                cnt, n_out, k = 1, 1, math.prod(sh) if sh else 1
            quantized = len(sh) >= 2 and scheme.quantized(rec.role)
            total += sum(mem.matrix_bytes(cnt, n_out, k, 2, quantized, scheme).values())
        out[name] = total
    return out
