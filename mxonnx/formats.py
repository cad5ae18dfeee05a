"""Number formats: one table of element types, parsing of format names, and the numpy quantizers.

Every other stage (ONNX function bodies, native kernels, GPTQ, passes) mirrors the numerics defined here.

MX formats (OCP Microscaling v1.0; named MXINTd-b in the paper, Sharify et al. arXiv 2405.07135, Sec. 1
"Microscaling format") split a tensor into blocks of ``b`` consecutive elements along ``axis`` and give each block
one power-of-two scale:

    E = clamp(floor(log2(max|x|)) - emax, -127, 127)      (an all-zero block has E = -127)
    y = Q_elem(x / 2^E) * 2^E                              (E stored as one byte E + 127, "E8M0")

Pre-scale (arXiv 2601.09555; ``MXFormat.prescale`` = p, default 1 = plain OCP): E stays the OCP exponent of the block
maximum, but the elements are taken from p times the scaled value, and the value they stand for is divided by p:

    y = Q_elem(x * I_E) * S_E,   I_E = fl32(2^-E * p),   S_E = fl32(2^E * f),   f = fl32(1 / p)

so with p = 3/4 an MXFP4 block maximum (x / 2^E in [4, 8)) lands in [3, 6) and no longer clips at 6; the stored
codes and E8M0 exponents keep their layout and the per-tensor factor f comes back in S_E (the float block scale a
lowered graph carries). p lies in (0.5, 1] (f in [1, 2): S_E stays finite for every E). p = 1 gives I_E = 2^-E,
S_E = 2^E bit for bit.

``Q_elem`` rounds to a minifloat grid with subnormals, half to even, saturating at the largest normal:

    e = max(floor(log2|v|), emin);  s = 2^(e - mbits);  Q_elem(v) = clamp(round_half_even(v / s) * s, +-max_norm)

MXINTd is the same grid with emin = emax = 0 and d - 2 mantissa bits (values k / 2^(d-2), |k| <= 2^(d-1) - 1),
so one element core serves every MX format; the formats differ only by their row in ``ELEMENT_FORMATS``.

Non-finite input: a block holding a NaN or an Inf becomes all NaN (E8M0 code 255). Weight paths refuse such input
with ``check_finite``. ``dequantize`` of arbitrary codes may exceed float32 (e.g. E5M2 57344 * 2^127): +-Inf.

Fixed-point baselines ``int{d}`` / ``int{d}-g{b}``: symmetric, ``scale = max|x| / (2^(d-1) - 1)`` in float32 per
output channel (every index but the one along ``axis``) or per group of ``b`` along ``axis``; codes are
``clamp(round_half_even(x / scale), +-(2^(d-1) - 1))``. A channel or group whose scale is 0 (all zeros, or
below float32 range) gets scale 1. Near float32 max, ``127 * scale`` may round past it and dequantize to Inf.

Zeros always come out as +0 (codes hold no negative zero).

Implementation: the exponent is read from the float32 exponent field (exact; a float32 subnormal maximum
gives the clamped E = -127 either way) and the arrays are processed in cache-sized chunks of whole blocks, on up
to ``_MAX_THREADS`` threads for large arrays.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from mxonnx.errors import InputError

BLOCK_SIZES = tuple(2**i for i in range(1, 11))
_CHUNK_ELEMENTS = 1 << 16  # elements per chunk: the temporaries of one chunk stay in L2 cache
_MAX_THREADS = 4
_EXP_MASK = np.int32(0x7F800000)
_ABS_MASK = np.int32(0x7FFFFFFF)
_INTEGER_ROUNDER = np.float32(1.5 * 2**23)  # (y + R) - R rounds float32 |y| <= 2^22 to an integer, half to even


@dataclasses.dataclass(frozen=True)
class ElemFormat:
    """One element type of an MX format: ``bits = 1 + ebits + mbits`` (sign, exponent field, trailing mantissa).

    ``emin``/``emax`` are the unbiased exponents of the smallest/largest normal; ``max_norm`` the largest finite
    value (a datum: E4M3 tops out at 448 because its all-ones pattern is NaN). ``integer_codes``: codes are
    two's-complement integers k (MXINT, whose one exponent-field bit is the integer bit) rather than
    sign-magnitude bit patterns (MXFP).
    """

    name: str
    bits: int
    ebits: int
    mbits: int
    emax: int
    emin: int
    max_norm: float
    integer_codes: bool = False

    @property
    def min_norm(self) -> float:
        return 2.0**self.emin


def _mxint_element(d: int) -> ElemFormat:
    return ElemFormat(f"int{d}", bits=d, ebits=1, mbits=d - 2, emax=0, emin=0, max_norm=2.0 - 2.0 ** (2 - d),
                      integer_codes=True)


ELEMENT_FORMATS: dict[str, ElemFormat] = {
    e.name: e
    for e in (
        *(_mxint_element(d) for d in range(2, 9)),
        ElemFormat("e4m3", bits=8, ebits=4, mbits=3, emax=8, emin=-6, max_norm=448.0),
        ElemFormat("e5m2", bits=8, ebits=5, mbits=2, emax=15, emin=-14, max_norm=57344.0),
        ElemFormat("e3m2", bits=6, ebits=3, mbits=2, emax=4, emin=-2, max_norm=28.0),
        ElemFormat("e2m3", bits=6, ebits=2, mbits=3, emax=2, emin=0, max_norm=7.5),
        ElemFormat("e2m1", bits=4, ebits=2, mbits=1, emax=2, emin=0, max_norm=6.0),
    )
}

# MX family name (the part before "-{b}") -> element type.
MX_ELEMENTS: dict[str, str] = {
    **{f"mxint{d}": f"int{d}" for d in range(2, 9)},
    "mxfp8e4m3": "e4m3", "mxfp8e5m2": "e5m2", "mxfp6e3m2": "e3m2", "mxfp6e2m3": "e2m3", "mxfp4": "e2m1",
}


@dataclasses.dataclass(frozen=True)
class MXFormat:
    """A parsed format name. ``kind``: 'mx' (``elem`` set, E8M0 scale per block of ``block_size``), 'int'
    (fixed point, fp32 scale per channel when ``block_size`` is None, else per group) or 'none' (float32)."""

    name: str
    kind: str
    elem: ElemFormat | None
    bits: int
    block_size: int | None
    prescale: float = 1.0  # MX only: elements from p * x / 2^E, value elem * 2^E / p (module docstring)

    @property
    def is_mx(self) -> bool:
        return self.kind == "mx"

    @property
    def prescaled(self) -> bool:
        return self.prescale != 1.0

    @property
    def label(self) -> str:
        """The name, with ``@p`` and the pre-scale when there is one (``mxfp4-32@p0.75``): for reports only."""
        return f"{self.name}@p{self.prescale:.6g}" if self.prescaled else self.name

    @property
    def bits_per_weight(self) -> float:
        """MX: d + 8/b. int{d}-g{b}: d + 32/b. int{d}: d (the d + 32/K of the per-channel scale depends on K).
        none: 32."""
        if self.kind == "mx":
            return self.bits + 8 / self.block_size
        if self.kind == "int":
            return self.bits + (32 / self.block_size if self.block_size else 0.0)
        return 32.0


_VALID = ("mxint{2..8}-{b}, mxfp8e4m3-{b}, mxfp8e5m2-{b}, mxfp6e3m2-{b}, mxfp6e2m3-{b}, mxfp4-{b}, "
          "int{2..8}, int{2..8}-g{b}, none; b a power of two in 2..1024")
_MX_NAME = re.compile(r"(mxint(\d+)|mxfp\w*?)-(\d+)")
_INT_NAME = re.compile(r"int(\d+)(?:-g(\d+))?")


def _checked_block(b: str, name: str) -> int:
    size = int(b)
    if size not in BLOCK_SIZES:
        raise InputError(f"format {name!r}: block size {size} is not a power of two in 2..1024 (valid: {_VALID})")
    return size


def _checked_bits(d: str, name: str) -> int:
    bits = int(d)
    if not 2 <= bits <= 8:
        raise InputError(f"format {name!r}: {bits} bits is outside 2..8 (valid: {_VALID})")
    return bits


@functools.lru_cache(maxsize=None)
def _parse_name(name: str) -> MXFormat:
    key = name.strip().lower()
    if key == "none":
        return MXFormat("none", "none", None, 32, None)
    if m := _MX_NAME.fullmatch(key):
        family, d, b = m.groups()
        if d is not None:
            family = f"mxint{_checked_bits(d, name)}"
        if family not in MX_ELEMENTS:
            raise InputError(f"unknown format {name!r} (valid: {_VALID})")
        size = _checked_block(b, name)
        elem = ELEMENT_FORMATS[MX_ELEMENTS[family]]
        return MXFormat(f"{family}-{size}", "mx", elem, elem.bits, size)
    if m := _INT_NAME.fullmatch(key):
        bits = _checked_bits(m.group(1), name)
        size = _checked_block(m.group(2), name) if m.group(2) is not None else None
        return MXFormat(f"int{bits}" + (f"-g{size}" if size else ""), "int", None, bits, size)
    raise InputError(f"unknown format {name!r} (valid: {_VALID})")


def parse_format(fmt: str | MXFormat) -> MXFormat:
    """Parse a format name (case-insensitive); an ``MXFormat`` passes through. Raises ``InputError``."""
    if isinstance(fmt, MXFormat):
        return fmt
    if not isinstance(fmt, str):
        raise InputError(f"format must be a name, got {type(fmt).__name__} (valid: {_VALID})")
    return _parse_name(fmt)


PRESCALE_LOW, PRESCALE_HIGH = 0.5, 1.0  # p in (0.5, 1]


def with_prescale(fmt: str | MXFormat, prescale: float) -> MXFormat:
    """``fmt`` with the element pre-scale p (stored as the float32 nearest ``prescale``, as an ONNX float attribute
    holds it). p must lie in (0.5, 1]; p != 1 needs an MX format. Raises ``InputError``."""
    fmt = parse_format(fmt)
    p = float(np.float32(prescale))
    if not (PRESCALE_LOW < p <= PRESCALE_HIGH):
        raise InputError(f"pre-scale {prescale} is outside ({PRESCALE_LOW:g}, {PRESCALE_HIGH:g}]")
    if p != 1.0 and fmt.kind != "mx":
        raise InputError(f"format {fmt.name!r} takes no pre-scale (only MX formats do)")
    return dataclasses.replace(fmt, prescale=p)


def prescale_factor(prescale: float) -> np.float32:
    """f = fl32(1 / p), the per-tensor factor the dequantized values carry."""
    return np.float32(1) / np.float32(prescale)


def bits_per_weight(fmt: str | MXFormat) -> float:
    return parse_format(fmt).bits_per_weight


def describe_formats() -> list[dict]:
    """Rows for ``mxonnx formats``: every family at representative block sizes."""
    rows = []
    for family, elem_name in MX_ELEMENTS.items():
        e = ELEMENT_FORMATS[elem_name]
        grid = (f"integers k/{2**e.mbits}, |k| <= {2**(e.bits - 1) - 1}" if e.integer_codes
                else f"E{e.ebits}M{e.mbits} minifloat, max {e.max_norm:g}")
        sizes = (16, 32, 128) if family == "mxint4" else (32, 128)
        rows += [dict(name=f"{family}-{b}", bits_per_weight=bits_per_weight(f"{family}-{b}"),
                      description=f"MX: {grid}, E8M0 scale per block of {b}") for b in sizes]
    for name, text in (("int8", "fixed point, symmetric, fp32 scale per output channel (+32/K bits)"),
                       ("int4", "fixed point, symmetric, fp32 scale per output channel (+32/K bits)"),
                       ("int4-g128", "fixed point, symmetric, fp32 scale per group of 128"),
                       ("none", "float32, not quantized")):
        rows.append(dict(name=name, bits_per_weight=bits_per_weight(name), description=text))
    return rows


def check_finite(x: np.ndarray, what: str) -> None:
    """Raise ``InputError`` when ``x`` holds a NaN or an Inf (weights must be finite)."""
    if not np.isfinite(x).all():
        raise InputError(f"{what} holds NaN or Inf values; cannot quantize it")


# ---------------------------------------------------------------- E8M0 scales

def _e8m0_table(sign: int) -> np.ndarray:
    """2^(sign * (c - 127)) for E8M0 codes c = 0..254 (float32, 2^-127 is subnormal but exact); NaN at 255."""
    table = np.ldexp(np.float32(1), sign * (np.arange(255, dtype=np.int32) - 127)).astype(np.float32)
    return np.append(table, np.float32(np.nan))


_E8M0_SCALE = _e8m0_table(+1)  # code -> 2^E
_E8M0_INVERSE = _e8m0_table(-1)  # code -> 2^-E


@functools.cache
def e8m0_multipliers(prescale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(I, S) indexed by the E8M0 code c = E + 127: I_c = fl32(2^-E * p), S_c = fl32(2^E * f), f = fl32(1 / p)
    (NaN at 255). p = 1: the exact powers of two."""
    if prescale == 1.0:
        return _E8M0_INVERSE, _E8M0_SCALE
    return _E8M0_INVERSE * np.float32(prescale), _E8M0_SCALE * prescale_factor(prescale)


def block_float_scales(exponents: np.ndarray, fmt: str | MXFormat) -> np.ndarray:
    """The float32 value scale S_c of each block from its E8M0 code c: 2^(c - 127), times f = fl32(1 / p) when the
    format is pre-scaled (what ``dequantize`` multiplies the element values by)."""
    fmt = _require_kind(fmt, "mx")
    return e8m0_multipliers(fmt.prescale)[1][np.asarray(exponents, np.uint8)]


@functools.cache
def _shared_scale_tables(emax: int, prescale: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(E8M0 code, I, S) of ``e8m0_multipliers``, each indexed by the exponent field F (0..255) of a block's max|x|.

    code = E + 127 = max(F - emax, 0): floor(log2 m) = F - 127 for normal m; F = 0 for zero and subnormal m,
    whose true floor(log2) is <= -127 so that E clamps to -127 in both readings; F - emax <= 254, so the upper
    clamp never binds. F = 255 (NaN, Inf) gives code 255 and NaN scales.
    """
    field = np.arange(256)
    code = np.where(field == 255, 255, np.maximum(field - emax, 0)).astype(np.uint8)
    inverse, scale = e8m0_multipliers(prescale)
    return code, inverse[code], scale[code]


def _exponent_field(absmax_bits: np.ndarray) -> np.ndarray:
    return absmax_bits >> 23


# ---------------------------------------------------------------- element grid

def _round_to_grid(v: np.ndarray, elem: ElemFormat) -> np.ndarray:
    """Q_elem(v) in place on float32 ``v``: s = 2^(max(floor(log2|v|), emin) - mbits),
    q = clamp(round_half_even(v / s) * s, +-max_norm); zeros come out as +0, NaN stays NaN.

    Clamping first gives the same result (max_norm is on the grid and rounding is monotonic) and bounds |v|.
    Rounding adds and subtracts C = 1.5 * 2^23 * s: v + C lies in [2^23 s, 2^24 s), where the float32 spacing is
    s, so float32 addition rounds v to a multiple of s half to even (C / s is even) and the subtraction is exact.
    This needs |v| < 2^22 s, true since |v| < 2^(e+1) = 2^(mbits+1) s.
    """
    np.clip(v, -elem.max_norm, elem.max_norm, out=v)
    rounder = np.bitwise_and(v.view(np.int32), _EXP_MASK).view(np.float32)  # 2^floor(log2|v|), 0 if |v| < 2^-126
    np.maximum(rounder, np.float32(elem.min_norm), out=rounder)  # 2^e
    rounder *= np.float32(1.5 * 2.0 ** (23 - elem.mbits))  # C
    v += rounder
    v -= rounder
    return v


def element_values(fmt: str | MXFormat | ElemFormat) -> np.ndarray:
    """Value of every element code, float32 array of length 2^d indexed by the d-bit code.

    MXFP: sign-magnitude bit pattern ``s | exponent field | mantissa`` (bias 1 - emin); patterns above
    ``max_norm`` are Inf/NaN encodings, never produced by ``quantize``, and map to NaN. MXINT: the d-bit
    two's complement pattern of k, value k / 2^(d-2); k = -2^(d-1) is never produced (symmetric range) and keeps
    its arithmetic value.
    """
    elem = fmt if isinstance(fmt, ElemFormat) else parse_format(fmt).elem
    if elem is None:
        raise InputError(f"format {fmt!r} has no element code table (only MX formats do)")
    codes = np.arange(2**elem.bits, dtype=np.int64)
    if elem.integer_codes:
        k = np.where(codes >= 2 ** (elem.bits - 1), codes - 2**elem.bits, codes)
        return np.ldexp(k, -elem.mbits).astype(np.float32)
    magnitude = codes & (2 ** (elem.bits - 1) - 1)
    field, mantissa = magnitude >> elem.mbits, magnitude & (2**elem.mbits - 1)
    exponent = np.maximum(field, 1) + elem.emin - 1  # field 0: subnormal, same exponent as field 1
    values = np.ldexp(np.where(field > 0, 2**elem.mbits, 0) + mantissa, exponent - elem.mbits)
    values = np.where(values > elem.max_norm, np.nan, values)
    return np.where(codes >> (elem.bits - 1) == 1, -values, values).astype(np.float32)


def element_codes(q: np.ndarray, elem: ElemFormat) -> np.ndarray:
    """Codes of grid values ``q`` (finite or NaN; NaN gets code 0).

    MXINT: k = q * 2^mbits as int8. MXFP: sign << (d-1) | magnitude, where for e = max(floor(log2|q|), emin)
    magnitude = |q| / 2^(e - mbits) + (e - emin) * 2^mbits (= (field << mbits) | mantissa).
    """
    finite = np.nan_to_num(q, nan=0.0)
    if elem.integer_codes:
        return np.ldexp(finite, elem.mbits).astype(np.int8)
    bits = finite.view(np.int32)
    e = np.maximum(((bits >> 23) & 0xFF) - 127, elem.emin)
    magnitude = np.ldexp(np.abs(finite), elem.mbits - e).astype(np.int32) + ((e - elem.emin) << elem.mbits)
    sign = (bits >> 31) & 1
    return ((sign << (elem.bits - 1)) | magnitude).astype(np.uint8)


# ---------------------------------------------------------------- blocks

@dataclasses.dataclass(frozen=True)
class _Blocks:
    """``x`` viewed as (groups, b, inner): blocks of ``b`` consecutive elements along ``axis``, the last one
    zero padded. groups = outer * nb, where outer and inner are the sizes before and after ``axis``."""

    data: np.ndarray
    shape: tuple[int, ...]
    axis: int
    blocks_per_row: int

    @classmethod
    def of(cls, x: np.ndarray, axis: int, size: int | None) -> _Blocks:
        """``size`` None: one block spanning the whole axis (per-channel scales)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        axis = _normalized_axis(x, axis)
        n = x.shape[axis]
        size = size or max(n, 1)
        outer, inner = int(np.prod(x.shape[:axis])), int(np.prod(x.shape[axis + 1:]))
        nb = -(-n // size)
        data = x.reshape(outer, n, inner)
        if nb * size != n:
            data = np.pad(data, ((0, 0), (0, nb * size - n), (0, 0)))
        return cls(data.reshape(outer * nb, size, inner), x.shape, axis, nb)

    @property
    def scale_shape(self) -> tuple[int, ...]:
        """``shape`` with dim ``axis`` replaced by the number of blocks along it."""
        return self.shape[: self.axis] + (self.blocks_per_row,) + self.shape[self.axis + 1:]

    def block_scales(self, scales: np.ndarray) -> np.ndarray:
        """Per-block array of ``scale_shape`` as (groups, 1, inner), broadcastable against ``data``."""
        scales = np.asarray(scales)
        if scales.shape != self.scale_shape:
            raise InputError(f"scales have shape {scales.shape}, expected {self.scale_shape} for data {self.shape}")
        return scales.reshape(self.data.shape[0], 1, self.data.shape[2])

    def chunks(self) -> list[slice]:
        """Slices of whole groups holding about ``_CHUNK_ELEMENTS`` elements each."""
        per_group = self.data.shape[1] * self.data.shape[2]
        step = max(1, _CHUNK_ELEMENTS // max(per_group, 1))
        return [slice(i, i + step) for i in range(0, self.data.shape[0], step)]

    def restore(self, blocked: np.ndarray) -> np.ndarray:
        """Inverse of ``of``: drop the padding and return an array of ``shape``."""
        n = self.shape[self.axis]
        outer = int(np.prod(self.shape[: self.axis]))
        rows = blocked.reshape(outer, self.blocks_per_row * blocked.shape[1], blocked.shape[2])
        return rows[:, :n].reshape(self.shape)


def _normalized_axis(x: np.ndarray, axis: int) -> int:
    if not -x.ndim <= axis < x.ndim:
        raise InputError(f"axis {axis} is out of range for an array of {x.ndim} dimension(s)")
    return axis % x.ndim


def _absmax_bits(xb: np.ndarray) -> np.ndarray:
    """Bit pattern of max|x| per block (sign cleared; NaN patterns order above Inf), shape (groups, 1, inner).

    Small blocks along the last axis fold adjacent pairs (numpy reduces a short innermost axis slowly)."""
    bits = np.bitwise_and(xb.view(np.int32), _ABS_MASK)
    if bits.shape[2] == 1 and bits.shape[1] <= 32:
        while bits.shape[1] > 1 and bits.shape[1] % 2 == 0:
            bits = np.maximum(bits[:, 0::2], bits[:, 1::2])
    return bits.max(axis=1, keepdims=True)


# ---------------------------------------------------------------- MX helpers for GPTQ

def shared_exponents(x: np.ndarray, fmt: str | MXFormat, axis: int = -1) -> np.ndarray:
    """Unbiased shared exponent E per block (int32, shape of ``quantize``'s scales); 128 marks a NaN/Inf block."""
    fmt = _require_kind(fmt, "mx")
    blocks = _Blocks.of(x, axis, fmt.block_size)
    code = _shared_scale_tables(fmt.elem.emax)[0][_exponent_field(_absmax_bits(blocks.data))]
    return (code.astype(np.int32) - 127).reshape(blocks.scale_shape)


def exponent_multipliers(exponent: np.ndarray, fmt: str | MXFormat) -> tuple[np.ndarray, np.ndarray]:
    """(I_E, S_E) of the module docstring for unbiased exponents E (int, -127..127; 128 gives NaN)."""
    fmt = _require_kind(fmt, "mx")
    exponent = np.asarray(exponent)
    if exponent.size and (exponent.min() < -127 or exponent.max() > 128):
        raise InputError("shared exponents must lie in -127..127 (128 marks a NaN block)")
    code = (exponent.astype(np.int32) + 127).astype(np.uint8)
    inverse, scale = e8m0_multipliers(fmt.prescale)
    return inverse[code], scale[code]


def quantize_dequantize_with_exponent(x: np.ndarray, exponent: np.ndarray, fmt: str | MXFormat) -> np.ndarray:
    """Q_elem(x * I_E) * S_E element-wise with a given E (int, broadcastable to ``x``, in -127..127; 128 gives
    NaN; I_E = 2^-E, S_E = 2^E without a pre-scale); values beyond the block's range saturate. GPTQ (paper
    Algorithm 1) fixes each block's E once and then quantizes one column at a time."""
    fmt = _require_kind(fmt, "mx")
    inverse, scale = exponent_multipliers(exponent, fmt)
    with np.errstate(over="ignore"):  # x / 2^E beyond float32 saturates to max_norm like any value above it
        v = np.asarray(x, np.float32) * inverse
    return _round_to_grid(v, fmt.elem) * scale


# ---------------------------------------------------------------- fixed point

def _qmax(fmt: MXFormat) -> np.float32:
    return np.float32(2 ** (fmt.bits - 1) - 1)


def _fixed_point_block_scales(xb: np.ndarray, fmt: MXFormat) -> np.ndarray:
    """scale = max|x| / (2^(d-1) - 1) per group (float32); NaN when non-finite; 1 where the quotient is 0 (an
    all-zero group, or one so tiny that the quotient underflows: its codes are then all 0)."""
    amax = _absmax_bits(xb).view(np.float32)
    scale = amax / _qmax(fmt)
    scale[scale == 0] = 1.0
    scale[~np.isfinite(amax)] = np.nan
    return scale


def fixed_point_scales(x: np.ndarray, fmt: str | MXFormat, axis: int = -1) -> np.ndarray:
    """Float32 scales of an int format: x's shape with dim ``axis`` = 1 (per channel) or ceil(n/b) (groups)."""
    fmt = _require_kind(fmt, "int")
    blocks = _Blocks.of(x, axis, fmt.block_size)
    return _fixed_point_block_scales(blocks.data, fmt).reshape(blocks.scale_shape)


def _fixed_point_codes(x: np.ndarray, scale: np.ndarray, fmt: MXFormat) -> np.ndarray:
    """clamp(round_half_even(x / scale), +-(2^(d-1) - 1)) as float32, zeros as +0 (NaN where the scale is NaN).

    Clamping first is equivalent (the bounds are integers); rounding adds and subtracts 1.5 * 2^23."""
    q = np.divide(x, scale, dtype=np.float32)
    np.clip(q, -_qmax(fmt), _qmax(fmt), out=q)
    q += _INTEGER_ROUNDER
    q -= _INTEGER_ROUNDER
    return q


def quantize_dequantize_with_scale(x: np.ndarray, scale: np.ndarray, fmt: str | MXFormat) -> np.ndarray:
    """codes(x / scale) * scale element-wise with a given float32 scale broadcastable to ``x``."""
    fmt = _require_kind(fmt, "int")
    scale = np.asarray(scale, np.float32)
    return _fixed_point_codes(np.asarray(x, np.float32), scale, fmt) * scale


# ---------------------------------------------------------------- chunked engine (both kinds)

def _times_block_values(xb: np.ndarray, per_block: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """xb (groups, b, inner) * per_block (groups, 1, inner). Short blocks along the last axis (inner = 1) go one
    position at a time: numpy broadcasts slowly over a short innermost axis."""
    if xb.shape[2] != 1 or xb.shape[1] > 8:
        return np.multiply(xb, per_block, out=out)
    out = np.empty_like(xb) if out is None else out
    for j in range(xb.shape[1]):
        np.multiply(xb[:, j], per_block[:, 0], out=out[:, j])
    return out


def _quantize_blocks(xb: np.ndarray, fmt: MXFormat) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(grid values, per-block key, float32 multipliers) of the blocks in ``xb``, so that y = grid * multiplier.
    MX: Q_elem(x * I_E), exponent field of max|x| (``stored_scales`` maps it to E8M0), S_E.
    int: clamped integer codes as float32, float32 scales, the same scales."""
    if fmt.is_mx:
        field = _exponent_field(_absmax_bits(xb))
        _, inverse, scale = _shared_scale_tables(fmt.elem.emax, fmt.prescale)
        return _round_to_grid(_times_block_values(xb, inverse[field]), fmt.elem), field, scale[field]
    scale = _fixed_point_block_scales(xb, fmt)
    return _fixed_point_codes(xb, scale, fmt), scale, scale


def _stored_scales(key: np.ndarray, fmt: MXFormat) -> np.ndarray:
    """The scales ``quantize`` returns from ``_quantize_blocks``' key: E8M0 codes (MX) or the float32 scales."""
    return _shared_scale_tables(fmt.elem.emax)[0][key] if fmt.is_mx else key


@functools.cache
def _thread_pool() -> ThreadPoolExecutor | None:
    workers = min(os.cpu_count() or 1, _MAX_THREADS)
    return ThreadPoolExecutor(workers, thread_name_prefix="mxonnx-formats") if workers > 1 else None


def _run_chunks(blocks: _Blocks, work) -> None:
    """Call ``work(part)`` for every chunk; numpy releases the GIL in ufuncs, so large arrays use a few threads
    (each chunk writes its own slice)."""
    parts = blocks.chunks()
    pool = _thread_pool() if len(parts) >= 4 else None
    if pool is None:
        for part in parts:
            work(part)
    else:
        list(pool.map(work, parts))


def _qdq(x: np.ndarray, fmt: MXFormat, axis: int) -> np.ndarray:
    blocks = _Blocks.of(x, axis, fmt.block_size)
    out = np.empty_like(blocks.data)

    def work(part: slice) -> None:
        grid, _, multiplier = _quantize_blocks(blocks.data[part], fmt)
        _times_block_values(grid, multiplier, out=out[part])

    _run_chunks(blocks, work)
    return blocks.restore(out)


def _quantize(x: np.ndarray, fmt: MXFormat, axis: int) -> tuple[np.ndarray, np.ndarray]:
    blocks = _Blocks.of(x, axis, fmt.block_size)
    grid = np.empty_like(blocks.data)
    scales = np.empty((blocks.data.shape[0], 1, blocks.data.shape[2]), np.uint8 if fmt.is_mx else np.float32)

    def work(part: slice) -> None:
        grid[part], key, _ = _quantize_blocks(blocks.data[part], fmt)
        scales[part] = _stored_scales(key, fmt)

    _run_chunks(blocks, work)
    grid = blocks.restore(grid)
    codes = element_codes(grid, fmt.elem) if fmt.is_mx else np.nan_to_num(grid, nan=0.0).astype(np.int8)
    return codes, scales.reshape(blocks.scale_shape)


def _dequantize(codes: np.ndarray, scales: np.ndarray, fmt: MXFormat, axis: int) -> np.ndarray:
    codes = np.asarray(codes).astype(np.int64)
    unsigned = fmt.is_mx and not fmt.elem.integer_codes
    low, high = (0, 2**fmt.bits - 1) if unsigned else (-(2 ** (fmt.bits - 1)), 2 ** (fmt.bits - 1) - 1)
    if codes.size and (codes.min() < low or codes.max() > high):
        raise InputError(f"{fmt.name} codes must lie in {low}..{high}")
    values = element_values(fmt.elem)[codes & (2**fmt.bits - 1)] if fmt.is_mx else codes.astype(np.float32)
    blocks = _Blocks.of(values, axis, fmt.block_size)
    if fmt.is_mx:
        multiplier = e8m0_multipliers(fmt.prescale)[1][blocks.block_scales(np.asarray(scales, np.uint8))]
    else:
        multiplier = blocks.block_scales(np.asarray(scales, np.float32))
    with np.errstate(over="ignore"):  # large codes times large scales exceed float32: +-Inf
        return blocks.restore(blocks.data * multiplier)


# ---------------------------------------------------------------- public entry points

def _require_kind(fmt: str | MXFormat, kind: str) -> MXFormat:
    fmt = parse_format(fmt)
    if fmt.kind != kind:
        raise InputError(f"format {fmt.name!r} is not an {kind} format")
    return fmt


def quantize_dequantize(x: np.ndarray, fmt: str | MXFormat, axis: int = -1) -> np.ndarray:
    """Round ``x`` to the format's grid and back (float32, same shape). ``none`` returns a float32 copy."""
    fmt = parse_format(fmt)
    x = np.asarray(x, dtype=np.float32)
    return x.copy() if fmt.kind == "none" else _qdq(x, fmt, axis)


def quantize(x: np.ndarray, fmt: str | MXFormat, axis: int = -1) -> tuple[np.ndarray, np.ndarray | None]:
    """(codes, scales). MX: codes shaped like ``x`` (MXINT: int8 k; MXFP: uint8 bit patterns, sign at bit d-1),
    scales uint8 E8M0 (x's shape with dim ``axis`` = ceil(n/b)). int: int8 codes, float32 scales (dim ``axis`` = 1
    per channel, ceil(n/b) per group). none: (float32 copy of x, None)."""
    fmt = parse_format(fmt)
    x = np.asarray(x, dtype=np.float32)
    return (x.copy(), None) if fmt.kind == "none" else _quantize(x, fmt, axis)


def dequantize(codes: np.ndarray, scales: np.ndarray | None, fmt: str | MXFormat, axis: int = -1) -> np.ndarray:
    """Inverse of ``quantize``: ``dequantize(*quantize(x, f, a), f, a)`` equals ``quantize_dequantize(x, f, a)``
    bit for bit. Codes outside the format's range raise ``InputError``."""
    fmt = parse_format(fmt)
    return np.array(codes, dtype=np.float32) if fmt.kind == "none" else _dequantize(codes, scales, fmt, axis)
