"""``com.mxonnx.GroupAttention``: grouped-query attention with an additive mask over a KV cache, the attention that
``passes/fuse_attention.py`` fuses for sessions with the native library (kernel: ``native/mx_attention.h``).

Inputs q ``[B, S, H D]``, k, v ``[B, S, KV D]`` (q and k already rotated), past_key, past_value ``[B, KV, P, D]``,
attention_bias ``[B or 1, 1, S, P + S]``; attributes num_heads H, kv_num_heads KV (dividing H), scale c:

    present_key = concat(past_key, k as [B, KV, S, D], axis=2)          (present_value likewise)
    w = softmax(c q_h present_key[h / G]^T + attention_bias),  G = H / KV, per query head h
    O_h = Where(IsNaN(w), 0, w) present_value[h / G]

so a query row whose keys are all masked by ``-inf`` (NaN weights) gives 0, as the export's guard does. The function
body below computes exactly this from standard ops (the query heads of one KV head grouped as ``[B, KV, G, S, D]``).
"""

from __future__ import annotations

import functools

import onnx
from onnx import helper

from mxonnx.ops import schema

INPUTS = ("q", "k", "v", "past_key", "past_value", "attention_bias")
OUTPUTS = ("O", "present_key", "present_value")
ATTRIBUTES = ("num_heads", "kv_num_heads", "scale")
OLDEST_OPSET = 13  # the body's ops (Unsqueeze and Squeeze with axes inputs, Softmax over one axis) since opset 13


def _ints(name: str, values: list[int]) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value_ints=values)


def _attribute(name: str, kind: str, attribute: str, onnx_type: int) -> onnx.NodeProto:
    node = helper.make_node("Constant", [], [name])
    node.attribute.append(onnx.AttributeProto(name=kind, ref_attr_name=attribute, type=onnx_type))
    return node


@functools.lru_cache(maxsize=None)
def _function_proto(opset: int) -> onnx.FunctionProto:
    n = helper.make_node
    nodes = [
        _attribute("h_scalar", "value_int", "num_heads", onnx.AttributeProto.INT),
        _attribute("kv_scalar", "value_int", "kv_num_heads", onnx.AttributeProto.INT),
        _attribute("scale", "value_float", "scale", onnx.AttributeProto.FLOAT),
        _ints("zero", [0]), _ints("minus_one", [-1]), _ints("one", [1]), _ints("two", [2]), _ints("four", [4]),
        n("Unsqueeze", ["h_scalar", "zero"], ["h"]),
        n("Unsqueeze", ["kv_scalar", "zero"], ["kv"]),
        # q [B, S, H D] -> [B, H, S, D] -> [B, KV, G, S, D]: query head h = kv G + g
        n("Concat", ["zero", "zero", "h", "minus_one"], ["q_split"], axis=0),
        n("Reshape", ["q", "q_split"], ["q4"]),
        n("Transpose", ["q4"], ["q_heads"], perm=[0, 2, 1, 3]),
        n("Shape", ["q_heads"], ["q_shape"]),
        n("Slice", ["q_shape", "zero", "one"], ["batch"]),
        n("Slice", ["q_shape", "two", "four"], ["seq_dim"]),
        n("Concat", ["batch", "kv", "minus_one", "seq_dim"], ["group_shape"], axis=0),
        n("Reshape", ["q_heads", "group_shape"], ["q_groups"]),
        # present = concat(past, new as [B, KV, S, D])
        n("Concat", ["zero", "zero", "kv", "minus_one"], ["kv_split"], axis=0),
        n("Reshape", ["k", "kv_split"], ["k4"]),
        n("Transpose", ["k4"], ["k_heads"], perm=[0, 2, 1, 3]),
        n("Concat", ["past_key", "k_heads"], ["present_key"], axis=2),
        n("Reshape", ["v", "kv_split"], ["v4"]),
        n("Transpose", ["v4"], ["v_heads"], perm=[0, 2, 1, 3]),
        n("Concat", ["past_value", "v_heads"], ["present_value"], axis=2),
        # scores [B, KV, G, S, T] = c q K^T + bias, softmax over the keys, NaN weights -> 0
        n("Unsqueeze", ["present_key", "two"], ["k_groups"]),
        n("Transpose", ["k_groups"], ["k_t"], perm=[0, 1, 2, 4, 3]),
        n("MatMul", ["q_groups", "k_t"], ["products"]),
        n("Mul", ["products", "scale"], ["scaled"]),
        n("Unsqueeze", ["attention_bias", "one"], ["bias_groups"]),
        n("Add", ["scaled", "bias_groups"], ["scores"]),
        n("Softmax", ["scores"], ["weights"], axis=-1),
        n("IsNaN", ["weights"], ["undefined"]),
        helper.make_node("Constant", [], ["zero_weight"], value=helper.make_tensor("w0", onnx.TensorProto.FLOAT, [], [0.0])),
        n("Where", ["undefined", "zero_weight", "weights"], ["guarded"]),
        n("Unsqueeze", ["present_value", "two"], ["v_groups"]),
        n("MatMul", ["guarded", "v_groups"], ["o_groups"]),
        # [B, KV, G, S, D] -> [B, H, S, D] -> [B, S, H D]
        n("Concat", ["batch", "minus_one", "seq_dim"], ["head_shape"], axis=0),
        n("Reshape", ["o_groups", "head_shape"], ["o_heads"]),
        n("Transpose", ["o_heads"], ["o_rows"], perm=[0, 2, 1, 3]),
        n("Concat", ["zero", "zero", "minus_one"], ["merge"], axis=0),
        n("Reshape", ["o_rows", "merge"], ["O"]),
    ]
    return helper.make_function(schema.DOMAIN, schema.GROUP_ATTENTION, list(INPUTS), list(OUTPUTS), nodes,
                                [helper.make_opsetid("", opset)], attributes=list(ATTRIBUTES))


def function_proto(opset: int = schema.STANDARD_OPSET) -> onnx.FunctionProto:
    """The FunctionProto defining ``GroupAttention`` with standard ops of ``opset`` (>= 13; a fresh copy)."""
    if opset < OLDEST_OPSET:
        raise ValueError(f"the GroupAttention body needs standard opset >= {OLDEST_OPSET}, got {opset}")
    proto = onnx.FunctionProto()
    proto.CopyFrom(_function_proto(opset))
    return proto
