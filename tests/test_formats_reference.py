"""The vectorised quantizers of mxonnx.formats against a deliberately plain reference written here.

The reference works one block at a time in Python floats (doubles): x / 2^E, the element grid and the product
back are all exact in double precision, and the exponent comes from math.frexp. Results must agree bit for bit
(NaN payloads aside), codes and exponents included, on random and adversarial inputs.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest

from mxonnx import formats

MX_FORMATS = ["mxint8-8", "mxint4-4", "mxint3-2", "mxint2-4", "mxfp8e4m3-8", "mxfp8e5m2-4", "mxfp6e3m2-4",
              "mxfp6e2m3-2", "mxfp4-4", "mxfp4-32", "mxint8-32", "mxint4-128"]
INT_FORMATS = ["int8", "int4", "int2", "int4-g4", "int8-g2", "int3-g8"]


# ---------------------------------------------------------------- the reference

def ref_floor_log2(m: float) -> int:
    return math.frexp(m)[1] - 1  # m = f * 2^k with 0.5 <= f < 1


def ref_element(v: float, elem: formats.ElemFormat) -> float:
    """Round one scaled element to the minifloat grid, half to even, saturating; zero is +0."""
    if v == 0:
        return 0.0
    e = max(ref_floor_log2(abs(v)), elem.emin)
    step = 2.0 ** (e - elem.mbits)
    k = round(abs(v) / step)  # Python's round() is half to even; abs(v) / step is exact
    magnitude = min(k * step, elem.max_norm)
    return math.copysign(magnitude, v) if magnitude else 0.0


def ref_element_code(q: float, elem: formats.ElemFormat) -> int:
    if elem.integer_codes:
        return int(q * 2**elem.mbits)
    sign = 1 if q < 0 else 0
    a = abs(q)
    if a < 2.0**elem.emin:
        field, mantissa = 0, int(a / 2.0 ** (elem.emin - elem.mbits))
    else:
        e = ref_floor_log2(a)
        field, mantissa = e - elem.emin + 1, int((a / 2.0**e - 1) * 2**elem.mbits)
    return (sign << (elem.bits - 1)) | (field << elem.mbits) | mantissa


def ref_mx_block(block: list[float], elem: formats.ElemFormat) -> tuple[list[float], list[int], int]:
    """(dequantized values, element codes, E8M0 code) of one block."""
    if not all(math.isfinite(v) for v in block):
        return [math.nan] * len(block), [0] * len(block), 255
    m = max(abs(v) for v in block)
    exponent = -127 if m == 0 else min(max(ref_floor_log2(m) - elem.emax, -127), 127)
    scale = 2.0**exponent
    grid = [ref_element(v / scale, elem) for v in block]
    return [q * scale for q in grid], [ref_element_code(q, elem) for q in grid], exponent + 127


def ref_int_block(block: list[float], bits: int) -> tuple[list[float], list[int], np.float32]:
    """Symmetric fixed point, float32 arithmetic as the format defines it: scale = max|x| / qmax."""
    qmax = 2 ** (bits - 1) - 1
    if not all(math.isfinite(v) for v in block):
        return [math.nan] * len(block), [0] * len(block), np.float32(np.nan)
    m = max(abs(v) for v in block)
    scale = np.float32(m) / np.float32(qmax)
    if scale == 0:  # all zeros, or an underflowing quotient
        scale = np.float32(1.0)
    codes = [min(max(round(float(np.float32(v) / scale)), -qmax), qmax) for v in block]
    return [float(np.float32(c) * scale) for c in codes], codes, scale


def ref_quantize(x: np.ndarray, name: str, axis: int):
    """(qdq, codes, scales) by looping over every block of a 2-D array along ``axis``."""
    fmt = formats.parse_format(name)
    moved = np.moveaxis(x, axis, -1)  # blocks run along the last axis of `moved`
    rows, n = moved.shape
    size = fmt.block_size or n
    nb = -(-n // size)
    qdq, codes = np.zeros_like(moved), np.zeros(moved.shape, np.int64)
    scales = np.zeros((rows, nb), np.float64)
    for r in range(rows):
        for j in range(nb):
            block = [float(v) for v in moved[r, j * size:(j + 1) * size]]
            block += [0.0] * (size - len(block))  # zero padding of the partial last block
            if fmt.kind == "mx":
                values, c, s = ref_mx_block(block, fmt.elem)
            else:
                values, c, s = ref_int_block(block, fmt.bits)
            width = min(size, n - j * size)
            qdq[r, j * size:j * size + width] = values[:width]
            codes[r, j * size:j * size + width] = c[:width]
            scales[r, j] = s
    return np.moveaxis(qdq, -1, axis), np.moveaxis(codes, -1, axis), np.moveaxis(scales, -1, axis)


# ---------------------------------------------------------------- inputs

def adversarial_rows(rng: np.random.Generator, width: int) -> np.ndarray:
    """Rows of hard cases: zeros, powers of two and their float32 neighbours over the whole float32 range,
    float32 subnormals and max, exact ties between grid points of several formats, NaN and Inf."""
    powers = np.ldexp(np.float32(1), np.arange(-149, 128)).astype(np.float32)
    below = np.nextafter(powers, np.float32(0))
    above = np.nextafter(powers, np.float32(np.inf))
    f32 = np.finfo(np.float32)
    specials = np.array([0.0, -0.0, f32.max, -f32.max, f32.tiny, f32.smallest_subnormal, 3 * f32.smallest_subnormal,
                         np.nextafter(f32.tiny, 0), 1.0, 1.5, 1.75, 1.875, 1.9375, 6.0, 7.5, 28.0, 448.0, 57344.0],
                        np.float32)
    # Halfway points between consecutive values of each element grid, at a few block scales.
    ties = []
    for elem in formats.ELEMENT_FORMATS.values():
        grid = np.unique(np.abs(formats.element_values(elem)[np.isfinite(formats.element_values(elem))]))
        mids = ((grid[1:] + grid[:-1]) / 2).astype(np.float32)
        for e in (-130, -3, 0, 5, 100):
            ties.append(np.ldexp(mids, e).astype(np.float32))
    pool = np.concatenate([powers, below, above, specials, *ties])
    pool = np.concatenate([pool, -pool])
    rows = [rng.choice(pool, size=(40, width))]
    # Blocks anchored by a maximum so the ties above sit exactly between grid points of that block.
    anchored = rng.choice(pool, size=(40, width))
    anchored[:, ::4] = rng.choice(np.array([1.0, 1.5, 1.75, 6.0, 7.5, 28.0, 448.0, 57344.0], np.float32), (40, 1))
    rows.append(anchored)
    rows.append(rng.standard_normal((20, width)).astype(np.float32) * np.float32(10.0) ** rng.integers(-40, 38, (20, 1)))
    rows.append(np.zeros((2, width), np.float32))
    special = rng.standard_normal((6, width)).astype(np.float32)
    special[0, 3], special[1, -1], special[2, 0], special[3, 5] = np.nan, np.inf, -np.inf, -np.nan
    rows.append(special)
    return np.concatenate(rows).astype(np.float32)


def tie_rows(name: str, width: int, rng: np.random.Generator) -> np.ndarray:
    """Blocks whose first element pins the scale to 2^E (MX: max_norm * 2^E; int: qmax * 2^E) and whose other
    elements lie exactly halfway between two grid points, for E from the bottom to the top of float32."""
    fmt = formats.parse_format(name)
    if fmt.kind == "mx":
        values = formats.element_values(fmt)
        grid = np.unique(np.abs(values[np.isfinite(values)]))
        top, exponents = fmt.elem.max_norm, (-127, -60, 0, 60, 127 - fmt.elem.emax)
    else:
        grid = np.arange(2 ** (fmt.bits - 1), dtype=np.float64)
        top, exponents = grid[-1], (-100, 0, 100)
    mids = (grid[1:] + grid[:-1]) / 2
    size = fmt.block_size or width
    rows = []
    for e in exponents:
        row = rng.choice(mids, (8, width)) * rng.choice([-1.0, 1.0], (8, width))
        row[:, ::size] = top
        rows.append(np.ldexp(row, e))
    return np.concatenate(rows).astype(np.float32)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal float32 bit patterns, every NaN counting as equal to every NaN."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    nan = np.isnan(a)
    return a.shape == b.shape and np.array_equal(nan, np.isnan(b)) and np.array_equal(
        np.where(nan, 0, a).view(np.int32), np.where(nan, 0, b).view(np.int32))


# ---------------------------------------------------------------- tests

@pytest.mark.parametrize("name", MX_FORMATS + INT_FORMATS)
@pytest.mark.parametrize("axis", [-1, 0])
@pytest.mark.filterwarnings("ignore:overflow encountered")  # int8: 127 * (float32 max / 127) rounds to Inf
def test_vectorised_matches_reference(name, axis):
    rng = np.random.default_rng(zlib.crc32(f"{name} {axis}".encode()))
    x = adversarial_rows(rng, 37)  # 37: every block size here leaves a partial last block
    if axis == 0:
        x = np.ascontiguousarray(x.T)
    want_qdq, want_codes, want_scales = ref_quantize(x, name, axis)
    assert same_bits(formats.quantize_dequantize(x, name, axis=axis), want_qdq)
    codes, scales = formats.quantize(x, name, axis=axis)
    np.testing.assert_array_equal(codes.astype(np.int64), want_codes)
    if formats.parse_format(name).kind == "mx":
        np.testing.assert_array_equal(scales, want_scales.astype(np.uint8))
    else:
        assert same_bits(scales, want_scales.astype(np.float32))


@pytest.mark.parametrize("name", MX_FORMATS + INT_FORMATS)
def test_exact_ties_match_reference(name):
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    x = tie_rows(name, 35, rng)
    want, want_codes, _ = ref_quantize(x, name, -1)
    assert same_bits(formats.quantize_dequantize(x, name), want)
    np.testing.assert_array_equal(formats.quantize(x, name)[0].astype(np.int64), want_codes)


@pytest.mark.parametrize("name", ["mxint8-4", "mxint4-4", "mxfp8e4m3-4", "mxfp8e5m2-4", "mxfp6e3m2-4",
                                  "mxfp6e2m3-4", "mxfp4-4"])
def test_every_float32_exponent_and_mantissa_prefix(name):
    """Every float32 with a random low mantissa, all 2^16 top-16-bit patterns (sign, exponent, 7 mantissa bits),
    each as an element of a block whose maximum is a fixed anchor, against the reference."""
    rng = np.random.default_rng(1)
    high = np.arange(2**16, dtype=np.uint32) << 16
    elements = (high | rng.integers(0, 2**16, high.size, dtype=np.uint32)).view(np.float32)
    elements = elements[np.isfinite(elements)]
    anchor = np.float32(2.0**60)  # the blocks' maximum unless an element is larger
    x = np.stack([elements, np.full_like(elements, anchor), -elements, np.zeros_like(elements)], axis=1)
    got = formats.quantize_dequantize(x, name)
    sample = rng.choice(len(x), 3000, replace=False)  # the reference is slow; elements sampled at random
    want, _, _ = ref_quantize(x[sample], name, -1)
    assert same_bits(got[sample], want)


def test_reference_agrees_with_hand_worked_block():
    """Sanity of the reference itself on the MXINT4 block worked out in test_formats.py."""
    values, codes, e8m0 = ref_mx_block([0.3, -1.2, 2.9, 0.0], formats.ELEMENT_FORMATS["int4"])
    assert (values, codes, e8m0) == ([0.5, -1.0, 3.0, 0.0], [1, -2, 6, 0], 128)
