"""The native MX kernels (mxonnx/ops/native) against the numpy reference mxonnx.formats, bit for bit.

Each case is a one-node model run through ``mxonnx.session.create_session`` (which registers the library).
NaN is compared by position only (payloads are not part of the format)."""

from __future__ import annotations

import json
import os

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from mxonnx import formats
from mxonnx.ops import functions, schema
from mxonnx.ops.native import native_library_path
from mxonnx.session import create_session, session_options

if os.environ.get("MXONNX_NO_NATIVE") == "1" or native_library_path() is None:
    pytest.skip("native MX library not built (python -m mxonnx.ops.native build)", allow_module_level=True)

DOMAIN = "com.mxonnx"
FAMILIES = ["mxint2", "mxint3", "mxint4", "mxint5", "mxint6", "mxint7", "mxint8",
            "mxfp8e4m3", "mxfp8e5m2", "mxfp6e3m2", "mxfp6e2m3", "mxfp4"]
BLOCKS = [2, 32, 128, 1024]
CODE_TYPES = {**{f"mxint{d}": TensorProto.INT4 for d in (2, 3, 4)},
              **{f"mxint{d}": TensorProto.INT8 for d in (5, 6, 7, 8)},
              "mxfp4": TensorProto.UINT4}  # other MXFP: UINT8


def _model(nodes, inputs, initializers=(), with_functions: bool = False):
    """Serialized model; ``with_functions``: nodes name their format's FunctionProto (as saved graphs do)."""
    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, "native_test", inputs, [output], initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(DOMAIN, 1)],
                              ir_version=10)
    if with_functions:
        for node in model.graph.node:
            fmt = next(a.s.decode() for a in node.attribute if a.name == "format")
            node.overload = schema.overload(fmt)
            model.functions.append(functions.function_proto(node.op_type, fmt))
    return model.SerializeToString()


def qdq_model(fmt: str, axis: int | None, rank: int, dtype: int = TensorProto.FLOAT,
              with_functions: bool = False) -> bytes:
    attrs = {"format": fmt} if axis is None else {"format": fmt, "axis": axis}
    node = helper.make_node("MXQuantizeDequantize", ["x"], ["y"], domain=DOMAIN, **attrs)
    return _model([node], [helper.make_tensor_value_info("x", dtype, [None] * rank)], with_functions=with_functions)


def code_tensor(codes: np.ndarray, fmt: str, code_type: int | None = None) -> TensorProto:
    """Codes as the initializer MXDequantize reads (4-bit types packed two per byte by onnx)."""
    code_type = code_type or CODE_TYPES.get(fmt.split("-")[0], TensorProto.UINT8)
    if code_type in (TensorProto.INT4, TensorProto.UINT4):
        return helper.make_tensor("codes", code_type, codes.shape, codes.astype(np.int64).ravel().tolist())
    return numpy_helper.from_array(codes.astype(helper.tensor_dtype_to_np_dtype(code_type)), "codes")


def dequantize_model(fmt: str, axis: int | None, codes: np.ndarray, exponent_rank: int, code_type: int | None = None,
                     exponent_type: int = TensorProto.UINT8, with_functions: bool = False) -> bytes:
    attrs = {"format": fmt} if axis is None else {"format": fmt, "axis": axis}
    node = helper.make_node("MXDequantize", ["codes", "exponents"], ["y"], domain=DOMAIN, **attrs)
    inputs = [helper.make_tensor_value_info("exponents", exponent_type, [None] * exponent_rank)]
    return _model([node], inputs, [code_tensor(codes, fmt, code_type)], with_functions=with_functions)


def run_qdq(x: np.ndarray, fmt: str, axis: int | None = -1, threads: int = 1) -> np.ndarray:
    return create_session(qdq_model(fmt, axis, x.ndim), threads=threads).run(None, {"x": x})[0]


def run_dequantize(codes: np.ndarray, exponents: np.ndarray, fmt: str, axis: int | None = 0) -> np.ndarray:
    session = create_session(dequantize_model(fmt, axis, codes, exponents.ndim), threads=1)
    return session.run(None, {"exponents": exponents})[0]


def assert_same_bits(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.dtype == np.float32 and actual.shape == expected.shape
    nan = np.isnan(expected)
    np.testing.assert_array_equal(np.isnan(actual), nan)
    mismatch = np.flatnonzero(actual.view(np.uint32)[~nan] != expected.view(np.uint32)[~nan])
    assert mismatch.size == 0, f"{mismatch.size} values differ, first: {actual[~nan][mismatch[:5]]} " \
                               f"vs {expected[~nan][mismatch[:5]]}"


def awkward_values(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Normal values at scales 2^-150..2^127 per row, with ties of the element grids (odd multiples of 2^-8),
    exact powers of two, zeros, float32 subnormals and numbers near the float32 maximum mixed in."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    flat = x.reshape(-1, shape[-1])
    flat *= np.ldexp(np.float32(1), rng.integers(-130, 120, size=(flat.shape[0], 1))).astype(np.float32)
    picks = rng.random(x.shape)
    x = np.where(picks < 0.1, (2 * rng.integers(-200, 200, x.shape) + 1) / np.float32(256), x)
    x = np.where((picks >= 0.1) & (picks < 0.15), np.ldexp(np.float32(1), rng.integers(-149, 127, x.shape)), x)
    x = np.where((picks >= 0.15) & (picks < 0.2), 0.0, x)
    x = np.where((picks >= 0.2) & (picks < 0.23), rng.integers(-2**23, 2**23, x.shape) * np.float32(2**-149), x)
    x = np.where((picks >= 0.23) & (picks < 0.25), rng.uniform(-3.4e38, 3.4e38, x.shape), x)
    return x.astype(np.float32)


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("family", FAMILIES)
def test_quantize_dequantize_matches_reference(family, block):
    fmt = f"{family}-{block}"
    x = awkward_values((2, 3, 300), seed=block)  # 300: partial last block for b = 32, 128, 1024
    assert_same_bits(run_qdq(x, fmt, -1), formats.quantize_dequantize(x, fmt, -1))
    w = awkward_values((300, 6), seed=block + 1)
    assert_same_bits(run_qdq(w, fmt, 0), formats.quantize_dequantize(w, fmt, 0))


@pytest.mark.parametrize("axis", [0, 1, -2])
def test_quantize_dequantize_middle_axes(axis):
    x = awkward_values((5, 37, 4, 3))
    for fmt in ("mxint8-32", "mxfp4-2", "mxfp6e2m3-128"):
        assert_same_bits(run_qdq(x, fmt, axis), formats.quantize_dequantize(x, fmt, axis))


def test_axis_attribute_defaults_to_last():
    x = awkward_values((4, 64))
    assert_same_bits(run_qdq(x, "mxint4-32", None), formats.quantize_dequantize(x, "mxint4-32", -1))


def test_special_blocks():
    """NaN or Inf poison their block only; zeros stay +0; float32 subnormals and huge values keep their grid."""
    x = np.zeros((6, 32), np.float32)
    x[0] = np.linspace(-3, 3, 32)
    x[0, 5] = np.nan
    x[1] = np.linspace(-1e38, 3.4e38, 32)
    x[1, 7] = -np.inf
    x[2] = -0.0
    x[3] = np.arange(-16, 16) * np.float32(2**-149)  # subnormals only
    x[4] = np.ldexp(np.float32(1), np.linspace(-149, 126, 32).round().astype(int))  # exact powers of two
    x[5] = np.float32(3.4028235e38) * np.linspace(-1, 1, 32, dtype=np.float32)
    for family in FAMILIES:
        fmt = f"{family}-32"
        y = run_qdq(x, fmt)
        assert_same_bits(y, formats.quantize_dequantize(x, fmt))
        assert np.isnan(y[:2]).all() and np.isfinite(y[2:]).all()
        assert (y[2].view(np.uint32) == 0).all()
        assert y[4, -1] == x[4, -1]  # the block maximum, a power of two, is on every grid


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.filterwarnings("ignore:overflow encountered")  # the reference reaches inf at E8M0 code 254
def test_every_code_decodes_like_reference(family):
    """Every d-bit code at several block exponents, including the E8M0 extremes and NaN (255)."""
    fmt = f"{family}-2"
    bits = formats.parse_format(fmt).bits
    codes = np.arange(2**bits)
    codes = (np.where(codes >= 2 ** (bits - 1), codes - 2**bits, codes) if family.startswith("mxint") else codes)
    codes = np.tile(codes.astype(np.int64), 6).reshape(-1, 1)
    exponents = np.resize(np.array([0, 1, 100, 127, 254, 255], np.uint8), (codes.shape[0] // 2, 1))
    assert_same_bits(run_dequantize(codes, exponents, fmt, 0), formats.dequantize(codes, exponents, fmt, 0))


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("family", FAMILIES)
def test_dequantize_matches_reference(family, block):
    fmt = f"{family}-{block}"
    rng = np.random.default_rng(block)
    w = (rng.standard_normal((300, 7)) * np.float32(2.0 ** rng.integers(-20, 20))).astype(np.float32)
    codes, exponents = formats.quantize(w, fmt, 0)  # 2100 codes; odd rows of 7 exercise nibble packing
    y = run_dequantize(codes, exponents, fmt, 0)
    assert_same_bits(y, formats.dequantize(codes, exponents, fmt, 0))
    assert_same_bits(y, formats.quantize_dequantize(w, fmt, 0))


@pytest.mark.parametrize("fmt", ["mxint4-32", "mxfp4-128", "mxint8-2", "mxfp8e5m2-32"])
def test_dequantize_batched_last_axis(fmt):
    x = awkward_values((2, 3, 45), seed=3)
    x[~np.isfinite(x)] = 1.0
    codes, exponents = formats.quantize(x, fmt, -1)
    assert_same_bits(run_dequantize(codes, exponents, fmt, -1), formats.quantize_dequantize(x, fmt, -1))


def test_multithreaded_matches_single_thread():
    """[512, 576] activations and a [576, 1536] weight are split over the intra-op pool."""
    x = awkward_values((512, 576), seed=7)
    for fmt, axis in (("mxint8-128", -1), ("mxfp4-32", 0)):
        assert_same_bits(run_qdq(x, fmt, axis, threads=2), formats.quantize_dequantize(x, fmt, axis))
    w = np.random.default_rng(8).standard_normal((576, 1536)).astype(np.float32)
    codes, exponents = formats.quantize(w, "mxint4-128", 0)
    session = create_session(dequantize_model("mxint4-128", 0, codes, 2), threads=2)
    assert_same_bits(session.run(None, {"exponents": exponents})[0], formats.quantize_dequantize(w, "mxint4-128", 0))


def test_empty_tensors():
    assert run_qdq(np.zeros((0, 64), np.float32), "mxint8-32").shape == (0, 64)
    assert run_qdq(np.zeros((3, 0), np.float32), "mxint8-32").shape == (3, 0)
    assert run_dequantize(np.zeros((0, 4), np.int8), np.zeros((0, 4), np.uint8), "mxint8-32", 0).shape == (0, 4)


# ---------------------------------------------------------------- against the ONNX function bodies

def _run_both(model: bytes, feeds: dict) -> tuple[np.ndarray, np.ndarray]:
    """(native output, function-body output) of a model holding the functions."""
    native = create_session(model, threads=1).run(None, feeds)[0]
    body = create_session(model, threads=1, use_native=False).run(None, feeds)[0]
    return native, body


@pytest.mark.parametrize("fmt", [f"{family}-32" for family in FAMILIES] + ["mxint4-2", "mxfp4-128", "mxint8-1024"])
def test_matches_function_bodies(fmt):
    x = awkward_values((3, 4, 70), seed=11)
    native, body = _run_both(qdq_model(fmt, -1, 3, with_functions=True), {"x": x})
    assert_same_bits(native, body)
    native, body = _run_both(qdq_model(fmt, 1, 3, with_functions=True), {"x": x})
    assert_same_bits(native, body)
    x[~np.isfinite(x)] = 0.0
    codes, exponents = formats.quantize(x, fmt, 1)
    native, body = _run_both(dequantize_model(fmt, 1, codes, 3, with_functions=True), {"exponents": exponents})
    assert_same_bits(native, body)


def test_native_kernel_replaces_function_body(tmp_path):
    """With the library registered, a node that names its FunctionProto still runs as one native kernel."""
    options = session_options(threads=1)
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / "profile")
    session = ort.InferenceSession(qdq_model("mxint8-32", -1, 2, with_functions=True), options,
                                   providers=["CPUExecutionProvider"])
    session.run(None, {"x": np.ones((2, 64), np.float32)})
    events = json.loads(Path(session.end_profiling()).read_text())
    ops = {e["args"]["op_name"] for e in events if e.get("cat") == "Node" and "op_name" in e.get("args", {})}
    assert ops == {"MXQuantizeDequantize"}


# ---------------------------------------------------------------- errors are onnxruntime errors, never crashes

@pytest.mark.parametrize("fmt", ["mxint9-32", "mxint4-3", "mxint4-2048", "mxfp5-32", "int8", "mxint4", "mxint4-"])
def test_bad_format_is_refused(fmt):
    with pytest.raises(Exception, match="unknown MX format"):
        create_session(qdq_model(fmt, -1, 2))


def test_missing_format_is_refused():
    node = helper.make_node("MXQuantizeDequantize", ["x"], ["y"], domain=DOMAIN)
    model = _model([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])])
    with pytest.raises(Exception, match="missing string attribute 'format'"):
        create_session(model)


def test_axis_out_of_range_is_an_error():
    session = create_session(qdq_model("mxint8-32", 2, 2))
    with pytest.raises(Exception, match="axis 2 is out of range for rank 2"):
        session.run(None, {"x": np.ones((2, 4), np.float32)})
    codes, exponents = formats.quantize(np.ones((4, 4), np.float32), "mxint8-32", 0)
    with pytest.raises(Exception, match="axis -3 is out of range"):
        run_dequantize(codes, exponents, "mxint8-32", -3)


def test_wrong_types_are_errors():
    with pytest.raises(Exception, match="(?i)type"):
        create_session(qdq_model("mxint8-32", -1, 2, dtype=TensorProto.DOUBLE))
    codes, exponents = formats.quantize(np.ones((8, 4), np.float32), "mxint4-32", 0)
    session = create_session(dequantize_model("mxint4-32", 0, codes, 2, code_type=TensorProto.INT8))
    with pytest.raises(Exception, match="codes of mxint4 must be int4"):
        session.run(None, {"exponents": exponents})
    with pytest.raises(Exception, match="(?i)type"):
        create_session(dequantize_model("mxint4-32", 0, codes, 2, exponent_type=TensorProto.INT8))


def test_wrong_exponent_shape_is_an_error():
    codes, exponents = formats.quantize(np.ones((70, 4), np.float32), "mxfp4-32", 0)
    session = create_session(dequantize_model("mxfp4-32", 0, codes, 2))
    for bad in (exponents[:2], exponents[:, :3]):
        with pytest.raises(Exception, match="exponents shape does not match"):
            session.run(None, {"exponents": np.ascontiguousarray(bad)})
