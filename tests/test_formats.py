"""mxonnx.formats: names, hand-worked examples, properties (hypothesis), round trips, GPTQ helpers.

The bit-for-bit comparison with a plain reference implementation lives in test_formats_reference.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mxonnx import formats
from mxonnx.errors import InputError

MX_FAMILIES = ["mxint8", "mxint6", "mxint4", "mxint3", "mxint2", "mxfp8e4m3", "mxfp8e5m2", "mxfp6e3m2",
               "mxfp6e2m3", "mxfp4"]
MX_NAMES = [f"{family}-{b}" for family in MX_FAMILIES for b in (2, 4, 32)]
INT_NAMES = ["int8", "int4", "int2", "int8-g4", "int4-g32", "int3-g2"]
ALL_NAMES = MX_NAMES + INT_NAMES + ["none"]

# No shrinking phase: shrinking arrays of float32 can take minutes; a failure prints the unshrunk example.
PROPERTY = settings(max_examples=50, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate])
# Below float32 max / (1 + 2^-23): int8 dequantizes 127 * (max|x| / 127), which may round past float32 max to Inf.
BELOW_INT_OVERFLOW = 1e38


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal float32 bit patterns, every NaN counting as equal to every NaN."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    nan = np.isnan(a)
    return a.shape == b.shape and np.array_equal(nan, np.isnan(b)) and np.array_equal(
        np.where(nan, 0, a).view(np.int32), np.where(nan, 0, b).view(np.int32))


def finite_arrays(min_magnitude: float = 0.0, max_magnitude: float = float(np.finfo(np.float32).max),
                  max_side: int = 24):
    """float32 arrays of one or two dimensions; nonzero elements' magnitudes within the bounds."""
    low, high = float(np.float32(min_magnitude)), float(np.float32(max_magnitude))
    value = st.floats(low, high, width=32) | st.floats(-high, -low, width=32) | st.just(0.0)
    shape = hnp.array_shapes(min_dims=1, max_dims=2, min_side=1, max_side=max_side)
    return hnp.arrays(np.float32, shape, elements=value)


# ---------------------------------------------------------------- names

@pytest.mark.parametrize("name, kind, elem, bits, block, bpw", [
    ("mxint4-128", "mx", "int4", 4, 128, 4.0625),
    ("MXINT8-32", "mx", "int8", 8, 32, 8.25),
    ("mxfp4-32", "mx", "e2m1", 4, 32, 4.25),
    ("mxfp8e4m3-1024", "mx", "e4m3", 8, 1024, 8 + 8 / 1024),
    ("mxfp6e2m3-2", "mx", "e2m3", 6, 2, 10.0),
    ("int8", "int", None, 8, None, 8.0),
    ("Int4-G128", "int", None, 4, 128, 4.25),
    ("none", "none", None, 32, None, 32.0),
])
def test_parse_format(name, kind, elem, bits, block, bpw):
    fmt = formats.parse_format(name)
    assert (fmt.name, fmt.kind, fmt.elem.name if fmt.elem else None) == (name.lower(), kind, elem)
    assert (fmt.bits, fmt.block_size, fmt.is_mx) == (bits, block, kind == "mx")
    assert fmt.bits_per_weight == formats.bits_per_weight(name) == bpw
    assert formats.parse_format(fmt) is fmt


@pytest.mark.parametrize("name, problem", [
    ("mxint9-32", "9 bits"), ("mxint1-32", "1 bits"), ("int9", "9 bits"), ("mxint4-48", "block size 48"),
    ("mxint4-2048", "block size 2048"), ("mxint4-1", "block size 1"), ("int4-g3", "block size 3"),
    ("mxfp5-32", "unknown"), ("mxint4", "unknown"), ("fp8", "unknown"), ("", "unknown"), ("int4-128", "unknown"),
])
def test_bad_format_names_name_the_valid_choices(name, problem):
    with pytest.raises(InputError, match=problem) as info:
        formats.parse_format(name)
    assert isinstance(info.value, ValueError)
    assert "mxint{2..8}-{b}" in str(info.value) and "power of two in 2..1024" in str(info.value)
    assert "\n" not in str(info.value)


def test_describe_formats_lists_every_family():
    rows = formats.describe_formats()
    names = [r["name"] for r in rows]
    for family in formats.MX_ELEMENTS:
        assert f"{family}-32" in names and f"{family}-128" in names
    assert {"mxint4-16", "int8", "int4", "int4-g128", "none"} <= set(names)
    for row in rows:
        assert row["bits_per_weight"] == formats.bits_per_weight(row["name"]) and row["description"]


def test_element_table_rows_are_consistent():
    for elem in formats.ELEMENT_FORMATS.values():
        assert elem.bits == 1 + elem.ebits + elem.mbits
        values = formats.element_values(elem)
        assert np.nanmax(values) == elem.max_norm
        # MXINT's unused pattern -2^(d-1) keeps its two's complement value one step below -max_norm.
        lowest = -elem.max_norm - (2.0**-elem.mbits if elem.integer_codes else 0)
        assert np.nanmin(values) == lowest
        assert 2.0**elem.emax <= elem.max_norm < 2.0 ** (elem.emax + 1)


# ---------------------------------------------------------------- worked examples (by hand)

def test_mxint4_block_worked_by_hand():
    # max 2.9 -> floor(log2) = 1, emax 0 -> E = 1 (E8M0 128); x / 2 = [0.15, -0.6, 1.45, 0] on a grid of 1/4:
    # k = [0.6 -> 1, -2.4 -> -2, 5.8 -> 6, 0]; values k / 4 * 2 = [0.5, -1, 3, 0].
    x = np.array([0.3, -1.2, 2.9, 0.0], np.float32)
    codes, scales = formats.quantize(x, "mxint4-4")
    assert codes.dtype == np.int8 and codes.tolist() == [1, -2, 6, 0]
    assert scales.dtype == np.uint8 and scales.tolist() == [128]
    assert formats.quantize_dequantize(x, "mxint4-4").tolist() == [0.5, -1.0, 3.0, 0.0]
    assert formats.shared_exponents(x, "mxint4-4").tolist() == [1]


def test_mxfp4_block_worked_by_hand():
    # Same block in E2M1: E = 1 - 2 = -1 (E8M0 126); x * 2 = [0.6, -2.4, 5.8, 0].
    # 0.6: subnormal range, step 0.5 -> 0.5 = 0b0001; -2.4: e = 1, step 1 -> -2 = 0b1100;
    # 5.8: e = 2, step 2 -> 6 = 0b0111. Values / 2: [0.25, -1, 3, 0].
    x = np.array([0.3, -1.2, 2.9, 0.0], np.float32)
    codes, scales = formats.quantize(x, "mxfp4-4")
    assert codes.dtype == np.uint8 and codes.tolist() == [0b0001, 0b1100, 0b0111, 0b0000]
    assert scales.tolist() == [126]
    assert formats.quantize_dequantize(x, "mxfp4-4").tolist() == [0.25, -1.0, 3.0, 0.0]


def test_mxfp4_ties_round_half_to_even():
    # max 5 -> E = 0. 0.25 = half of step 0.5 -> 0; 0.75 = 1.5 steps -> 2 steps = 1.0 (0b0010);
    # -5 = 2.5 steps of 2 -> 2 steps = -4 (0b1110).
    x = np.array([1.0, 0.25, 0.75, -5.0], np.float32)
    codes, scales = formats.quantize(x, "mxfp4-4")
    assert codes.tolist() == [0b0010, 0b0000, 0b0010, 0b1110] and scales.tolist() == [127]
    assert formats.quantize_dequantize(x, "mxfp4-4").tolist() == [1.0, 0.0, 1.0, -4.0]


def test_mxfp8e4m3_saturates_at_448():
    # max 1000 -> floor(log2) = 9, emax 8 -> E = 1; 500 = 15.625 steps of 32 -> 16 steps = 512 -> saturates to
    # 448 (0b0_1111_110); 0.5 = 2^-1 exactly (field -1 + 7 = 6: 0b0_0110_000).
    x = np.array([1000.0, 1.0], np.float32)
    codes, scales = formats.quantize(x, "mxfp8e4m3-2")
    assert codes.tolist() == [0x7E, 0x30] and scales.tolist() == [128]
    assert formats.quantize_dequantize(x, "mxfp8e4m3-2").tolist() == [896.0, 1.0]


def test_zero_and_partial_blocks():
    x = np.array([0.0, 0.0, 0.0, 0.0, 3.0], np.float32)  # blocks [0 0 0 0] [3 (0 0 0)]
    codes, scales = formats.quantize(x, "mxint8-4")
    assert scales.tolist() == [0, 128] and codes.tolist() == [0, 0, 0, 0, 96]  # 3 = 1.5 * 2, 1.5 * 64 = 96
    assert formats.quantize_dequantize(x, "mxint8-4").tolist() == x.tolist()


def test_int4_per_channel_worked_by_hand():
    # W[K=3, N=2], reduction axis 0: both columns have max 3.5 -> scale 0.5; codes x / 0.5 rounded half to even.
    w = np.array([[1.0, -3.5], [3.5, 0.25], [0.0, 0.75]], np.float32)
    codes, scales = formats.quantize(w, "int4", axis=0)
    assert codes.dtype == np.int8 and codes.tolist() == [[2, -7], [7, 0], [0, 2]]
    assert scales.dtype == np.float32 and scales.tolist() == [[0.5, 0.5]]
    assert formats.quantize_dequantize(w, "int4", axis=0).tolist() == [[1.0, -3.5], [3.5, 0.0], [0.0, 1.0]]


def test_int4_groups_worked_by_hand():
    # groups of 2 along the last axis: [7, -3.5] scale 1 -> [7, -4]; [1.75, 0.125] scale 0.25 -> [7, 0];
    # partial [14] scale 2 -> [7]. An all-zero group has scale 1.
    x = np.array([[7.0, -3.5, 1.75, 0.125, 14.0], [0, 0, 0, 0, 0]], np.float32)
    codes, scales = formats.quantize(x, "int4-g2")
    assert codes.tolist() == [[7, -4, 7, 0, 7], [0, 0, 0, 0, 0]]
    assert scales.tolist() == [[1.0, 0.25, 2.0], [1.0, 1.0, 1.0]]


def test_element_values_bit_layout():
    e2m1 = formats.element_values("mxfp4-32")
    assert e2m1.tolist()[:8] == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    assert e2m1[0b0111] == 6.0 and e2m1[0b1001] == -0.5
    e4m3 = formats.element_values("mxfp8e4m3-32")
    assert np.isnan(e4m3[0x7F]) and np.isnan(e4m3[0xFF]) and e4m3[0x7E] == 448.0 and e4m3[0x01] == 2.0**-9
    e5m2 = formats.element_values("mxfp8e5m2-32")
    assert e5m2[0x7B] == 57344.0 and np.isnan(e5m2[0x7C:0x80]).all() and e5m2[0x01] == 2.0**-16
    mxint4 = formats.element_values("mxint4-32")  # 4-bit two's complement k, value k / 4
    assert mxint4[0b0111] == 1.75 and mxint4[0b1001] == -1.75 and mxint4[0b1111] == -0.25
    with pytest.raises(InputError):
        formats.element_values("int4")


# ---------------------------------------------------------------- non-finite input

@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("name", ["mxint8-4", "mxfp4-4", "mxfp8e5m2-4", "int4-g4"])
def test_non_finite_poisons_only_its_block(bad, name):
    x = np.arange(1, 13, dtype=np.float32).reshape(1, 12)
    x[0, 5] = bad
    y = formats.quantize_dequantize(x, name)
    assert np.isnan(y[0, 4:8]).all() and not np.isnan(y[0, :4]).any() and not np.isnan(y[0, 8:]).any()
    clean = x.copy()
    clean[0, 4:8] = 0
    assert same_bits(y[0, :4], formats.quantize_dequantize(clean, name)[0, :4])
    codes, scales = formats.quantize(x, name)
    assert same_bits(formats.dequantize(codes, scales, name), y)
    if formats.parse_format(name).is_mx:
        assert scales.tolist()[0][1] == 255 and formats.shared_exponents(x, name)[0, 1] == 128


def test_check_finite():
    formats.check_finite(np.ones(3, np.float32), "w")
    with pytest.raises(InputError, match="weight q_proj holds NaN or Inf"):
        formats.check_finite(np.array([1.0, np.inf], np.float32), "weight q_proj")


# ---------------------------------------------------------------- properties

@PROPERTY
@given(x=finite_arrays(max_magnitude=BELOW_INT_OVERFLOW), name=st.sampled_from(MX_NAMES + INT_NAMES))
def test_idempotent(x, name):
    once = formats.quantize_dequantize(x, name)
    assert same_bits(formats.quantize_dequantize(once, name), once)


@PROPERTY
@given(x=finite_arrays(1e-20, 1e20), name=st.sampled_from(MX_NAMES + INT_NAMES), k=st.integers(-20, 20))
def test_power_of_two_scaling_commutes(x, name, k):
    scale = np.float32(2.0**k)
    assert same_bits(formats.quantize_dequantize(x * scale, name), formats.quantize_dequantize(x, name) * scale)


@PROPERTY
@given(x=finite_arrays(max_magnitude=BELOW_INT_OVERFLOW), name=st.sampled_from(MX_NAMES + INT_NAMES))
def test_sign_symmetric(x, name):
    np.testing.assert_array_equal(formats.quantize_dequantize(-x, name), -formats.quantize_dequantize(x, name))


@PROPERTY
@given(x=finite_arrays(max_magnitude=BELOW_INT_OVERFLOW), name=st.sampled_from(ALL_NAMES))
def test_zeros_are_positive(x, name):
    y = formats.quantize_dequantize(x, name)
    assert not np.signbit(y[y == 0]).any() or name == "none"


@PROPERTY
@given(a=finite_arrays(max_magnitude=BELOW_INT_OVERFLOW, max_side=8),
       b=finite_arrays(max_magnitude=BELOW_INT_OVERFLOW, max_side=8), name=st.sampled_from(MX_NAMES + INT_NAMES))
def test_blocks_are_independent(a, b, name):
    """Quantizing two arrays side by side along the block axis equals quantizing each (a is whole blocks)."""
    size = formats.parse_format(name).block_size
    if size is None:  # per-channel scales: the channels are the other axis
        a, b = a.reshape(-1, 1), np.resize(b.ravel(), (a.size, 1))
        joined, axis = np.concatenate([a, b], axis=1), 0
        parts = np.concatenate([formats.quantize_dequantize(a, name, 0), formats.quantize_dequantize(b, name, 0)], 1)
    else:
        a = np.resize(a.ravel(), size * 2)
        joined, axis = np.concatenate([a, b.ravel()]), -1
        parts = np.concatenate([formats.quantize_dequantize(a, name), formats.quantize_dequantize(b.ravel(), name)])
    assert same_bits(formats.quantize_dequantize(joined, name, axis), parts)


@PROPERTY
@given(x=finite_arrays(1e-30, 1e30), name=st.sampled_from(MX_NAMES))
def test_error_at_most_half_a_step_unless_saturated(x, name):
    """|qdq(x) - x| <= s/2 with s = 2^E * 2^(max(floor(log2|x / 2^E|), emin) - mbits); where |x| / 2^E exceeds
    max_norm the result is the saturated sign(x) * max_norm * 2^E."""
    fmt = formats.parse_format(name)
    elem, x1 = fmt.elem, x.reshape(-1)
    exponent = np.repeat(formats.shared_exponents(x1, fmt), fmt.block_size)[: x1.size].astype(np.float64)
    v = x1.astype(np.float64) / 2.0**exponent
    y = formats.quantize_dequantize(x1, fmt).astype(np.float64)
    _, e = np.frexp(np.abs(v))
    step = 2.0 ** (np.maximum(e - 1, elem.emin) - elem.mbits + exponent)
    saturated = np.abs(v) > elem.max_norm
    assert (np.abs(y - x1)[~saturated] <= step[~saturated] / 2).all()
    np.testing.assert_array_equal(y[saturated], np.sign(x1[saturated]) * elem.max_norm * 2.0 ** exponent[saturated])


@PROPERTY
@given(x=finite_arrays(max_magnitude=BELOW_INT_OVERFLOW), name=st.sampled_from(INT_NAMES))
def test_fixed_point_error_at_most_half_a_scale(x, name):
    """|qdq(x) - x| <= scale / 2, up to float32 rounding of x / scale and of the product."""
    y = formats.quantize_dequantize(x, name, axis=0).astype(np.float64)
    scales = formats.fixed_point_scales(x, name, axis=0).astype(np.float64)
    size = formats.parse_format(name).block_size or x.shape[0]
    per_element = np.repeat(scales, size, axis=0)[: x.shape[0]]
    assert (np.abs(y - x) <= per_element / 2 * (1 + 1e-6)).all()


@pytest.mark.parametrize("name", [f"{family}-1024" for family in MX_FAMILIES])
def test_every_grid_value_round_trips(name):
    """Every finite element value times 2^E is kept exactly, and encodes to its own code (-0 encodes as +0)."""
    fmt = formats.parse_format(name)
    table = formats.element_values(fmt)
    index = np.flatnonzero(np.isfinite(table) & (table >= -fmt.elem.max_norm))
    values = table[index]
    for exponent in (-127, -40, 0, 40, 127 - fmt.elem.emax):
        block = np.ldexp(np.concatenate([[fmt.elem.max_norm], values]), exponent).astype(np.float32)
        y = formats.quantize_dequantize(block, fmt)
        assert same_bits(y, block + np.float32(0))  # + 0 turns -0 into +0
        codes, scales = formats.quantize(block, fmt)
        assert (scales == exponent + 127).all()
        expected = np.where(values == 0, 0, index)
        got = codes[1:].astype(np.int64) & (2**fmt.bits - 1)
        np.testing.assert_array_equal(got, expected)


# ---------------------------------------------------------------- round trips and GPTQ helpers

@pytest.mark.parametrize("name", ALL_NAMES)
@pytest.mark.parametrize("shape, axis", [((5, 37), -1), ((37, 5), 0), ((3, 19, 4), 1), ((64,), 0), ((2, 3, 8), -1)])
def test_quantize_dequantize_round_trip(name, shape, axis):
    rng = np.random.default_rng(7)
    x = (rng.standard_normal(shape) * np.exp(3 * rng.standard_normal(shape))).astype(np.float32)
    x.flat[::11] = 0
    codes, scales = formats.quantize(x, name, axis=axis)
    assert codes.shape == x.shape
    fmt = formats.parse_format(name)
    if fmt.kind != "none":
        n = x.shape[axis]
        expected = list(x.shape)
        expected[axis] = -(-n // fmt.block_size) if fmt.block_size else 1
        assert scales.shape == tuple(expected)
        assert scales.dtype == (np.uint8 if fmt.is_mx else np.float32)
        assert codes.dtype == (np.uint8 if fmt.is_mx and not fmt.elem.integer_codes else np.int8)
    y = formats.quantize_dequantize(x, name, axis=axis)
    assert y.dtype == np.float32 and same_bits(formats.dequantize(codes, scales, name, axis=axis), y)


def test_dequantize_rejects_mismatched_scales_and_codes_out_of_range():
    codes, scales = formats.quantize(np.ones((4, 8), np.float32), "mxint4-4")
    with pytest.raises(InputError, match="scales have shape"):
        formats.dequantize(codes, scales[:, :1], "mxint4-4")
    with pytest.raises(InputError, match="mxint4-4 codes must lie in -8..7"):
        formats.dequantize(codes * 2, scales, "mxint4-4")
    with pytest.raises(InputError, match="mxfp4-4 codes must lie in 0..15"):
        formats.dequantize(np.full((4, 8), 16, np.uint8), scales, "mxfp4-4")


@pytest.mark.parametrize("name", ["mxint4-32", "mxfp4-4", "mxfp8e4m3-32", "mxint8-2"])
def test_quantize_with_given_exponent_matches(name):
    rng = np.random.default_rng(3)
    w = rng.standard_normal((70, 6)).astype(np.float32)  # weight [K, N], blocks along K
    fmt = formats.parse_format(name)
    exponent = formats.shared_exponents(w, fmt, axis=0)
    expanded = np.repeat(exponent, fmt.block_size, axis=0)[: w.shape[0]]
    assert same_bits(formats.quantize_dequantize_with_exponent(w, expanded, fmt),
                     formats.quantize_dequantize(w, fmt, axis=0))
    # One column at a time (GPTQ): the block's exponent is fixed even when the column exceeds the block maximum.
    column = w[:, 0] * 3
    y = formats.quantize_dequantize_with_exponent(column, expanded[:, 0], fmt)
    assert (np.abs(y) <= fmt.elem.max_norm * 2.0 ** expanded[:, 0]).all()
    huge = formats.quantize_dequantize_with_exponent(np.float32([3e38, -np.inf]), -127, fmt)
    assert huge.tolist() == [fmt.elem.max_norm * 2.0**-127, -fmt.elem.max_norm * 2.0**-127]
    with pytest.raises(InputError):
        formats.quantize_dequantize_with_exponent(w, expanded + 300, fmt)


@pytest.mark.parametrize("name", ["int4", "int8-g4", "int3-g32"])
def test_quantize_with_given_scale_matches(name):
    rng = np.random.default_rng(4)
    w = rng.standard_normal((70, 6)).astype(np.float32)
    fmt = formats.parse_format(name)
    scales = formats.fixed_point_scales(w, fmt, axis=0)
    expanded = np.repeat(scales, fmt.block_size or w.shape[0], axis=0)[: w.shape[0]]
    assert same_bits(formats.quantize_dequantize_with_scale(w, expanded, fmt),
                     formats.quantize_dequantize(w, fmt, axis=0))


def test_helpers_refuse_the_wrong_kind():
    x = np.ones(4, np.float32)
    with pytest.raises(InputError, match="not an mx format"):
        formats.shared_exponents(x, "int4")
    with pytest.raises(InputError, match="not an int format"):
        formats.fixed_point_scales(x, "mxint4-4")


def test_axis_out_of_range():
    with pytest.raises(InputError, match="axis 2"):
        formats.quantize_dequantize(np.ones((2, 2), np.float32), "mxint8-2", axis=2)


@pytest.mark.parametrize("name, axis", [("mxfp4-32", -1), ("mxint8-2", 0), ("int4", 0), ("int8-g128", -1)])
def test_large_arrays_chunked_on_threads_match_small_pieces(name, axis):
    """A 640 x 512 array spans several chunks (run on the thread pool); pieces of 8 rows or columns fit in one."""
    x = np.random.default_rng(5).standard_normal((640, 512)).astype(np.float32)
    whole = formats.quantize_dequantize(x, name, axis=axis)
    pieces = [formats.quantize_dequantize(part, name, axis=axis)
              for part in np.split(x, 64 if axis == 0 else 80, axis=1 - axis % 2)]
    assert same_bits(whole, np.concatenate(pieces, axis=1 - axis % 2))
