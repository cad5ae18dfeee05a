"""The decoder structure is found from the graph's topology: roles agree with optimum's node names,
survive anonymised node names, and non-Llama graphs are refused with an InputError."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from mxonnx.errors import InputError
from mxonnx.passes.llama_structure import ROLES, constant_array, find_decoder_blocks, find_lm_head

OPTIMUM_NAME = {"q": "self_attn/q_proj", "k": "self_attn/k_proj", "v": "self_attn/v_proj", "o": "self_attn/o_proj",
                "gate": "mlp/gate_proj", "up": "mlp/up_proj", "down": "mlp/down_proj"}


@pytest.mark.parametrize("fixture", ["tiny_onnx", "tiny_onnx_nopast"])
def test_roles_match_optimum_names(fixture, request):
    model = ir.load(request.getfixturevalue(fixture) / "model.onnx")
    blocks = find_decoder_blocks(model)
    assert len(blocks) == 2
    for block in blocks:
        assert (block.head_dim, block.num_heads, block.num_kv_heads) == (16, 4, 2)
        for lin in block.linears():
            assert f"/model/layers.{block.index}/{OPTIMUM_NAME[lin.role]}/MatMul" == lin.node.name
        assert block.attn_norm.weight.name == f"model.layers.{block.index}.input_layernorm.weight"
        assert block.mlp_norm.weight.name == f"model.layers.{block.index}.post_attention_layernorm.weight"
        assert [lin.role for lin in block.linears()] == list(ROLES)
    lm_head = find_lm_head(model, blocks)
    assert lm_head.shape == (64, 96)
    embed = model.graph.initializers["model.embed_tokens.weight"].const_value.numpy()
    np.testing.assert_array_equal(lm_head.weight_array, embed.T)


def test_found_without_node_names(tiny_onnx):
    proto = onnx.load(tiny_onnx / "model.onnx")
    expected = [(b.index, [lin.node.name for lin in b.linears()]) for b in find_decoder_blocks(ir.from_proto(proto))]
    for i, node in enumerate(proto.graph.node):
        node.name = f"n{i}"
    blocks = find_decoder_blocks(ir.from_proto(proto))
    assert len(blocks) == len(expected)
    original = {f"n{i}": n for i, n in enumerate(onnx.load(tiny_onnx / "model.onnx").graph.node)}
    for block, (_, names) in zip(blocks, expected):
        assert [original[lin.node.name].name for lin in block.linears()] == names


def test_simplified_layer_normalization(tiny_onnx):
    """A graph whose norms were fused into SimplifiedLayerNormalization (as onnxruntime's optimizer does)."""
    model = ir.load(tiny_onnx / "model.onnx")
    for block in find_decoder_blocks(model):
        for norm in (block.attn_norm, block.mlp_norm):
            x = _norm_input(norm.node)
            fused = ir.node("SimplifiedLayerNormalization", [x, norm.weight], attributes={"axis": -1, "epsilon": 1e-6},
                            num_outputs=1)
            model.graph.insert_before(norm.node, fused)
            norm.output.replace_all_uses_with(fused.outputs[0])
    blocks = find_decoder_blocks(model)
    assert len(blocks) == 2
    assert {b.attn_norm.kind for b in blocks} == {"SimplifiedLayerNormalization"}


def _norm_input(mul: ir.Node) -> ir.Value:
    """The un-normalised x of optimum's decomposed RMSNorm (the input of its Pow)."""
    frontier = [v for v in mul.inputs if constant_array(v) is None]
    while frontier:
        producer = frontier.pop().producer()
        if producer.op_type == "Pow":
            return producer.inputs[0]
        frontier.extend(v for v in producer.inputs if v is not None and constant_array(v) is None)
    raise AssertionError("no Pow")


def test_graph_without_decoder_blocks_is_refused():
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 4], np.ones(16, np.float32))
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w])
    with pytest.raises(InputError, match="no Llama decoder block"):
        find_decoder_blocks(ir.from_proto(helper.make_model(graph)))
