"""The fused native op MXMatMul and the pass that makes it (passes/fuse_mx_matmul.py).

MXMatMul computes MatMul(MXQuantizeDequantize(X), MXDequantize(codes, exponents)) with another summation order
than onnxruntime's MatMul, so fused and unfused outputs agree within float32 summation error: every output must be
within TOLERANCE * (|Xq| @ |W|) of the unfused one (|Xq|, |W| the magnitudes of the quantized operands; the
rounding error of any order of a K-term sum is at most about K * 2^-24 times that, and random data stays far below).
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from mxonnx import formats
from mxonnx.ops import functions, packing, schema
from mxonnx.ops.native import native_library_path
from mxonnx.passes.fuse_mx_matmul import MATMUL, fuse_mx_matmuls, fused_model_bytes, matmul_function_proto
from mxonnx.session import EXTERNAL_DATA_FOLDER_CONFIG, create_session, session_options

if os.environ.get("MXONNX_NO_NATIVE") == "1" or native_library_path() is None:
    pytest.skip("native MX library not built (python -m mxonnx.ops.native build)", allow_module_level=True)

TOLERANCE = 1e-5
WEIGHT_FORMATS = ["mxint4-32", "mxint8-128", "mxfp4-32", "mxfp6e3m2-32", "mxfp6e2m3-64", "mxfp8e4m3-32",
                  "mxfp8e5m2-128", "mxint2-2", "mxint6-1024"]
ACT_FORMATS = ["none", "mxint8-32", "mxfp8e4m3-128"]
# X shapes [batch, seq, K] with M = batch * seq in {1, 7, 512}; K = 200 is no multiple of the blocks; N = 75 (odd:
# 4-bit rows start mid-byte) and 150 (a partial 64-column panel)
SHAPES = [((1, 1, 200), 150), ((1, 7, 200), 75), ((2, 256, 200), 150)]


def unfused_model(x_rank: int, codes: np.ndarray, exponents: np.ndarray, weights: str, acts: str) -> onnx.ModelProto:
    """MatMul(MXQuantizeDequantize(x), MXDequantize(codes, exponents)) as the rewrite pass writes it (with functions)."""
    nodes, x = [], "x"
    fmts = {schema.DEQUANTIZE: weights}
    if acts != "none":
        nodes.append(helper.make_node(schema.QUANTIZE_DEQUANTIZE, ["x"], ["xq"], domain=schema.DOMAIN, format=acts,
                                      axis=-1, overload=schema.overload(acts)))
        fmts[schema.QUANTIZE_DEQUANTIZE] = acts
        x = "xq"
    nodes.append(helper.make_node(schema.DEQUANTIZE, ["codes", "exponents"], ["w"], domain=schema.DOMAIN,
                                  format=weights, axis=0, overload=schema.overload(weights)))
    nodes.append(helper.make_node("MatMul", [x, "w"], ["y"], name="linear"))
    tensors = [ir.serde.serialize_tensor(packing.code_tensor(codes, weights, "codes")),
               ir.serde.serialize_tensor(packing.scale_tensor(exponents, weights, "exponents"))]
    graph = helper.make_graph(nodes, "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None] * x_rank)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * x_rank)],
                              initializer=tensors)
    return helper.make_model(graph, ir_version=schema.IR_VERSION,
                             functions=[functions.function_proto(op, f) for op, f in fmts.items()],
                             opset_imports=[helper.make_opsetid("", schema.STANDARD_OPSET),
                                            helper.make_opsetid(schema.DOMAIN, schema.DOMAIN_VERSION)])


def fused(model: onnx.ModelProto) -> onnx.ModelProto:
    graph = ir.serde.deserialize_model(model)
    fuse_mx_matmuls(graph)
    return ir.serde.serialize_model(graph)


def op_types(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def run(model: onnx.ModelProto, x: np.ndarray, threads: int = 2, use_native: bool = True) -> np.ndarray:
    return create_session(model.SerializeToString(), threads=threads, use_native=use_native).run(None, {"x": x})[0]


def assert_close(actual: np.ndarray, expected: np.ndarray, x: np.ndarray, codes, exponents, weights: str,
                 acts: str) -> None:
    """|actual - expected| <= TOLERANCE * (|Xq| @ |W|) elementwise."""
    xq = x if acts == "none" else formats.quantize_dequantize(x, acts, -1)
    w = formats.dequantize(codes, exponents, weights, 0)
    bound = TOLERANCE * (np.abs(xq.astype(np.float64)) @ np.abs(w.astype(np.float64)))
    assert actual.shape == expected.shape
    excess = np.abs(actual.astype(np.float64) - expected) - bound
    assert np.all(excess <= 0), f"{np.count_nonzero(excess > 0)} outputs off, worst by {excess.max():.3g}"


def weight_and_input(x_shape, n, weights, seed=0):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((x_shape[-1], n)) * 0.05).astype(np.float32)
    codes, exponents = formats.quantize(w, weights, 0)
    x = rng.standard_normal(x_shape).astype(np.float32)
    x[..., :3] *= 40  # outliers, as in LLM activations
    return x, codes, exponents


@pytest.mark.parametrize("acts", ACT_FORMATS)
@pytest.mark.parametrize("weights", WEIGHT_FORMATS)
def test_fused_matches_unfused(weights, acts):
    for i, (x_shape, n) in enumerate(SHAPES):
        x, codes, exponents = weight_and_input(x_shape, n, weights, seed=i)
        model = unfused_model(len(x_shape), codes, exponents, weights, acts)
        fused_model = fused(model)
        assert op_types(fused_model) == [MATMUL]
        expected = run(model, x)
        assert_close(run(fused_model, x), expected, x, codes, exponents, weights, acts)
        if x_shape[1] == 7:  # one thread: the same numbers whatever the split
            np.testing.assert_array_equal(run(fused_model, x, threads=1), run(fused_model, x))


@pytest.mark.parametrize("weights,acts", [("mxint4-128", "mxint8-128"), ("mxfp4-32", "none")])
def test_function_body_matches_native(weights, acts):
    """A fused graph stays portable: MXMatMul's ONNX function (no native library) gives the unfused numbers."""
    x, codes, exponents = weight_and_input((3, 5, 200), 75, weights)
    model = unfused_model(3, codes, exponents, weights, acts)
    fused_model = fused(model)
    onnx.checker.check_model(fused_model, full_check=True)
    np.testing.assert_array_equal(run(fused_model, x, use_native=False), run(model, x, use_native=False))
    assert_close(run(fused_model, x), run(model, x, use_native=False), x, codes, exponents, weights, acts)


def test_rank_one_and_empty_inputs():
    x, codes, exponents = weight_and_input((1, 1, 200), 150, "mxint4-32")
    model = fused(unfused_model(1, codes, exponents, "mxint4-32", "mxint8-32"))
    y = run(model, x.reshape(200))
    assert y.shape == (150,)
    model3 = fused(unfused_model(3, codes, exponents, "mxint4-32", "mxint8-32"))
    assert run(model3, np.zeros((2, 0, 200), np.float32)).shape == (2, 0, 150)


def test_nan_activation_block_gives_nan_rows():
    x, codes, exponents = weight_and_input((1, 4, 200), 150, "mxint4-32")
    x[0, 2, 5] = np.nan
    y = run(fused(unfused_model(3, codes, exponents, "mxint4-32", "mxint8-32")), x)
    assert np.isnan(y[0, 2]).all() and not np.isnan(y[0, [0, 1, 3]]).any()


def test_shape_mismatch_is_an_error():
    x, codes, exponents = weight_and_input((1, 3, 200), 150, "mxint4-32")
    session = create_session(fused(unfused_model(3, codes, exponents, "mxint4-32", "none")).SerializeToString())
    with pytest.raises(Exception, match="last dimension of X"):
        session.run(None, {"x": x[..., :199].copy()})


def test_bad_weight_format_is_refused():
    node = helper.make_node(MATMUL, ["x", "codes", "exponents"], ["y"], domain=schema.DOMAIN, weight_format="int4",
                            act_format="none")
    inputs = [helper.make_tensor_value_info(name, t, None) for name, t in
              [("x", TensorProto.FLOAT), ("codes", TensorProto.INT4), ("exponents", TensorProto.UINT8)]]
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, ir_version=schema.IR_VERSION,
                              opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(schema.DOMAIN, 1)])
    with pytest.raises(Exception, match="unknown MX format"):
        create_session(model.SerializeToString())


def test_function_body_is_standard_ops():
    proto = matmul_function_proto("mxint4-128", "mxint8-128")
    assert proto.overload == "mxint4-128+mxint8-128" and proto.node[-1].op_type == "MatMul"
    assert {n.domain for n in proto.node} == {""}
    assert matmul_function_proto("mxfp4-32", "none").overload == "mxfp4-32+none"


# ---------------------------------------------------------------- the pass on a quantized Llama

@pytest.fixture(scope="module")
def tiny_quantized(tiny_onnx, tmp_path_factory):
    from mxonnx.config import QuantizeConfig
    from mxonnx.quantize import quantize_model

    out = tmp_path_factory.mktemp("fused") / "w4a8"
    quantize_model(tiny_onnx, out, QuantizeConfig(weights="mxint4-32", acts="mxint8-32", method="rtn"))
    return out


def test_pass_fuses_exactly_the_quantized_linears(tiny_quantized):
    model = ir.load(tiny_quantized / "model.onnx")
    before = [(n.domain, n.op_type) for n in model.graph]
    fused_count = fuse_mx_matmuls(model)
    after = [(n.domain, n.op_type) for n in model.graph]
    dequantizers = before.count((schema.DOMAIN, schema.DEQUANTIZE))
    assert fused_count == dequantizers == 2 * 7 + 1  # and lm_head (W8A8 MXINT8-32 by default)
    assert after.count((schema.DOMAIN, MATMUL)) == fused_count
    assert after.count(("", "MatMul")) == before.count(("", "MatMul")) - fused_count > 0  # attention
    assert (schema.DOMAIN, schema.DEQUANTIZE) not in after
    # lm_head's fused MatMul gives the graph output
    logits = [(n.domain, n.op_type) for n in model.graph if "logits" in (v.name for v in n.outputs)]
    assert logits == [(schema.DOMAIN, MATMUL)]
    # every quantizer is folded into its readers, the shared ones (before q/k/v and gate/up) too
    assert before.count((schema.DOMAIN, schema.QUANTIZE_DEQUANTIZE)) == 2 * 4 + 1
    assert (schema.DOMAIN, schema.QUANTIZE_DEQUANTIZE) not in after
    assert fuse_mx_matmuls(model) == 0


def test_float_model_has_nothing_to_fuse(tiny_onnx):
    assert fused_model_bytes(tiny_onnx / "model.onnx") is None


def test_logits_fused_vs_unfused(tiny_quantized, monkeypatch):
    """OrtCausalLM with fuse=False runs the saved graph (native MXQuantizeDequantize / MXDequantize kernels and
    onnxruntime's MatMul), fuse=True the fused MXMatMul kernels: both really run, and agree to float rounding."""
    import mxonnx.passes.fuse_inference as fuse_pass
    from mxonnx.eval import OrtCausalLM

    calls = []
    real = fuse_pass.fused_model_bytes
    monkeypatch.setattr(fuse_pass, "fused_model_bytes", lambda path, *native: calls.append(path) or real(path, *native))
    ids = np.random.default_rng(0).integers(3, 96, size=(2, 33))
    unfused_lm = OrtCausalLM(tiny_quantized / "model.onnx")
    assert calls == []  # no silent rewrite
    fused_lm = OrtCausalLM(tiny_quantized / "model.onnx", fuse=True)
    assert len(calls) == 1
    expected = unfused_lm.logits(ids)
    actual = fused_lm.logits(ids)
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    decode = fused_lm.logits(ids[:, :1])  # M = 1 per sequence row: the GEMV kernels
    np.testing.assert_allclose(decode, unfused_lm.logits(ids[:, :1]), rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    assert (actual.argmax(-1) == expected.argmax(-1)).mean() > 0.99


def test_create_session_fuses_only_when_asked(tiny_quantized):
    with pytest.raises(ValueError, match="fuse"):
        create_session((tiny_quantized / "model.onnx").read_bytes(), fuse=True)


# ---------------------------------------------------------------- exactness of the native kernels (mx_gemv.h)

U = 2.0**-24  # unit roundoff of float32
ISAS = ["portable", "avx2", "avx512vnni"]  # MXONNX_NATIVE_ISA caps; a cap above the CPU falls back to what it has


def run_with_isa(model: onnx.ModelProto, x: np.ndarray, isa: str, monkeypatch, threads: int = 1) -> np.ndarray:
    monkeypatch.setenv("MXONNX_NATIVE_ISA", isa)  # read when the session creates its kernels
    try:
        return run(model, x, threads=threads)
    finally:
        monkeypatch.delenv("MXONNX_NATIVE_ISA")


def exact_product(x, codes, exponents, weights, acts):
    """MatMul(MXQDQ(x), MXDequantize(W)) in float64 (exact: the float32 products of MX values have few bits) and
    sum_k |xq_k w_kn|."""
    xq = (x if acts == "none" else formats.quantize_dequantize(x, acts, -1)).astype(np.float64)
    w = formats.dequantize(codes, exponents, weights, 0).astype(np.float64)
    return xq @ w, np.abs(xq) @ np.abs(w)


@pytest.mark.parametrize("weights,acts,k", [
    ("mxint4-16", "mxint8-16", 4096), ("mxint4-32", "mxint8-32", 4096), ("mxint4-128", "mxint8-128", 4096),
    ("mxint4-1024", "mxint8-1024", 4096), ("mxint4-128", "mxint8-32", 1023), ("mxint4-32", "mxint8-128", 577),
    ("mxfp4-32", "mxint8-32", 4095), ("mxint8-32", "mxint8-32", 4096), ("mxint8-1024", "mxint8-16", 1025),
    ("mxint4-128", "none", 4096), ("mxfp4-16", "none", 999), ("mxfp8e4m3-32", "mxint8-32", 2049),
    ("mxfp6e3m2-128", "none", 4096)])
def test_error_bound_at_large_k(weights, acts, k, monkeypatch):
    """|y - exact| <= (S_f + K / S + 2) * 2^-24 * sum_k |xq_k w_kn| for every ISA, M = 1 (GEMV) and M = 40 (GEMM):
    S the segment of constant exponents (min of the two blocks; the weight block on the float route), S_f = 0 on
    the integer route (MXINT activations, MXINT/MXFP4 weights: exact integer segment sums) and S on the float route
    (FMA within a block). The unfused graph (onnxruntime MatMul) is held to the same bound plus K * 2^-24."""
    n = 96  # one 64-column GEMV unit + a 32-column tail; three 32-column GEMM panels
    x, codes, exponents = weight_and_input((1, 40, k), n, weights, seed=k)
    wf = formats.parse_format(weights)
    integer = acts != "none" and (wf.elem.integer_codes or wf.elem.name == "e2m1")
    segment = min(wf.block_size, formats.parse_format(acts).block_size) if integer else wf.block_size
    bound_terms = (0 if integer else segment) + -(-k // segment) + 2
    exact, magnitude = exact_product(x, codes, exponents, weights, acts)
    model = unfused_model(3, codes, exponents, weights, acts)
    unfused = run(model, x, threads=1).astype(np.float64)
    assert np.all(np.abs(unfused - exact) <= (bound_terms + k) * U * magnitude)
    fused_model = fused(model)
    for isa in ISAS:
        for rows in (x[:, :1], x):
            y = run_with_isa(fused_model, np.ascontiguousarray(rows), isa, monkeypatch).astype(np.float64)
            err = np.abs(y - exact[:, : rows.shape[1]]) / np.maximum(magnitude[:, : rows.shape[1]], 1e-30)
            assert err.max() <= bound_terms * U, f"{isa}, M = {rows.shape[1]}: error {err.max() / U:.1f} u"


@pytest.mark.parametrize("weights,acts", [("mxint4-32", "mxint8-32"), ("mxint4-128", "mxint8-16"),
                                          ("mxfp4-32", "mxint8-32"), ("mxint8-64", "mxint8-64"),
                                          ("mxint2-2", "mxint8-2")])
def test_integer_route_is_the_same_bits_on_every_path(weights, acts, monkeypatch):
    """The integer route sums exact integers and then does the same float operations in the same order, so the
    portable, AVX2 and VNNI kernels, GEMV row by row and the GEMM, and 1 or 2 threads all give the same bits."""
    x, codes, exponents = weight_and_input((1, 37, 333), 200, weights, seed=3)
    model = fused(unfused_model(3, codes, exponents, weights, acts))
    reference = run_with_isa(model, x, "portable", monkeypatch)
    for isa in ISAS:
        np.testing.assert_array_equal(run_with_isa(model, x, isa, monkeypatch, threads=2), reference)
        rows = np.concatenate([run_with_isa(model, x[:, i:i + 1], isa, monkeypatch) for i in range(x.shape[1])], 1)
        np.testing.assert_array_equal(rows, reference)


@pytest.mark.parametrize("weights,acts", [("mxint4-16", "mxint8-16"), ("mxint4-128", "mxint8-32"),
                                          ("mxint8-32", "mxint8-32")])
def test_weight_scales_outside_the_normal_range(weights, acts, monkeypatch):
    """The GEMV builds a weight scale 2^(E - 127) u_w from E's bits when every exponent of a 64-column unit gives a
    normal float, and reads its table otherwise (NaN at 255, subnormal scales for the smallest E): units with such
    exponents give the portable loop's bits on every path, NaN exactly where the function body has it."""
    x, codes, exponents = weight_and_input((1, 3, 256), 192, weights, seed=11)
    exponents = exponents.copy()
    exponents[0, 5] = 255  # a NaN scale in the first unit
    exponents[1, 70] = 1  # subnormal scales in the second
    exponents[-1, 130] = 0
    model = unfused_model(3, codes, exponents, weights, acts)
    body = run(model, x, use_native=False)
    fused_model = fused(model)
    reference = run_with_isa(fused_model, x, "portable", monkeypatch)
    assert np.isnan(reference[..., 5]).all() and not np.isnan(reference[..., 64:]).any()
    np.testing.assert_array_equal(np.isnan(reference), np.isnan(body))
    for isa in ISAS:
        rows = np.concatenate([run_with_isa(fused_model, x[:, i:i + 1], isa, monkeypatch) for i in range(3)], 1)
        np.testing.assert_array_equal(rows, reference)
