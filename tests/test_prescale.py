"""The MX element pre-scale p (issue 19 item 2, arXiv 2601.09555): elements Q(x fl(2^-E p)), values elem fl(2^E / p).

The numpy reference (mxonnx.formats), the ONNX function bodies on stock onnxruntime, the native kernels and the
fused MXMatMul agree; p = 1 is today's OCP behaviour bit for bit (and writes the same model bytes); ``mxonnx
quantize --weights-prescale/--acts-prescale`` round-trips through eval, GPTQ and AWQ+GPTQ, ``lower`` and ``inspect``.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper
from test_quantize import IDS, emulated_logits, folder_digest

from mxonnx import formats, gptq, prescale
from mxonnx.cli import main
from mxonnx.config import LM_HEAD_DEFAULT, QuantizeConfig
from mxonnx.eval import OrtCausalLM
from mxonnx.inspect import inspect_model
from mxonnx.lower import lower_model
from mxonnx.ops import functions, packing, schema
from mxonnx.ops.native import native_library_path
from mxonnx.passes.fuse_mx_matmul import fuse_mx_matmuls
from mxonnx.quantize import quantize_model
from mxonnx.session import create_session

FORMATS = ["mxfp4-32", "mxfp4-8", "mxint4-32", "mxfp8e4m3-16", "mxint8-128"]
PRESCALES = [0.75, 0.6, 0.95, 1.0]
needs_native = pytest.mark.skipif(native_library_path() is None, reason="native MX library not built")


def awkward(shape, seed=0) -> np.ndarray:
    """Normal values with outliers, exact zeros, a zero block, a tiny and a NaN element."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * np.exp(rng.standard_normal(shape))).astype(np.float32)
    x.reshape(-1)[:: 7] = 0.0
    x.reshape(-1)[:40] = 0.0
    x.reshape(-1)[50] = 1e-40
    x.reshape(-1)[-3] = np.nan
    return x


def assert_same_bits(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape
    np.testing.assert_array_equal(a.view(np.int32), b.view(np.int32))


# ---------------------------------------------------------------- numpy reference

@pytest.mark.parametrize("name", FORMATS)
def test_prescale_one_is_plain_ocp(name):
    x = awkward((96, 40))
    plain, one = formats.parse_format(name), formats.with_prescale(name, 1.0)
    assert not one.prescaled and one == plain
    assert_same_bits(formats.quantize_dequantize(x, one, 0), formats.quantize_dequantize(x, plain, 0))


@pytest.mark.parametrize("p", [0.75, 0.6])
@pytest.mark.parametrize("name", FORMATS)
def test_reference_formula(name, p):
    """Same exponents as OCP; elements = Q(x * fl(2^-E p)); values = elem * fl(2^E fl(1/p)); dequantize inverts."""
    x = awkward((64, 48), seed=1)
    fmt = formats.with_prescale(name, p)
    codes, exps = formats.quantize(x, fmt, 0)
    np.testing.assert_array_equal(exps, formats.quantize(x, name, 0)[1])
    y = formats.quantize_dequantize(x, fmt, 0)
    assert_same_bits(formats.dequantize(codes, exps, fmt, 0), y)
    e = np.repeat(exps.astype(np.int64) - 127, fmt.block_size, axis=0)[: len(x)]
    with np.errstate(over="ignore"):  # NaN blocks (E = 128) are set below
        inverse = np.ldexp(np.float32(1), -e).astype(np.float32) * np.float32(p)
        scale = np.ldexp(np.float32(1), e).astype(np.float32) * (np.float32(1) / np.float32(p))
    nan = exps[np.arange(len(x)) // fmt.block_size] == 255
    inverse[nan] = scale[nan] = np.nan
    elements = formats._round_to_grid(np.where(np.isnan(x), 0, x).astype(np.float32) * inverse, fmt.elem)
    assert_same_bits(elements * scale, y)


def test_mxfp4_block_maximum_no_longer_clips():
    """max|x| = 7.5 gives E = 0: plainly 7.5 saturates at 6; with p = 3/4 it becomes 5.625, rounds to the grid value
    6 and comes back as 6 * fl(4/3), nearer 7.5."""
    x = np.array([[7.5] + [0.1] * 31], np.float32)
    plain = formats.quantize_dequantize(x, "mxfp4-32", -1)[0, 0]
    scaled = formats.quantize_dequantize(x, formats.with_prescale("mxfp4-32", 0.75), -1)[0, 0]
    assert plain == 6.0
    assert scaled == np.float32(6) * (np.float32(1) / np.float32(0.75))
    assert abs(scaled - 7.5) < abs(plain - 7.5)


@pytest.mark.parametrize("bad", [0.5, 0.4, 1.01, 0.0, -0.75, float("nan")])
def test_prescale_range_is_checked(bad):
    with pytest.raises(formats.InputError, match="outside"):
        formats.with_prescale("mxfp4-32", bad)


def test_prescale_needs_an_mx_format():
    with pytest.raises(formats.InputError, match="only MX formats"):
        formats.with_prescale("int4-g32", 0.75)


def test_gptq_uses_the_prescaled_grid():
    """GPTQ's values sit on the pre-scaled grid: re-rounding them with their exponents changes nothing, and its
    Hessian-weighted error is below round to nearest's on the same grid."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((128, 48)).astype(np.float32)
    x = rng.standard_normal((1024, 128)).astype(np.float32)
    h = x.T.astype(np.float64) @ x / len(x)
    for name in ("mxfp4-32", "mxint4-32"):
        fmt = formats.with_prescale(name, 0.75)
        codes, exps = gptq.gptq_quantize(w, h, fmt, act_order=True)
        q = formats.dequantize(codes, exps, fmt, 0)
        e = np.repeat(exps.astype(np.int64) - 127, 32, axis=0)
        assert_same_bits(formats.quantize_dequantize_with_exponent(q, e, fmt), q)
        rtn = formats.quantize_dequantize(w, fmt, 0)
        assert prescale.weight_error(w, fmt, h) == pytest.approx(
            float(np.sum((h @ (w - rtn)) * (w - rtn))), rel=1e-5)
        assert np.sum((h @ (w - q)) * (w - q)) < np.sum((h @ (w - rtn)) * (w - rtn))


def test_search_picks_the_least_error():
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((64, 32)) * np.exp(rng.standard_normal((64, 32)))).astype(np.float32)
    fmt = formats.parse_format("mxfp4-32")
    candidates = (0.6, 0.75, 0.9, 1.0)
    p = prescale.choose_weight_prescale(w, fmt, candidates)
    errors = {float(np.float32(c)): prescale.weight_error(w, formats.with_prescale(fmt, c), None) for c in candidates}
    assert errors[p] == min(errors.values())
    x = rng.standard_normal((100, 64)).astype(np.float32) * 3
    pa = prescale.choose_act_prescale(x, fmt, candidates, [w])
    act_errors = {float(np.float32(c)): prescale.activation_error(x, formats.with_prescale(fmt, c), [w])
                  for c in candidates}
    assert act_errors[pa] == min(act_errors.values())


# ---------------------------------------------------------------- ops: function bodies, native kernels, MXMatMul

def op_model(fmt: formats.MXFormat, axis: int, codes=None, exps=None) -> onnx.ModelProto:
    """MXQuantizeDequantize(x) -> y and MXDequantize(codes, exps) -> w (when given) with their function bodies."""
    nodes = [helper.make_node(schema.QUANTIZE_DEQUANTIZE, ["x"], ["y"], domain=schema.DOMAIN,
                              overload=schema.overload(fmt), **schema.format_attributes(fmt, axis))]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    inits, funcs = [], [functions.function_proto(schema.QUANTIZE_DEQUANTIZE, fmt)]
    if codes is not None:
        nodes.append(helper.make_node(schema.DEQUANTIZE, ["codes", "exps"], ["w"], domain=schema.DOMAIN,
                                      overload=schema.overload(fmt), **schema.format_attributes(fmt, 0)))
        outputs.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, None))
        inits = [ir.serde.serialize_tensor(packing.code_tensor(codes, fmt, "codes")),
                 ir.serde.serialize_tensor(packing.scale_tensor(exps, fmt, "exps"))]
        funcs.append(functions.function_proto(schema.DEQUANTIZE, fmt))
    graph = helper.make_graph(nodes, "ops", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)], outputs,
                              initializer=inits)
    return helper.make_model(graph, ir_version=schema.IR_VERSION, functions=funcs,
                             opset_imports=[helper.make_opsetid("", schema.STANDARD_OPSET),
                                            helper.make_opsetid(schema.DOMAIN, schema.DOMAIN_VERSION)])


def run_ops(model: onnx.ModelProto, x: np.ndarray, use_native: bool) -> list[np.ndarray]:
    return create_session(model.SerializeToString(), threads=1, use_native=use_native).run(None, {"x": x})


@pytest.mark.parametrize("use_native", [False, pytest.param(True, marks=needs_native)])
@pytest.mark.parametrize("p", PRESCALES)
@pytest.mark.parametrize("name", FORMATS)
def test_ops_match_reference(name, p, use_native):
    """Function bodies (stock onnxruntime) and native kernels equal the numpy reference bit for bit."""
    fmt = formats.with_prescale(name, p)
    w = awkward((100, 24), seed=2)
    w[np.isnan(w)] = 0.0
    codes, exps = formats.quantize(w, fmt, 0)
    for axis, x in ((-1, awkward((3, 70), seed=4)), (0, awkward((70, 5), seed=5))):
        y, deq = run_ops(op_model(fmt, axis, codes, exps), x, use_native)
        assert_same_bits(y, formats.quantize_dequantize(x, fmt, axis))
        assert_same_bits(deq, formats.dequantize(codes, exps, fmt, 0))


def test_plain_models_keep_plain_bodies():
    """Without a pre-scale the function bodies are today's (no ``prescale`` attribute); with one, the body
    declares it with default 1."""
    plain = functions.function_proto(schema.QUANTIZE_DEQUANTIZE, "mxfp4-32")
    scaled = functions.function_proto(schema.QUANTIZE_DEQUANTIZE, formats.with_prescale("mxfp4-32", 0.75))
    assert schema.PRESCALE_ATTR not in [a.name for a in plain.attribute_proto]
    assert {a.name: a.f for a in scaled.attribute_proto}[schema.PRESCALE_ATTR] == 1.0
    assert plain.overload == scaled.overload == "mxfp4-32"


@needs_native
def test_native_refuses_a_prescale_out_of_range():
    model = op_model(formats.with_prescale("mxfp4-32", 0.75), -1)
    next(a for a in model.graph.node[0].attribute if a.name == schema.PRESCALE_ATTR).f = 1.5
    with pytest.raises(Exception, match="outside"):
        run_ops(model, np.ones((1, 32), np.float32), use_native=True)


def matmul_model(wf: formats.MXFormat, af: formats.MXFormat, codes, exps) -> onnx.ModelProto:
    nodes, x, funcs = [], "x", [functions.function_proto(schema.DEQUANTIZE, wf)]
    if af.kind == "mx":
        nodes.append(helper.make_node(schema.QUANTIZE_DEQUANTIZE, ["x"], ["xq"], domain=schema.DOMAIN,
                                      overload=schema.overload(af), **schema.format_attributes(af, -1)))
        funcs.append(functions.function_proto(schema.QUANTIZE_DEQUANTIZE, af))
        x = "xq"
    nodes += [helper.make_node(schema.DEQUANTIZE, ["codes", "exps"], ["w"], domain=schema.DOMAIN,
                               overload=schema.overload(wf), **schema.format_attributes(wf, 0)),
              helper.make_node("MatMul", [x, "w"], ["y"])]
    graph = helper.make_graph(nodes, "mm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=[ir.serde.serialize_tensor(packing.code_tensor(codes, wf, "codes")),
                                           ir.serde.serialize_tensor(packing.scale_tensor(exps, wf, "exps"))])
    return helper.make_model(graph, ir_version=schema.IR_VERSION, functions=funcs,
                             opset_imports=[helper.make_opsetid("", schema.STANDARD_OPSET),
                                            helper.make_opsetid(schema.DOMAIN, schema.DOMAIN_VERSION)])


@needs_native
@pytest.mark.parametrize("weights, acts", [(("mxfp4-32", 0.75), ("mxfp4-32", 0.75)),
                                           (("mxint4-32", 0.8), ("mxint8-32", 0.7)),
                                           (("mxfp4-32", 0.6), ("mxint8-32", 0.9)),
                                           (("mxfp4-32", 0.75), ("none", 1.0))])
@pytest.mark.parametrize("m", [1, 5, 64])
def test_fused_matmul_applies_both_factors(weights, acts, m):
    """MXMatMul (native; integer and float routes, GEMV and GEMM) within the stated reassociation bound
    (S_f + K/S + 6) 2^-24 sum|xq w| of the exact product of the reference operands; its function body likewise."""
    wf = formats.with_prescale(*weights)
    af = formats.with_prescale(*acts) if acts[0] != "none" else formats.parse_format("none")
    rng = np.random.default_rng(m)
    w = rng.standard_normal((200, 75)).astype(np.float32)
    x = (rng.standard_normal((m, 200)) * 3).astype(np.float32)
    codes, exps = formats.quantize(w, wf, 0)
    graph = ir.serde.deserialize_model(matmul_model(wf, af, codes, exps))
    assert fuse_mx_matmuls(graph) == 1
    fused = ir.serde.serialize_model(graph)
    node = fused.graph.node[0]
    assert node.op_type == "MXMatMul"
    attrs = {a.name: a.f for a in node.attribute if a.type == onnx.AttributeProto.FLOAT}
    assert attrs.get("weight_prescale", 1.0) == wf.prescale and attrs.get("act_prescale", 1.0) == af.prescale
    xq = formats.quantize_dequantize(x, af, -1).astype(np.float64)
    wq = formats.dequantize(codes, exps, wf, 0).astype(np.float64)
    exact, magnitude = xq @ wq, np.abs(xq) @ np.abs(wq)
    bound = (32 + 200 / 32 + 6) * 2.0**-24 * magnitude
    for use_native in (True, False):
        y = create_session(fused.SerializeToString(), threads=1, use_native=use_native).run(None, {"x": x})[0]
        assert np.all(np.abs(y - exact) <= bound), use_native


# ---------------------------------------------------------------- quantize, eval, lower, inspect

def quantize(src, out, **settings):
    quantize_model(src, out, QuantizeConfig(progress=False, **settings))
    return out


def test_rtn_round_trip_equals_emulation(tiny_hf, tiny_onnx, tmp_path):
    """W4A4 MXFP4-32 with p = 3/4 on both: logits equal the torch model with every linear's weight and input
    quantize-dequantized by the numpy reference (lm_head's default W8A8 MXINT8-32 without a pre-scale); native
    kernels and function bodies agree."""
    before = folder_digest(tiny_onnx)
    out = quantize(tiny_onnx, tmp_path / "q", weights="mxfp4-32", acts="mxfp4-32", method="rtn",
                   weights_prescale=0.75, acts_prescale=0.75)
    assert folder_digest(tiny_onnx) == before
    fmt = formats.with_prescale("mxfp4-32", 0.75)
    lm = OrtCausalLM(out / "model.onnx")
    logits = lm.logits(IDS)
    head = (LM_HEAD_DEFAULT, LM_HEAD_DEFAULT)
    np.testing.assert_allclose(logits, emulated_logits(tiny_hf, IDS, fmt, fmt, head), rtol=0, atol=1e-5)
    plain = emulated_logits(tiny_hf, IDS, "mxfp4-32", "mxfp4-32", head)
    assert np.abs(logits - plain).max() > 1e-3  # the pre-scale changes the numbers
    functions_only = create_session(out / "model.onnx", use_native=False).run(["logits"], lm.feed(IDS))[0]
    np.testing.assert_allclose(logits, functions_only, rtol=0, atol=1e-5)


def test_prescale_one_writes_the_same_bytes(tiny_onnx, tmp_path):
    settings = dict(weights="mxfp4-32", acts="mxfp4-32", method="rtn")
    plain = quantize(tiny_onnx, tmp_path / "plain", **settings)
    one = quantize(tiny_onnx, tmp_path / "one", weights_prescale=1.0, acts_prescale=1.0, **settings)
    for name in ("model.onnx", "model.onnx_data"):
        assert (plain / name).read_bytes() == (one / name).read_bytes()


@pytest.mark.parametrize("method", ["gptq", "awq+gptq"])
def test_searched_prescales_with_gptq(method, tiny_onnx, tiny_text, tmp_path, capsys):
    """Searched factors per tensor under GPTQ and AWQ+GPTQ: reported by quantize and inspect, within the
    candidates, and the model runs the same on native kernels and function bodies."""
    out = tmp_path / "q"
    candidates = "0.6,0.75,0.9,1"
    assert main(["quantize", str(tiny_onnx), "-o", str(out), "--method", method, "--weights", "mxfp4-32",
                 "--acts", "mxfp4-32", "--weights-prescale", "search", "--acts-prescale", "search",
                 "--prescale-candidates", candidates, "--calib", str(tiny_text), "--calib-samples", "8",
                 "--calib-seqlen", "64", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    chosen = {**report["weights_prescale"], **report["acts_prescale"]}
    assert len(report["weights_prescale"]) == 14 and len(report["acts_prescale"]) == 14
    assert set(chosen.values()) <= {float(np.float32(c)) for c in candidates.split(",")}
    info = inspect_model(out)
    by_name = {l["name"]: l for l in info["linears"]}
    for name, p in report["weights_prescale"].items():
        assert by_name[name]["weights_prescale"] == pytest.approx(p)
    for name, p in report["acts_prescale"].items():
        assert by_name[name]["acts_prescale"] == pytest.approx(p)
    lm = OrtCausalLM(out / "model.onnx")
    functions_only = create_session(out / "model.onnx", use_native=False).run(["logits"], lm.feed(IDS))[0]
    np.testing.assert_allclose(lm.logits(IDS), functions_only, rtol=0, atol=1e-5)


def test_inspect_reports_the_prescale(tiny_onnx, tmp_path, capsys):
    out = quantize(tiny_onnx, tmp_path / "q", weights="mxfp4-32", acts="mxfp4-32", method="rtn", weights_prescale=0.75)
    info = inspect_model(out)
    # the 14 decoder linears; lm_head's default MXINT8-32 takes no pre-scale
    assert info["prescales"]["weights"] == {"count": 14, "min": 0.75, "max": 0.75}
    assert info["prescales"]["acts"] == {"count": 0}
    assert info["formats"]["weights"] == {"mxfp4-32": 14, LM_HEAD_DEFAULT: 1}
    assert main(["inspect", str(out)]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("weights pre-scale"))
    assert line.split(None, 2)[2] == "p = 0.75 on 14 (values times 1/p)"
    plain = inspect_model(quantize(tiny_onnx, tmp_path / "plain", weights="mxfp4-32", acts="mxfp4-32", method="rtn"))
    assert "prescales" not in plain and "weights_prescale" not in plain["linears"][0]


@pytest.mark.filterwarnings("ignore:.*no genai_config.json written")
@pytest.mark.parametrize("weights, target", [("mxint4-32", "qdq"), ("mxint4-32", "inline"),
                                             ("mxint4-32", "matmulnbits"), ("mxfp4-32", "qdq"),
                                             ("mxfp4-32", "inline")])
def test_lowered_graphs_carry_the_factor(weights, target, tiny_onnx_nopast, tmp_path):
    """qdq / inline / matmulnbits compute the pre-scaled model: DequantizeLinear scales are fl(2^E / p) 2^-(d-2)."""
    mx = quantize(tiny_onnx_nopast, tmp_path / "mx", weights=weights, acts="mxfp4-32", method="rtn",
                  weights_prescale=0.75, acts_prescale=0.8)
    out = tmp_path / target
    lower_model(mx, out, target)
    ids = IDS[:1, :24].astype(np.int64)

    def logits(folder):
        sess = create_session(folder / "model.onnx", use_native=False)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(ids.shape[1])[None]}
        return sess.run(["logits"], {k: v for k, v in feeds.items() if k in {i.name for i in sess.get_inputs()}})[0]

    reference, lowered = logits(mx), logits(out)
    atol = 1e-5 * float(np.abs(reference).max()) if target == "matmulnbits" else 0.0
    np.testing.assert_allclose(lowered, reference, rtol=0, atol=atol)
    if target == "qdq" and weights == "mxint4-32":
        model = onnx.load(out / "model.onnx")
        scales = next(onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name.endswith("_qdq_scale"))
        mantissas = scales / np.ldexp(np.float32(1), np.frexp(scales)[1] - 1)
        np.testing.assert_array_equal(mantissas, np.float32(1) / np.float32(0.75))


def test_matmulnbits_refuses_prescaled_mxfp4(tiny_onnx_nopast, tmp_path, capsys):
    mx = quantize(tiny_onnx_nopast, tmp_path / "mx", weights="mxfp4-32", acts="none", method="rtn",
                  weights_prescale=0.75)
    assert main(["lower", str(mx), "-o", str(tmp_path / "out"), "--target", "matmulnbits"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mxfp4-32" in err[0]


@pytest.mark.parametrize("flags, message", [
    (["--weights-prescale", "0.4"], "outside (0.5, 1]"),
    (["--acts-prescale", "high"], "neither a number"),
    (["--acts", "none", "--acts-prescale", "0.75"], "--acts-prescale applies to MX activation formats"),
    (["--weights-prescale", "search", "--prescale-candidates", "0.7,2"], "outside (0.5, 1]"),
])
def test_bad_prescale_options_exit_2(flags, message, tiny_onnx, tmp_path, capsys):
    assert main(["quantize", str(tiny_onnx), "-o", str(tmp_path / "q"), "--method", "rtn",
                 "--weights", "mxfp4-32", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "q").exists()
