"""Fuse each quantized linear of a saved MX graph into one ``com.mxonnx.MXMatMul`` node, for sessions that run
the native kernels:

    MatMul(MXQuantizeDequantize(X, A, axis=-1), MXDequantize(codes, exponents, W, axis=0))
        ->  MXMatMul(X, codes, exponents; weight_format=W, act_format=A)
    MatMul(X, MXDequantize(codes, exponents, W, axis=0))  ->  MXMatMul(X, codes, exponents; W, act_format="none")

Pre-scales (``prescale`` of the two ops) become ``weight_prescale`` / ``act_prescale`` (written only when not 1; the
function body then takes them as attributes, default 1).

An activation quantizer shared by several linears (q/k/v, gate/up) is folded into each of them when all its readers
fuse: each MXMatMul quantizes the same X with the same format, so the numbers are those of the shared quantizer,
and the native kernel gets the activation format it needs for its integer dot products (mx_gemv.h). A quantizer
with any other reader stays, and its fused readers take its output with ``act_format="none"``. The native kernel
reads the packed weight directly, so the fp32 weight never exists in memory.

The saved graphs keep the plain form (any runtime reads them); this pass runs in memory only, on graphs about to
be opened with the native library (``fused_model_bytes``). ``MXMatMul`` still gets an ONNX function (the
two op functions and MatMul, inlined into standard ops), so a fused graph written out stays portable.
"""

from __future__ import annotations

import os

import onnx
import onnx.inliner
import onnx_ir as ir
import onnx_ir.passes.common
from onnx import helper

from mxonnx import formats
from mxonnx.ops import functions, schema

MATMUL = "MXMatMul"
WEIGHT_FORMAT_ATTR = "weight_format"
ACT_FORMAT_ATTR = "act_format"
WEIGHT_PRESCALE_ATTR = "weight_prescale"
ACT_PRESCALE_ATTR = "act_prescale"


def matmul_overload(weights: str | formats.MXFormat, acts: str | formats.MXFormat) -> str:
    """Function overload of an MXMatMul node, e.g. ``mxint4-128+mxint8-128`` or ``mxfp4-32+none``."""
    acts = formats.parse_format(acts)
    return f"{schema.overload(weights)}+{schema.overload(acts) if acts.kind == 'mx' else 'none'}"


def _prescale_reference(node: onnx.NodeProto, outer: str) -> None:
    """Give ``node`` the attribute ``prescale`` referring to the function attribute ``outer``."""
    node.attribute.append(onnx.AttributeProto(name=schema.PRESCALE_ATTR, ref_attr_name=outer,
                                              type=onnx.AttributeProto.FLOAT))


def matmul_function_proto(weights: str | formats.MXFormat, acts: str | formats.MXFormat,
                          prescaled: bool | None = None) -> onnx.FunctionProto:
    """MXMatMul's body: ``MatMul(MXQuantizeDequantize(X), MXDequantize(codes, exponents))`` (no quantizer for acts
    ``none``) with the two ops' functions inlined, so that the body holds standard ops only. ``prescaled`` (default:
    whether either format has a pre-scale): the body takes ``weight_prescale`` and ``act_prescale`` (default 1)."""
    weights, acts = schema.mx_format(weights), formats.parse_format(acts)
    if prescaled is None:
        prescaled = weights.prescaled or acts.prescaled
    nodes, x = [], "X"
    used = [functions.function_proto(schema.DEQUANTIZE, weights, prescaled=prescaled)]
    if acts.kind == "mx":
        nodes.append(helper.make_node(schema.QUANTIZE_DEQUANTIZE, ["X"], ["X_qdq"], domain=schema.DOMAIN,
                                      format=acts.name, axis=-1, overload=schema.overload(acts)))
        used.append(functions.function_proto(schema.QUANTIZE_DEQUANTIZE, acts, prescaled=prescaled))
        if prescaled:
            _prescale_reference(nodes[-1], ACT_PRESCALE_ATTR)
        x = "X_qdq"
    nodes.append(helper.make_node(schema.DEQUANTIZE, ["codes", "exponents"], ["W"], domain=schema.DOMAIN,
                                  format=weights.name, axis=0, overload=schema.overload(weights)))
    if prescaled:
        _prescale_reference(nodes[-1], WEIGHT_PRESCALE_ATTR)
    nodes.append(helper.make_node("MatMul", [x, "W"], ["Y"]))
    inputs, outputs = ["X", "codes", "exponents"], ["Y"]
    opsets = [helper.make_opsetid("", schema.STANDARD_OPSET), helper.make_opsetid(schema.DOMAIN, schema.DOMAIN_VERSION)]
    composed = helper.make_model(
        helper.make_graph(nodes, MATMUL, [helper.make_empty_tensor_value_info(name) for name in inputs],
                          [helper.make_empty_tensor_value_info(name) for name in outputs]),
        ir_version=schema.IR_VERSION, opset_imports=opsets, functions=used)
    body = onnx.inliner.inline_local_functions(composed).graph.node
    proto = helper.make_function(schema.DOMAIN, MATMUL, inputs, outputs, body, opsets[:1],
                                 attributes=[WEIGHT_FORMAT_ATTR, ACT_FORMAT_ATTR])
    if prescaled:
        proto.attribute_proto.extend([helper.make_attribute(WEIGHT_PRESCALE_ATTR, 1.0),
                                      helper.make_attribute(ACT_PRESCALE_ATTR, 1.0)])
    proto.overload = matmul_overload(weights, acts)
    return proto


def _producer(value: ir.Value, op_type: str) -> ir.Node | None:
    node = value.producer()
    if node is None or node.domain != schema.DOMAIN or node.op_type != op_type:
        return None
    return node


def _axis(node: ir.Node) -> int:
    attr = node.attributes.get(schema.AXIS_ATTR)
    return schema.DEFAULT_AXIS[node.op_type] if attr is None else attr.as_int()


def _weight(matmul: ir.Node) -> ir.Node | None:
    """The MXDequantize along axis 0 of a 2-D weight feeding MatMul's B, else None."""
    node = _producer(matmul.inputs[1], schema.DEQUANTIZE)
    shape = node.inputs[0].shape if node is not None else None
    if node is None or _axis(node) not in (0, -2) or (shape is not None and len(shape) != 2):
        return None
    return node


def _foldable_quantizer(matmul: ir.Node, graph: ir.Graph) -> ir.Node | None:
    """The MXQuantizeDequantize along the last axis feeding MatMul's A when every reader of its output is a MatMul
    that fuses (A input, MXDequantize weight): each of them then quantizes X itself, so it can be dropped."""
    node = _producer(matmul.inputs[0], schema.QUANTIZE_DEQUANTIZE)
    if node is None or _axis(node) != -1:
        return None
    out = node.outputs[0]
    if out in graph.outputs:
        return None
    for user, index in out.uses():
        if user.op_type != "MatMul" or user.domain not in ("", "ai.onnx") or index != 0 or _weight(user) is None:
            return None
    return node


def _format(node: ir.Node) -> formats.MXFormat:
    return schema.mx_format(schema.node_format(node))


def _add_function(model: ir.Model, proto: onnx.FunctionProto) -> None:
    """Add ``proto``; a pre-scaled body replaces a plain one of the same overload (with 1 it computes the same)."""
    function = ir.serde.deserialize_function(proto)
    held = model.functions.get(function.identifier())
    if held is None or (WEIGHT_PRESCALE_ATTR in function.attributes and WEIGHT_PRESCALE_ATTR not in held.attributes):
        model.functions[function.identifier()] = function


def matmul_attributes(weights: formats.MXFormat, acts: formats.MXFormat) -> dict:
    """MXMatMul's attributes: the two formats, and the pre-scales that are not 1."""
    attributes = {WEIGHT_FORMAT_ATTR: weights.name, ACT_FORMAT_ATTR: acts.name}
    if weights.prescaled:
        attributes[WEIGHT_PRESCALE_ATTR] = weights.prescale
    if acts.prescaled:
        attributes[ACT_PRESCALE_ATTR] = acts.prescale
    return attributes


class FuseMxMatMulPass(ir.passes.InPlacePass):
    """Replace each MatMul whose B is an ``MXDequantize`` (and A maybe a foldable ``MXQuantizeDequantize``) of the
    main graph by one ``MXMatMul``; other MatMuls are left alone. Dead quantizers and functions are removed."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        fused = 0
        for matmul in list(graph):
            if matmul.op_type != "MatMul" or matmul.domain not in ("", "ai.onnx"):
                continue
            weight = _weight(matmul)
            if weight is None:
                continue
            quantizer = _foldable_quantizer(matmul, graph)
            weights = _format(weight)
            acts = _format(quantizer) if quantizer is not None else formats.parse_format("none")
            x = quantizer.inputs[0] if quantizer is not None else matmul.inputs[0]
            node = ir.node(MATMUL, [x, *weight.inputs], domain=schema.DOMAIN,
                           overload=matmul_overload(weights, acts), name=matmul.name,
                           attributes=matmul_attributes(weights, acts))
            node.outputs[0].shape, node.outputs[0].type = matmul.outputs[0].shape, matmul.outputs[0].type
            ir.convenience.replace_nodes_and_values(graph, matmul, [matmul], [node], matmul.outputs, node.outputs)
            _add_function(model, matmul_function_proto(weights, acts))
            fused += 1
        if fused:
            ir.passes.common.RemoveUnusedNodesPass()(model)
            ir.passes.common.RemoveUnusedFunctionsPass()(model)
        self.fused = fused
        return ir.passes.PassResult(model, modified=bool(fused))


def fuse_mx_matmuls(model: ir.Model) -> int:
    """Run ``FuseMxMatMulPass`` on ``model`` in place; returns the number of MXMatMul nodes made."""
    fuse = FuseMxMatMulPass()
    fuse(model)
    return fuse.fused


def fused_model_bytes(path: str | os.PathLike) -> bytes | None:
    """The ONNX file at ``path`` with its quantized linears fused, serialized; None when there is nothing to fuse.

    Weights stored as external data stay on disk, referenced by their relative location: open the bytes with the
    session config entry ``mxonnx.session.EXTERNAL_DATA_FOLDER_CONFIG`` set to ``path``'s folder."""
    model = ir.load(os.fspath(path))
    if schema.DOMAIN not in model.graph.opset_imports or fuse_mx_matmuls(model) == 0:
        return None
    return ir.serde.serialize_model(model).SerializeToString()
