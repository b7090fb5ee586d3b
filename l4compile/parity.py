"""Parity: an engine against transformers eager on the same model, same prompts; and the parity matrix
(``run_matrix``: every backend x quant x dtype compiled and compared, with pass / fail / skipped and why).

Measures, per prompt, the max relative logit error ``max|engine - eager| / max|eager|`` and the agreement of
greedy tokens over ``steps`` new tokens (both sides decode greedily on their own outputs)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 1e-2}
SQNR_MIN_DB = {"fp8": 25.0, "int4": 18.0}   # quantized engines: logit SQNR against the unquantized model


def sqnr_db(got: torch.Tensor, ref: torch.Tensor) -> float:
    noise = float((got - ref).pow(2).sum())
    return float("inf") if noise == 0 else 10.0 * torch.log10(ref.pow(2).sum() / noise).item()


@dataclass
class PromptResult:
    prompt_len: int
    max_rel_error: float
    tokens_agree: int
    tokens_total: int
    sqnr_db: float = float("inf")


@dataclass
class ParityReport:
    backend: str
    dtype: str
    quant: str
    tolerance: float
    prompts: list[PromptResult] = field(default_factory=list)

    @property
    def max_rel_error(self) -> float:
        return max((p.max_rel_error for p in self.prompts), default=0.0)

    @property
    def token_agreement(self) -> float:
        total = sum(p.tokens_total for p in self.prompts)
        return sum(p.tokens_agree for p in self.prompts) / total if total else 1.0

    @property
    def min_sqnr_db(self) -> float:
        return min((p.sqnr_db for p in self.prompts), default=float("inf"))

    @property
    def passed(self) -> bool:
        """Unquantized: rel error under the dtype's tolerance and identical greedy tokens. Quantized: logit SQNR
        against the unquantized model at least SQNR_MIN_DB (tokens are reported, not required)."""
        if self.quant != "none":
            return self.min_sqnr_db >= SQNR_MIN_DB[self.quant]
        return self.max_rel_error < self.tolerance and self.token_agreement == 1.0

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "dtype": self.dtype, "quant": self.quant, "tolerance": self.tolerance,
                "max_rel_error": self.max_rel_error, "token_agreement": self.token_agreement,
                "min_sqnr_db": self.min_sqnr_db,
                "status": "pass" if self.passed else "fail", "prompts": [asdict(p) for p in self.prompts]}


def default_prompts(vocab: int, chunk: int, max_seq: int, steps: int, seed: int = 0) -> list[torch.Tensor]:
    """Prompts of 1 token, just past one chunk, and across several chunks (as far as max_seq allows)."""
    g = torch.Generator().manual_seed(seed)
    room = max(1, max_seq - steps)
    lens = sorted({1, min(room, chunk + 3), min(room, 3 * chunk + 5)})
    return [torch.randint(0, vocab, (1, n), generator=g) for n in lens]


@torch.no_grad()
def eager_greedy(lm, ids: torch.Tensor, steps: int) -> torch.Tensor:
    for _ in range(steps):
        nxt = lm(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


@torch.no_grad()
def compare(engine, lm, prompts: list[torch.Tensor], steps: int) -> ParityReport:
    m = engine.manifest
    rep = ParityReport(m["backend"], m["dtype"], m.get("quant", "none"), TOLERANCE[m["dtype"]])
    lm_device = next(lm.parameters()).device       # the engine may run elsewhere (TensorRT: the GPU)
    for ids in prompts:
        ref = lm(input_ids=ids.to(lm_device), use_cache=False).logits.float().cpu()
        got = engine.prefill(ids).float().cpu()
        err = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
        n = min(steps, engine.max_seq_len - ids.shape[1])
        ours = engine.generate(ids, max_new_tokens=n)[:, ids.shape[1]:].cpu()
        theirs = eager_greedy(lm, ids.to(lm_device), n)[:, ids.shape[1]:].cpu()
        agree = int((ours == theirs).all(0).cumprod(0).sum())  # tokens agreeing before the first divergence
        rep.prompts.append(PromptResult(ids.shape[1], err, agree, n, sqnr_db(got, ref)))
    return rep


# ---------------------------------------------------------------------------------------------------------------
# The parity matrix: backend x quant x dtype, one row each, compiled into a temporary directory.

@dataclass
class MatrixRow:
    backend: str
    quant: str
    dtype: str
    status: str                         # "pass" | "fail" | "skipped"
    reason: str = ""                    # why skipped / failed, or what a skipped backend still checked
    report: ParityReport | None = None

    @property
    def max_rel_error(self) -> float | None:
        return self.report.max_rel_error if self.report else None

    @property
    def token_agreement(self) -> float | None:
        return self.report.token_agreement if self.report else None

    def to_dict(self) -> dict[str, Any]:
        d = self.report.to_dict() if self.report else {
            "backend": self.backend, "dtype": self.dtype, "quant": self.quant, "tolerance": TOLERANCE[self.dtype],
            "max_rel_error": None, "token_agreement": None, "prompts": []}
        d.update(status=self.status, reason=self.reason)
        return d


def from_report(rep: ParityReport) -> MatrixRow:
    status = "pass" if rep.passed else "fail"
    if rep.passed:
        why = ""
    elif rep.quant != "none":
        why = f"logit SQNR {rep.min_sqnr_db:.1f} dB < {SQNR_MIN_DB[rep.quant]:g} dB"
    else:
        why = (f"max rel err {rep.max_rel_error:.3g} >= {rep.tolerance:g}" if rep.max_rel_error >= rep.tolerance
               else "greedy tokens diverge")
    return MatrixRow(rep.backend, rep.quant, rep.dtype, status, why, rep)


def unavailable(backend: str, quant: str, dtype: str, device: str) -> str | None:
    """Why this cell cannot run on this machine / in this build (-> skipped), or None."""
    import importlib.util

    if device == "cuda" and not torch.cuda.is_available():
        return "no CUDA GPU on this machine"
    if backend in ("onnxruntime", "tensorrt"):
        missing = [m for m in ("onnx", "onnxruntime", "onnxscript") if importlib.util.find_spec(m) is None]
        if missing:
            return f"needs {', '.join(missing)} (pip install 'l4compile[onnx]')"
    if backend == "onnxruntime" and dtype == "bfloat16" and device == "cpu":
        return "ONNX Runtime's CPU execution provider has no bfloat16 kernels"
    return None


def run_matrix(model: str, backends: list[str], quants: list[str], dtypes: list[str], *, device: str = "cpu",
               seed: int = 0, layers: int | None = None, max_seq_len: int | None = None, max_batch_size: int = 4,
               steps: int = 32, pass_options: dict[str, dict[str, Any]] | None = None,
               inductor_configs: dict[str, Any] | None = None, on_row=None) -> list[MatrixRow]:
    """Compile MODEL for every (backend, quant, dtype) into a temporary directory and compare with eager.
    Every engine is compiled with ``pass_options``, the inductor ones with ``inductor_configs`` too (as
    ``l4compile.compile`` takes them; checked before the first compile).

    A cell is ``skipped`` when its hardware, package or pass is missing (a TensorRT cell on a machine without
    TensorRT still exports and checks its graph; ``reason`` says what passed); ``fail`` when the engine does
    not match eager or its compile fails for any other reason."""
    import tempfile
    from pathlib import Path

    import l4compile
    from l4compile import frontend
    from l4compile.errors import L4Error
    from l4compile.inductor_configs import check as check_inductor_configs
    from l4compile.pipeline import check_pass_options

    check_pass_options(pass_options or {})
    configs = dict(check_inductor_configs(inductor_configs, "inductor"))
    if configs and "inductor" not in backends:
        raise L4Error(f"--inductor-config applies to the inductor backend; this matrix runs {', '.join(backends)}")
    rows: list[MatrixRow] = []

    def emit(row: MatrixRow) -> None:
        rows.append(row)
        if on_row is not None:
            on_row(row)

    for dtype in dtypes:
        refs: dict[str, Any] = {}      # device -> the eager reference, loaded on the device its engine runs on
        for backend in backends:
            for quant in quants:
                why = unavailable(backend, quant, dtype, device)
                if why is not None:
                    emit(MatrixRow(backend, quant, dtype, "skipped", why))
                    continue
                # TensorRT engines run on the GPU whatever --device says, and so does their eager reference:
                # full-size presets draw their random weights on the device they load on, and CUDA's draws are
                # not CPU's, so an engine and a reference from two devices would hold different weights
                dev = "cuda" if backend == "tensorrt" and _tensorrt_ready() else device
                if dev not in refs:
                    refs[dev] = frontend.load(model, dtype=dtype, device=dev, seed=seed, layers=layers).model
                lm = refs[dev]
                with tempfile.TemporaryDirectory(prefix="l4parity-") as tmp:
                    try:
                        eng = l4compile.compile(model, backend=backend, out=Path(tmp) / "engine", quant=quant,
                                                dtype=dtype, device=dev, max_seq_len=max_seq_len,
                                                max_batch_size=max_batch_size, seed=seed, layers=layers,
                                                pass_options=pass_options,
                                                inductor_configs=configs if backend == "inductor" else None)
                    except L4Error as e:
                        emit(_compile_error_row(backend, quant, dtype, e))
                        continue
                    prompts = default_prompts(eng.vocab_size, int(lm.config.attention_chunk_size), eng.max_seq_len,
                                              steps)
                    emit(from_report(compare(eng, lm, prompts, steps)))
                    del eng
    return rows


def _tensorrt_ready() -> bool:
    import importlib.util

    return torch.cuda.is_available() and importlib.util.find_spec("tensorrt") is not None


def _compile_error_row(backend: str, quant: str, dtype: str, e: Exception) -> MatrixRow:
    info = getattr(e, "info", None)
    if backend == "tensorrt" and info is not None:          # the no-TensorRT exit after the graph checks
        checked = [f"TensorRT op check {info.get('tensorrt_op_check', '?')}"]
        if "onnxruntime_rel_error" in info:
            checked.append(f"ONNX Runtime numerics rel err {info['onnxruntime_rel_error']:.2e}")
        return MatrixRow(backend, quant, dtype, "skipped", f"{e} [{'; '.join(checked)}]")
    return MatrixRow(backend, quant, dtype, "fail", f"compile failed: {e}")


def format_table(rows: list[MatrixRow]) -> str:
    lines = [f"{'backend':<12}{'quant':<7}{'dtype':<10}{'max rel err':>13}{'tokens':>9}  status"]
    for r in rows:
        err = f"{r.max_rel_error:>13.3e}" if r.report else f"{'-':>13}"
        tok = f"{r.token_agreement:>9.1%}" if r.report else f"{'-':>9}"
        status = r.status + (f" ({r.reason})" if r.reason else "")
        lines.append(f"{r.backend:<12}{r.quant:<7}{r.dtype:<10}{err}{tok}  {status}")
    return "\n".join(lines)
