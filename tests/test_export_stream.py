"""The streamed export (optimum's export of a 2-layer template, the last block copied, weights written tensor by
tensor) against optimum's plain export of the whole model; 16-bit weight storage (``--dtype``) through every command."""

from __future__ import annotations

import collections
import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from conftest import make_tiny_llama
from mxonnx import export as export_mod
from mxonnx.cli import main
from mxonnx.eval import OrtCausalLM
from mxonnx.export import export_model, quiet_libraries
from mxonnx.inspect import inspect_model
from mxonnx.passes.llama_structure import constant_dtype, find_decoder_blocks, find_lm_head

EPS = {"float16": 2.0**-11, "bfloat16": 2.0**-8}  # unit roundoff of the storage types


def _ids(n: int = 2, length: int = 29) -> np.ndarray:
    return np.random.default_rng(3).integers(0, 96, size=(n, length), dtype=np.int64)


def _optimum_export(src, out, past: bool):
    """optimum's own export of the whole model (the route mxonnx took before streaming), weights inline."""
    from optimum.exporters.onnx import onnx_export_from_model

    with quiet_libraries():
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
        model.config.use_cache = past
        onnx_export_from_model(model, out, task="text-generation-with-past" if past else "text-generation",
                               do_validation=False)
    return out


def _untie(folder):
    """Give the saved model its own random lm_head (untied embeddings)."""
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.config.tie_word_embeddings = False
    torch.manual_seed(5)
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.model.embed_tokens.weight) * 0.5)
    model.save_pretrained(folder)


def _graph(folder) -> onnx.GraphProto:
    return onnx.load(str(folder / "model.onnx"), load_external_data=False).graph


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}


@pytest.mark.parametrize("layers, kv_heads, tied, past, config", [
    (4, 2, True, True, {}), (3, 1, False, False, {}), (1, 4, False, True, {}),
    (3, 2, True, True, {"attention_bias": True, "mlp_bias": True}),  # copied blocks carry their own biases
    (3, 2, False, True, {"rope_scaling": LLAMA3_ROPE}),
    (3, 2, True, True, {"model_type": "mistral", "sliding_window": 8}),
    (3, 2, False, False, {"model_type": "qwen2"}),
])
def test_streamed_export_equals_optimum_export(tmp_path, layers, kv_heads, tied, past, config):
    src = make_tiny_llama(tmp_path / "hf", seed=layers, layers=layers, heads=4, kv_heads=kv_heads, **config)
    if not tied:
        _untie(src)
    plain = _optimum_export(src, tmp_path / "plain", past)
    out = tmp_path / "streamed"
    result = export_model(src, out, past=past, progress=False)
    assert result["logits_check_layers"] == layers and result["dtype"] == "float32"
    ids = _ids()
    diff = np.abs(OrtCausalLM(out / "model.onnx").logits(ids) - OrtCausalLM(plain / "model.onnx").logits(ids)).max()
    assert diff <= 1e-5
    a, b = _graph(plain), _graph(out)
    assert collections.Counter(n.op_type for n in a.node) == collections.Counter(n.op_type for n in b.node)
    assert [v.name for v in a.input] == [v.name for v in b.input]
    assert [v.name for v in a.output] == [v.name for v in b.output]
    assert json.loads((plain / "config.json").read_text()) == json.loads((out / "config.json").read_text())
    names = [n.name for n in b.node]
    assert len(set(names)) == len(names)
    for i in range(layers):  # optimum's node names in every layer, copied ones included
        assert f"/model/layers.{i}/self_attn/q_proj/MatMul" in names


def test_sharded_checkpoint_without_loading_the_model(tiny_hf, tiny_onnx, tmp_path, monkeypatch):
    """Shards listed by model.safetensors.index.json are read tensor by tensor: the model is never loaded whole."""
    model = LlamaForCausalLM.from_pretrained(tiny_hf)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="100KB")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (sharded / name).write_bytes((tiny_hf / name).read_bytes())
    assert (sharded / "model.safetensors.index.json").is_file() and not (sharded / "model.safetensors").exists()

    def refuse(*args, **kwargs):
        raise AssertionError("the streamed export loaded the whole torch model")

    monkeypatch.setattr(LlamaForCausalLM, "from_pretrained", refuse)
    export_model(sharded, tmp_path / "out", progress=False)
    ids = _ids()
    np.testing.assert_array_equal(OrtCausalLM(tmp_path / "out" / "model.onnx").logits(ids),
                                  OrtCausalLM(tiny_onnx / "model.onnx").logits(ids))


def test_reduced_logits_check_of_large_models(tmp_path, monkeypatch):
    """Above FULL_CHECK_BYTES the check runs the first CHECK_LAYERS layers (a graph over the same weights file)."""
    src = make_tiny_llama(tmp_path / "hf", layers=5)
    monkeypatch.setattr(export_mod, "FULL_CHECK_BYTES", 0)
    result = export_model(src, tmp_path / "out", past=False, progress=False)
    assert result["logits_check_layers"] == export_mod.CHECK_LAYERS < 5
    assert result["logits_max_abs_diff"] < 1e-5
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.name.startswith("model") or p.suffix == ".onnx") \
        == ["model.onnx", "model.onnx_data"]


def test_checkpoint_missing_a_tensor_exits_2(tiny_hf, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    for p in tiny_hf.iterdir():
        (broken / p.name).write_bytes(p.read_bytes())
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    capsys.readouterr()
    assert main(["export", str(broken), "-o", str(tmp_path / "out"), "--json"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "model.layers.1.mlp.up_proj.weight" in err
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["broken"]


def test_unknown_dtype_is_a_usage_error(tiny_hf, tmp_path, capsys):
    assert main(["export", str(tiny_hf), "-o", str(tmp_path / "out"), "--dtype", "float8", "--json"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module", params=["float16", "bfloat16"])
def half_onnx(request, tiny_hf, tmp_path_factory):
    out = tmp_path_factory.mktemp("half") / request.param
    assert main(["export", str(tiny_hf), "-o", str(out), "--dtype", request.param, "--json"]) == 0
    return request.param, out


def test_16bit_weights_are_stored_in_16_bits(half_onnx, tiny_onnx):
    dtype, folder = half_onnx
    graph = _graph(folder)
    storage = {"float16": onnx.TensorProto.FLOAT16, "bfloat16": onnx.TensorProto.BFLOAT16}[dtype]
    weights = [t for t in graph.initializer if t.data_type == storage]
    assert len(weights) == 2 * 9 + 2  # per layer 7 linears and 2 norms; the (tied) embedding, the final norm
    assert not [t for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) >= 1 and
                np.prod(t.dims) > 64]
    readers = collections.defaultdict(list)
    for n in graph.node:
        for name in n.input:
            readers[name].append(n)
    for t in weights:  # every stored weight feeds exactly one Cast to float32, and nothing else
        (cast,) = readers[t.name]
        assert cast.op_type == "Cast" and cast.attribute[0].i == onnx.TensorProto.FLOAT
    fp32 = _graph(tiny_onnx)
    assert collections.Counter(n.op_type for n in graph.node) - collections.Counter(n.op_type for n in fp32.node) \
        == collections.Counter({"Cast": len(weights)})
    size, size32 = ((f / "model.onnx_data").stat().st_size for f in (folder, tiny_onnx))
    assert 0.45 < size / size32 < 0.55


def test_16bit_logits_round_trip_within_tolerance(half_onnx, tiny_onnx):
    """fp16/bf16 storage gives the fp32 export's logits within the storage type's rounding: |diff| <= 4 eps max|z|."""
    dtype, folder = half_onnx
    ids = _ids()
    reference = OrtCausalLM(tiny_onnx / "model.onnx").logits(ids)
    actual = OrtCausalLM(folder / "model.onnx").logits(ids)
    tolerance = 4 * EPS[dtype] * max(1.0, float(np.abs(reference).max()))
    assert 0 < np.abs(actual - reference).max() <= tolerance


def test_structure_and_inspect_see_16bit_weights(half_onnx):
    dtype, folder = half_onnx
    model = ir.load(folder / "model.onnx")
    blocks = find_decoder_blocks(model)
    assert len(blocks) == 2 and (blocks[0].head_dim, blocks[0].num_heads, blocks[0].num_kv_heads) == (16, 4, 2)
    stored = blocks[1].q.weight.producer().inputs[0].const_value.numpy()
    np.testing.assert_array_equal(blocks[1].q.weight_array, stored.astype(np.float32))
    assert blocks[1].q.weight_array.dtype == np.float32 and blocks[0].attn_norm.weight_array.dtype == np.float32
    assert constant_dtype(blocks[0].attn_norm.weight) == ir.DataType.FLOAT
    assert find_lm_head(model, blocks).shape == (64, 96)
    d = inspect_model(folder)
    assert (d["quantized_matmuls"], d["float_matmuls"], d["bits_per_weight"]) == (0, 15, None)


def test_quantize_eval_generate_a_16bit_model(half_onnx, tiny_onnx, tiny_text, tmp_path, capsys):
    dtype, folder = half_onnx
    out = tmp_path / "q"
    assert main(["quantize", str(folder), "-o", str(out), "--method", "rtn", "--weights", "mxint4-32",
                 "--acts", "mxint8-32", "--json"]) == 0
    graph = _graph(out)
    assert not [t.name for t in graph.initializer if t.name.startswith("model.layers.")
                and ("proj" in t.name)]  # the 16-bit linear weights are gone with their Casts
    # the 14 decoder linears and lm_head (MXINT8-32 by default, its tied 16-bit weight read through the Cast)
    assert (inspect_model(out)["quantized_matmuls"], inspect_model(out)["float_matmuls"]) == (15, 0)
    capsys.readouterr()
    perplexities = []
    for model in (tiny_onnx, folder):
        assert main(["eval", str(model), "--data", str(tiny_text), "--seqlen", "64", "--max-windows", "2", "--json"]) == 0
        perplexities.append(json.loads(capsys.readouterr().out)["perplexity"])
    assert perplexities[1] == pytest.approx(perplexities[0], rel=50 * EPS[dtype])
    assert main(["generate", str(folder), "w1 w2 w3", "--max-new-tokens", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["text"].startswith("w1 w2 w3")


def test_constants_are_read_through_float_casts_only():
    from onnx import TensorProto, helper

    from mxonnx.passes.llama_structure import constant_array, constant_shape

    w = helper.make_tensor("w", TensorProto.FLOAT16, [2, 3], np.arange(6, dtype=np.float16))
    k = helper.make_tensor("k", TensorProto.INT64, [2], [4, 5])
    nodes = [helper.make_node("Cast", ["w"], ["w32"], to=TensorProto.FLOAT),
             helper.make_node("Transpose", ["w32"], ["wt"]),
             helper.make_node("Cast", ["k"], ["kf"], to=TensorProto.FLOAT),
             helper.make_node("Add", ["wt", "kf"], ["y"])]
    graph = helper.make_graph(nodes, "g", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w, k])
    model = ir.from_proto(helper.make_model(graph))
    values = {n.outputs[0].name: n.outputs[0] for n in model.graph}
    read = constant_array(values["wt"])
    assert read.dtype == np.float32 and constant_shape(values["wt"]) == (3, 2)
    np.testing.assert_array_equal(read, np.arange(6, dtype=np.float32).reshape(2, 3).T)
    assert constant_dtype(values["wt"]) == ir.DataType.FLOAT
    assert constant_array(values["kf"]) is None  # an integer constant cast to float is not a weight
