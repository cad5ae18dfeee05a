"""The MatMul rewrite pass on the tiny Llama: which nodes it creates, what it shares, what it refuses."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from conftest import in_memory_proto
from mxonnx import formats
from mxonnx.config import QuantizeConfig
from mxonnx.errors import InputError
from mxonnx.ops import schema
from mxonnx.passes.llama_structure import find_decoder_blocks
from mxonnx.passes.mx_matmul import rewrite_mx_matmuls, selected_linears
from mxonnx.session import create_session

LINEARS_PER_BLOCK = 7
HEAD = "mxint8-32"  # lm_head's weight and activation format by default when the decoder is MX (config.LM_HEAD_DEFAULT)


def rewritten(folder, **config) -> ir.Model:
    model = ir.load(folder / "model.onnx")
    return rewrite_mx_matmuls(model, QuantizeConfig(method="rtn", **config))


def op_counts(model: ir.Model) -> collections.Counter:
    return collections.Counter((n.domain, n.op_type) for n in model.graph)


def test_weights_and_activations(tiny_onnx):
    model = rewritten(tiny_onnx, weights="mxint4-32", acts="mxint8-32")
    counts = op_counts(model)
    assert counts[schema.DOMAIN, schema.DEQUANTIZE] == 2 * LINEARS_PER_BLOCK + 1  # + lm_head (default)
    # one shared QDQ for q/k/v and one for gate/up: 4 per block, + one before lm_head
    assert counts[schema.DOMAIN, schema.QUANTIZE_DEQUANTIZE] == 2 * 4 + 1
    assert set(model.functions) == {(schema.DOMAIN, schema.DEQUANTIZE, "mxint4-32"),
                                    (schema.DOMAIN, schema.DEQUANTIZE, HEAD),
                                    (schema.DOMAIN, schema.QUANTIZE_DEQUANTIZE, "mxint8-32")}
    for block in find_decoder_blocks(ir.load(tiny_onnx / "model.onnx")):
        assert not any(f"layers.{block.index}." in name and name.endswith(".weight") and "norm" not in name
                       for name in model.graph.initializers), "float weights must be dropped"
    proto = in_memory_proto(model)
    onnx.checker.check_model(proto, full_check=True)
    assert {(o.domain, o.version) for o in proto.opset_import} >= {("", 21), (schema.DOMAIN, 1)}


def test_nodes_carry_format_axis_and_overload(tiny_onnx):
    model = rewritten(tiny_onnx, weights="MXFP4-32", acts="mxfp8e4m3-64")
    head = {v.producer() for v in model.graph.outputs[0].producer().inputs}  # lm_head's input QDQ and weight
    assert {n.op_type for n in head} == {schema.DEQUANTIZE, schema.QUANTIZE_DEQUANTIZE}
    for node in model.graph:
        if node.domain == schema.DOMAIN:
            fmt = node.attributes[schema.FORMAT_ATTR].as_string()
            assert node.overload == fmt
            assert node.attributes[schema.AXIS_ATTR].as_int() == schema.DEFAULT_AXIS[node.op_type]
            assert fmt == (HEAD if node in head else "mxfp4-32" if node.op_type == schema.DEQUANTIZE else "mxfp8e4m3-64")
        if node.op_type == schema.DEQUANTIZE and node not in head:
            codes, exponents = (v.const_value for v in node.inputs)
            assert codes.dtype == ir.DataType.UINT4 and exponents.dtype == ir.DataType.UINT8


def test_weight_only_has_no_activation_quantization(tiny_onnx):
    model = rewritten(tiny_onnx, weights="mxint4-128", acts="none")
    counts = op_counts(model)
    assert counts[schema.DOMAIN, schema.QUANTIZE_DEQUANTIZE] == 0
    assert counts[schema.DOMAIN, schema.DEQUANTIZE] == 2 * LINEARS_PER_BLOCK + 1  # lm_head: weights only too
    assert set(model.functions) == {(schema.DOMAIN, schema.DEQUANTIZE, "mxint4-128"), (schema.DOMAIN, schema.DEQUANTIZE, HEAD)}


@pytest.mark.parametrize("lm_head, head_weights, head_acts", [("none", None, None), ("weights", "mxint4-64", "mxfp8e4m3-32"),
                                                              ("auto", HEAD, HEAD), ("mxfp6e3m2-32/none", "mxfp6e3m2-32", None)])
def test_lm_head_setting(tiny_onnx, lm_head, head_weights, head_acts):
    """``lm_head``: none keeps it float, weights gives it the decoder's formats, auto W8A8 MXINT8-32, else as given."""
    model = rewritten(tiny_onnx, weights="mxint4-64", acts="mxfp8e4m3-32", lm_head=lm_head)
    counts = op_counts(model)
    assert counts[schema.DOMAIN, schema.DEQUANTIZE] == 2 * LINEARS_PER_BLOCK + (head_weights is not None)
    assert counts[schema.DOMAIN, schema.QUANTIZE_DEQUANTIZE] == 2 * 4 + (head_acts is not None)
    weight = model.graph.outputs[0].producer().inputs[1].producer()
    assert (weight.op_type == schema.DEQUANTIZE) == (head_weights is not None)
    if head_weights is not None:
        assert weight.attributes[schema.FORMAT_ATTR].as_string() == head_weights
    x = model.graph.outputs[0].producer().inputs[0].producer()
    assert (x.op_type == schema.QUANTIZE_DEQUANTIZE) == (head_acts is not None)
    if head_acts is not None:
        assert x.attributes[schema.FORMAT_ATTR].as_string() == head_acts


def test_weights_equal_reference_quantization(tiny_onnx):
    """Each MXDequantize's codes/exponents are formats.quantize of the float weight it replaced."""
    float_model = ir.load(tiny_onnx / "model.onnx")
    expected = {lin.node.name: lin.weight_array for b in find_decoder_blocks(float_model) for lin in b.linears()}
    model = rewritten(tiny_onnx, weights="mxint4-32", acts="none")
    for node in model.graph:
        if node.op_type == "MatMul" and node.name in expected:
            dequantize = node.inputs[1].producer()
            codes, exponents = (np.asarray(v.const_value.numpy()) for v in dequantize.inputs)
            ref_codes, ref_exponents = formats.quantize(expected[node.name], "mxint4-32", axis=0)
            np.testing.assert_array_equal(codes.astype(np.int8), ref_codes)
            np.testing.assert_array_equal(exponents, ref_exponents)


@pytest.mark.parametrize("weights", ["int8", "int4-g32"])
def test_fixed_point_weights_use_standard_dequantize_linear(tiny_onnx, weights):
    model = rewritten(tiny_onnx, weights=weights, acts="none")
    counts = op_counts(model)
    assert counts["", "DequantizeLinear"] == 2 * LINEARS_PER_BLOCK and not model.functions
    lin = find_decoder_blocks(ir.load(tiny_onnx / "model.onnx"))[0].down
    proto = ir.serde.serialize_model(model)
    node = next(n for n in proto.graph.node if n.name == "layers.0.down_proj/DequantizeLinear")
    initializers = [t for t in proto.graph.initializer if t.name in node.input]
    graph = onnx.helper.make_graph([node], "w", [], [onnx.helper.make_tensor_value_info(node.output[0], 1, None)],
                                   initializer=initializers)
    standalone = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21)], ir_version=10)
    w = create_session(standalone.SerializeToString(), use_native=False).run(None, {})[0]
    np.testing.assert_array_equal(w, formats.quantize_dequantize(lin.weight_array, weights, axis=0))


def test_non_finite_weights_are_refused(tiny_onnx):
    model = ir.load(tiny_onnx / "model.onnx")
    weight = find_decoder_blocks(model)[1].up.weight
    array = weight.const_value.numpy().copy()
    array[3, 4] = np.inf
    weight.const_value = ir.Tensor(array, name=weight.name)
    with pytest.raises(InputError, match="layers.1.up_proj.*NaN or Inf"):
        rewrite_mx_matmuls(model, QuantizeConfig(weights="mxint4-32", acts="none", method="rtn"))


def test_int_activations_other_than_static_int8_are_refused(tiny_onnx):
    with pytest.raises(InputError, match="activation format 'int4' is not supported"):
        rewritten(tiny_onnx, weights="mxint4-32", acts="int4")
    with pytest.raises(InputError, match="calibrated scale .* layers.0.q_proj"):
        rewritten(tiny_onnx, weights="mxint4-32", acts="int8")  # int8 activations without calibrated ranges


def test_static_int8_activations_are_standard_qdq(tiny_onnx):
    model = ir.load(tiny_onnx / "model.onnx")
    linears = {lin.node: lin.name for lin in selected_linears(model)}
    scales = {lin.name: np.full(lin.shape[0], 0.01 * (i + 1), np.float32) for i, lin in enumerate(selected_linears(model))}
    rewrite_mx_matmuls(model, QuantizeConfig(method="rtn", weights="int4", acts="int8"), act_scales=scales)
    counts = op_counts(model)
    assert counts["", "QuantizeLinear"] == 4 * 2 and not model.functions  # q/k/v and gate/up share their input
    for node in model.graph:
        if node.op_type == "QuantizeLinear":
            scale, zero = (np.asarray(v.const_value.numpy()) for v in node.inputs[1:])
            assert zero.dtype == np.int8 and (zero == 0).all() and node.attributes["axis"].as_int() == -1
            dequantize = next(iter(node.outputs[0].uses())).node
            assert dequantize.op_type == "DequantizeLinear" and dequantize.inputs[1:] == node.inputs[1:]
            readers = [use.node for use in dequantize.outputs[0].uses()]
            assert len(readers) in (1, 2, 3) and all(r in linears for r in readers)
            np.testing.assert_array_equal(scale, scales[linears[readers[0]]])
