"""The ONNX function bodies of the com.mxonnx ops, run by stock onnxruntime (native library NOT registered), equal
mxonnx.formats bit for bit; NaN is compared by position (payloads are not part of the format)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from mxonnx import formats
from mxonnx.ops import functions, packing, schema
from mxonnx.session import create_session

FAMILIES = list(formats.MX_ELEMENTS)
BLOCKS = [2, 32, 128, 1024]


def _model(node: onnx.NodeProto, fmt: str, inputs, rank: int, initializers=()) -> onnx.ModelProto:
    node.overload = schema.overload(fmt)
    graph = helper.make_graph([node], "op_test", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * rank)],
                              initializer=list(initializers))
    model = helper.make_model(graph, ir_version=schema.IR_VERSION, functions=[functions.function_proto(node.op_type, fmt)],
                              opset_imports=[helper.make_opsetid("", schema.STANDARD_OPSET),
                                             helper.make_opsetid(schema.DOMAIN, schema.DOMAIN_VERSION)])
    onnx.checker.check_model(model, full_check=True)
    return model


def qdq_model(fmt: str, axis: int | None, rank: int) -> onnx.ModelProto:
    attrs = {"format": fmt} if axis is None else {"format": fmt, "axis": axis}
    node = helper.make_node(schema.QUANTIZE_DEQUANTIZE, ["x"], ["y"], domain=schema.DOMAIN, **attrs)
    return _model(node, fmt, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None] * rank)], rank)


def dequantize_model(codes: np.ndarray, exponents: np.ndarray, fmt: str, axis: int) -> onnx.ModelProto:
    node = helper.make_node(schema.DEQUANTIZE, ["codes", "exponents"], ["y"], domain=schema.DOMAIN, format=fmt,
                            axis=axis)
    tensors = [ir.serde.serialize_tensor(packing.code_tensor(codes, fmt, "codes")),
               ir.serde.serialize_tensor(packing.scale_tensor(exponents, fmt, "exponents"))]
    return _model(node, fmt, [], codes.ndim, tensors)


def run_qdq(x: np.ndarray, fmt: str, axis: int | None) -> np.ndarray:
    session = create_session(qdq_model(fmt, axis, x.ndim).SerializeToString(), threads=1, use_native=False)
    return session.run(None, {"x": x})[0]


def run_dequantize(codes: np.ndarray, exponents: np.ndarray, fmt: str, axis: int) -> np.ndarray:
    model = dequantize_model(codes, exponents, fmt, axis)
    return create_session(model.SerializeToString(), threads=1, use_native=False).run(None, {})[0]


def assert_same_bits(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.dtype == np.float32 and actual.shape == expected.shape
    nan = np.isnan(expected)
    np.testing.assert_array_equal(np.isnan(actual), nan)
    differ = np.flatnonzero(actual[~nan].view(np.uint32) != expected[~nan].view(np.uint32))
    assert differ.size == 0, f"{differ.size} differ, e.g. {actual[~nan][differ[:4]]} vs {expected[~nan][differ[:4]]}"


def adversarial(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Rows at scales 2^-150..2^127 mixed with grid ties (odd multiples of 2^-9), exact powers of two, zeros,
    float32 subnormals and values near the float32 maximum."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    rows = x.reshape(-1, shape[-1])
    rows *= np.ldexp(1.0, rng.integers(-150, 120, (rows.shape[0], 1))).astype(np.float32)
    kind = rng.integers(0, 20, shape)
    x = np.where(kind == 0, (2 * rng.integers(-300, 300, shape) + 1) / np.float32(512), x)
    x = np.where(kind == 1, np.ldexp(np.float32(1), rng.integers(-149, 128, shape)), x)
    x = np.where(kind == 2, 0.0, x)
    x = np.where(kind == 3, rng.integers(-2**23, 2**23, shape) * np.float32(2**-149), x)
    x = np.where(kind == 4, rng.uniform(-3.4e38, 3.4e38, shape), x)
    return x.astype(np.float32)


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("family", FAMILIES)
def test_quantize_dequantize_matches_reference(family, block):
    fmt = f"{family}-{block}"
    x = adversarial((2, 3, 300), seed=block)  # 300: a partial last block for b = 32, 128, 1024
    assert_same_bits(run_qdq(x, fmt, -1), formats.quantize_dequantize(x, fmt, -1))
    w = adversarial((300, 6), seed=block + 1)
    assert_same_bits(run_qdq(w, fmt, 0), formats.quantize_dequantize(w, fmt, 0))


@pytest.mark.parametrize("fmt", ["mxint8-2", "mxint4-2", "mxfp4-2", "mxfp6e3m2-2", "mxfp8e4m3-2", "mxfp8e5m2-2"])
def test_block_maxima_at_and_below_every_power_of_two(fmt):
    """floor(log2 max) must be exact: each block is (m, m / 3) for m = 2^k and the float just below, k = -149..127,
    both signs; the float32 maximum and the smallest subnormal are included."""
    powers = np.ldexp(np.float32(1), np.arange(-149, 128)).astype(np.float32)
    below = np.nextafter(powers, np.float32(0))
    m = np.concatenate([powers, below[below > 0], [np.finfo(np.float32).max]])
    m = np.concatenate([m, -m]).astype(np.float32)
    x = np.stack([m, m / np.float32(3)], axis=-1)
    assert_same_bits(run_qdq(x, fmt, -1), formats.quantize_dequantize(x, fmt, -1))


@pytest.mark.parametrize("family", FAMILIES)
def test_every_grid_point_and_tie(family):
    """One block per value: every element of the grid and every midpoint between neighbours (ties round to even),
    scaled to the block's top exponent by a fixed partner element."""
    fmt = f"{family}-2"
    grid = np.unique(np.abs(formats.element_values(fmt)[np.isfinite(formats.element_values(fmt))]))
    points = np.concatenate([grid, (grid[1:] + grid[:-1]) / 2, grid * 1.0001, grid * 0.9999]).astype(np.float32)
    partner = np.float32(formats.parse_format(fmt).elem.max_norm)
    x = np.stack([np.concatenate([points, -points]), np.full(2 * points.size, partner)], axis=-1)
    x *= np.float32(2.0**-20)
    assert_same_bits(run_qdq(x, fmt, -1), formats.quantize_dequantize(x, fmt, -1))


def test_non_finite_blocks_and_zeros():
    """NaN or Inf make their block NaN only; all-zero blocks give +0; float32 subnormal blocks keep their grid."""
    x = np.zeros((5, 8), np.float32)
    x[0] = np.linspace(-3, 3, 8)
    x[0, 3] = np.nan
    x[1] = np.linspace(-1, 1, 8)
    x[1, 0] = -np.inf
    x[2] = -0.0
    x[3] = np.arange(8) * np.float32(2**-149) - np.float32(3 * 2**-149)
    x[4] = np.linspace(-3.4e38, 3.4e38, 8)
    for fmt in ("mxint8-4", "mxfp4-4", "mxfp8e5m2-8"):
        y = run_qdq(x, fmt, -1)
        assert_same_bits(y, formats.quantize_dequantize(x, fmt, -1))
        b = formats.parse_format(fmt).block_size
        assert np.isnan(y[0, :b]).all() and not np.isnan(y[0, b:]).any()
        assert not np.signbit(y[2]).any()


@pytest.mark.parametrize("axis", [0, 1, -2, None])
def test_middle_axes_and_default_axis(axis):
    x = adversarial((5, 37, 4, 3), seed=7)
    for fmt in ("mxint8-32", "mxfp4-2", "mxfp6e2m3-128"):
        expected = formats.quantize_dequantize(x, fmt, -1 if axis is None else axis)
        assert_same_bits(run_qdq(x, fmt, axis), expected)


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("family", FAMILIES)
def test_dequantize_matches_reference(family, block):
    fmt = f"{family}-{block}"
    w = adversarial((300, 6), seed=block + 2)
    w[np.isinf(w)] = 1.0
    codes, exponents = formats.quantize(w, fmt, axis=0)
    assert exponents.shape == schema.exponents_shape(w.shape, 0, block)
    y = run_dequantize(codes, exponents, fmt, 0)
    assert_same_bits(y, formats.dequantize(codes, exponents, fmt, axis=0))
    assert_same_bits(y, formats.quantize_dequantize(w, fmt, axis=0))


@pytest.mark.parametrize("family", FAMILIES)
def test_dequantize_every_code_and_exponent(family):
    """Every element code against every E8M0 exponent, 255 (NaN) included, along the last axis."""
    fmt = f"{family}-2"
    n = 2 ** formats.parse_format(fmt).elem.bits
    bit_patterns = np.arange(n)
    codes = np.where(bit_patterns >= n // 2, bit_patterns - n, bit_patterns) if "int" in family else bit_patterns
    codes = np.broadcast_to(codes, (256, n)).copy()
    exponents = np.repeat(np.arange(256, dtype=np.uint8)[:, None], n // 2, axis=1)
    y = run_dequantize(codes, exponents, fmt, -1)
    assert_same_bits(y, formats.dequantize(codes, exponents, fmt, axis=-1))


def test_packed_codes_take_their_bit_width():
    w = adversarial((256, 4), seed=3)
    w[~np.isfinite(w)] = 0
    for fmt, code_bytes in (("mxint4-128", 512), ("mxfp4-32", 512), ("mxint8-32", 1024), ("mxfp6e2m3-32", 1024)):
        codes, exponents = formats.quantize(w, fmt, axis=0)
        assert packing.code_tensor(codes, fmt, "c").nbytes == code_bytes
        assert packing.scale_tensor(exponents, fmt, "e").nbytes == exponents.size


def test_shape_inference_through_the_functions():
    model = qdq_model("mxint8-32", -1, 3)
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 64
    inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    assert inferred.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
