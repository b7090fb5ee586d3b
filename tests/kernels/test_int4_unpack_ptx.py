"""``_UNPACK_BF16X2`` (the sm_90 inline PTX of ``int4_pairs_bf16``) run through a small NumPy model of the PTX ISA,
on the CPU, against the reference dequantization (``l4compile.ops.quant.dequant_int4``, then ``.to(bfloat16)``).

Proves: the instruction sequence, as the ISA defines each instruction (prmt byte selects with sign replication,
lop3's truth table, bf16x2 sub/mul rounded to nearest even with subnormals kept, no .ftz), gives every weight
round_bf16((q - 8) * s) bit for bit: each byte value in each position, every finite bf16 scale. The module's own
string is parsed (a PTX edit is what gets tested); an instruction the model does not know fails loudly.
Cannot prove: what ptxas or the hardware do, nor Triton's packing. Assumed (``inline_asm_elementwise``, pack=4):
element i of the uint8 operand is byte i of $4 (little-endian), bf16 elements 2j, 2j+1 are the low and high halves
of one register ($5 = e0, e1; $6 = e2, e3), and each bf16 output takes two registers the same way ($0, $1 even
weights; $2, $3 odd). ``test_call_matches_assumed_packing`` only checks that the call still reads as assumed.
"""
# N rows of four packed bytes (one pack); q a nibble 0..15, s a bf16 scale
from __future__ import annotations

import inspect
import re

import numpy as np
import pytest
import torch

pytest.importorskip("triton")
from l4compile.kernels import int4_mm  # noqa: E402
from l4compile.ops.quant import dequant_int4  # noqa: E402

PTX = getattr(int4_mm._UNPACK_BF16X2, "value", int4_mm._UNPACK_BF16X2)
U32 = np.uint32


def _bf16_rne(f: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits, round to nearest even on the bit pattern (NaN -> canonical 0x7FC0)."""
    u = np.ascontiguousarray(f, np.float32).view(U32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(f), np.uint16(0x7FC0), r)


def _bf16x2(op, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per 16-bit half: exact float64 result of two bf16 values, rounded once to bf16 (via an exact float32)."""
    out = np.zeros_like(a)
    for sh in (0, 16):
        fa, fb = [(((x >> sh) & 0xFFFF) << 16).view(np.float32).astype(np.float64) for x in (a, b)]
        r64 = op(fa, fb)
        with np.errstate(over="ignore"):
            r32 = r64.astype(np.float32)
        assert np.all((r32 == r64) | np.isinf(r32) | np.isnan(r64)), "bf16x2 result not exact in float32"
        out |= _bf16_rne(r32).astype(U32) << sh
    return out


def _prmt(a, b, c):
    src = a.astype(np.uint64) | (b.astype(np.uint64) << 32)  # bytes 0..3 of a, 4..7 of b
    d = np.zeros(np.broadcast(a, b, c).shape, U32)
    for j in range(4):
        sel = (c >> (4 * j)) & 0xF
        byte = ((src >> (8 * (sel & 7)).astype(np.uint64)) & 0xFF).astype(U32)
        byte = np.where(sel & 8, np.where(byte & 0x80, U32(0xFF), U32(0)), byte)   # msb set: replicate the sign
        d |= byte << (8 * j)
    return d


def _lop3(a, b, c, lut):
    d = np.zeros(np.broadcast(a, b, c).shape, U32)
    for i in range(8):   # truth-table index 4a + 2b + c (ta = 0xF0, tb = 0xCC, tc = 0xAA)
        if (lut >> i) & 1:
            d |= (a if i & 4 else ~a) & (b if i & 2 else ~b) & (c if i & 1 else ~c)
    return d


OPS = {  # opcode -> (number of operands after d, function)
    "mov.b32": (1, lambda a: a),
    "prmt.b32": (3, _prmt),
    "shr.u32": (2, lambda a, n: np.where(n >= 32, U32(0), a >> np.minimum(n, 31))),
    "lop3.b32": (4, lambda a, b, c, lut: _lop3(a, b, c, int(lut))),
    "sub.rn.bf16x2": (2, lambda a, b: _bf16x2(np.subtract, a, b)),
    "mul.rn.bf16x2": (2, lambda a, b: _bf16x2(np.multiply, a, b)),
}


def emulate(ptx: str, words: np.ndarray, s01: np.ndarray, s23: np.ndarray) -> list[np.ndarray]:
    """Run ``ptx`` on [N] uint32 operands $4, $5, $6 -> [$0, $1, $2, $3]."""
    regs: dict[str, np.ndarray | None] = {"$0": None, "$1": None, "$2": None, "$3": None,
                                          "$4": words, "$5": s01, "$6": s23}
    body = ptx.strip()
    assert body.startswith("{") and body.endswith("}"), "expected one { ... } block"

    def val(x: str) -> np.ndarray:
        if re.fullmatch(r"-?(0[xX][0-9a-fA-F]+|\d+)", x):
            return U32(int(x, 0) & 0xFFFFFFFF)
        if regs.get(x) is None:
            raise ValueError(f"read of an unknown or unwritten register {x!r}")
        return regs[x]

    for stmt in filter(None, (s.strip() for s in body[1:-1].split(";"))):
        opcode, _, rest = stmt.partition(" ")
        args = [x.strip() for x in rest.split(",")]
        if opcode == ".reg" and args[0].startswith(".b32 "):
            regs.update({r: None for r in [args[0][5:].strip(), *args[1:]]})
            continue
        if opcode not in OPS or len(args) != OPS[opcode][0] + 1:
            raise ValueError(f"PTX statement not modelled: {stmt!r}")
        if args[0] not in regs or args[0] in ("$4", "$5", "$6"):
            raise ValueError(f"write to an undeclared or input register: {stmt!r}")
        regs[args[0]] = np.broadcast_to(OPS[opcode][1](*map(val, args[1:])), words.shape).astype(U32)
    return [val(r) for r in ("$0", "$1", "$2", "$3")]


def _reference(words, scales):
    """[N] uint32, [N, 4] bf16 -> (even, odd) [N, 4] bf16 bits, the reference's dequantization of the pack."""
    packed = torch.from_numpy(words.astype("<u4").view(np.uint8).reshape(-1, 4).copy())
    w = dequant_int4(packed, scales).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)   # [N, 8] k order
    q = np.stack([(packed.numpy() & 0xF), packed.numpy() >> 4], -1).astype(np.float32) - 8        # [N, 4, 2]
    with np.errstate(over="ignore"):
        mine = _bf16_rne(q * scales.float().numpy()[..., None]).reshape(-1, 8)  # independent RNE of the same product
    assert np.array_equal(w, mine), "torch's bf16 cast and the RNE model disagree"
    return w[:, 0::2], w[:, 1::2]


def _run(ptx, words, scales):
    sb = scales.view(torch.int16).numpy().view(np.uint16).astype(U32)           # [N, 4] scale bits
    r = emulate(ptx, words, sb[:, 0] | sb[:, 1] << 16, sb[:, 2] | sb[:, 3] << 16)
    return tuple(np.stack([x & 0xFFFF, x >> 16, y & 0xFFFF, y >> 16], -1) for x, y in (r[:2], r[2:]))


def _sweep_words(rng, n_random=300):
    """Each byte value 0..255 in each position (other bytes random), then random words."""
    w = rng.integers(0, 2**32, (4, 256), dtype=np.uint64).astype(U32)
    for p in range(4):
        w[p] = (w[p] & ~U32(0xFF << 8 * p)) | (np.arange(256, dtype=U32) << 8 * p)
    return np.concatenate([w.ravel(), rng.integers(0, 2**32, n_random, dtype=np.uint64).astype(U32)])


SPECIAL = [1.0, 0.5, 3.0e-3, 7.5, 1e5, -1.0, -0.25, -7.5, -3.0e-3, -1e5, 2.0**-120, 3.0e38, 1.0e-40]


@pytest.mark.parametrize("kind", ["one", "half", "special", "random_bits"])
def test_unpack_matches_reference(kind):
    rng = np.random.default_rng(0)
    words = _sweep_words(rng)
    n = len(words)
    if kind in ("one", "half"):
        scales = torch.full((n, 4), 1.0 if kind == "one" else 0.5, dtype=torch.bfloat16)
    elif kind == "special":
        scales = torch.tensor(rng.choice(SPECIAL, (n, 4)), dtype=torch.float32).to(torch.bfloat16)
    else:   # finite bf16 bit patterns, any exponent
        bits = rng.integers(0, 2**16, (n, 4), dtype=np.int64).astype(np.uint16)
        bits[(bits & 0x7F80) == 0x7F80] ^= 0x4000
        scales = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)
    even, odd = _run(PTX, words, scales)
    ref_even, ref_odd = _reference(words, scales)
    bad = np.nonzero((even != ref_even).any(1) | (odd != ref_odd).any(1))[0]
    assert bad.size == 0, f"word {words[bad[0]]:#010x} scales {scales[bad[0]].tolist()}: " \
        f"even {even[bad[0]]} vs {ref_even[bad[0]]}, odd {odd[bad[0]]} vs {ref_odd[bad[0]]}"


def test_unpack_every_finite_scale():
    """Every nibble 0..15 with every finite bf16 scale (zeros, subnormals, overflow to inf included)."""
    bits = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    bits = bits[(bits & 0x7F80) != 0x7F80].reshape(-1, 4)                       # 65280 scales, 4 a row
    scales = torch.from_numpy(np.tile(bits, (16, 1)).view(np.int16)).view(torch.bfloat16)
    words = np.repeat(np.arange(16, dtype=U32) * U32(0x11111111), len(bits))  # q in every nibble
    even, odd = _run(PTX, words, scales)
    ref_even, ref_odd = _reference(words, scales)
    assert np.array_equal(even, ref_even) and np.array_equal(odd, ref_odd)


@pytest.mark.parametrize("old,new", [
    ("0x4140", "0x4041"),                                   # byte select: swapped halves
    ("0x4342", "0x4340"),                                   # byte select: b0 for b2
    ("c, 0xea", "c, 0xfe"),                                 # lop3 table: a | b | c
    ("0x43084308", "0x43074307"),                           # off by one in q - 8
    ("shr.u32 s1, t1, 4", "shr.u32 s1, t1, 3"),
    ("mul.rn.bf16x2 $1, $1, $6", "mul.rn.bf16x2 $1, $1, $5"),  # wrong scale pair
])
def test_emulator_catches_a_broken_unpack(old, new):
    assert old in PTX, f"{old!r} no longer in _UNPACK_BF16X2: update this mutation"
    words = _sweep_words(np.random.default_rng(1), 0)
    scales = torch.tensor(np.random.default_rng(2).choice(SPECIAL[:10], (len(words), 4)),
                          dtype=torch.float32).to(torch.bfloat16)
    got, ref = _run(PTX.replace(old, new, 1), words, scales), _reference(words, scales)
    assert not (np.array_equal(got[0], ref[0]) and np.array_equal(got[1], ref[1]))


def test_unknown_instruction_fails_loudly():
    ptx = PTX.replace("shr.u32 s0, t0, 4;", "shr.u32 s0, t0, 4;\nadd.u32 s0, s0, 1;")
    with pytest.raises(ValueError, match="not modelled"):
        emulate(ptx, *(np.zeros(1, U32),) * 3)


def test_call_matches_assumed_packing():
    """The call site still has the shape the emulation assumes: 4 outputs, 3 inputs, pack=4, (bytes, scales)."""
    src = " ".join(inspect.getsource(int4_mm).split())
    assert re.search(r'inline_asm_elementwise\(_UNPACK_BF16X2, "=r,=r,=r,=r,r,r,r", \[packed, sc\], '
                     r"dtype=\(tl\.bfloat16, tl\.bfloat16\), is_pure=True, pack=4\)", src)
