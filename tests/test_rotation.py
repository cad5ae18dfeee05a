"""Block rotation (``--rotate``, passes/rotation.py): the rotated float graph gives the unrotated logits (tied and
untied embeddings, GQA, biases, a hidden size the block does not divide), the online BlockHadamard's function body,
native kernel and numpy agree bit for bit, SmoothQuant still folds exactly into a rotated model, and quantize
round-trips with every method (inspect reports it, lower inline keeps the logits)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from conftest import _export, in_memory_proto, make_tiny_llama
from mxonnx.blockwise import decoder_feed
from mxonnx.cli import main
from mxonnx.config import QuantizeConfig
from mxonnx.errors import InputError
from mxonnx.inspect import inspect_model
from mxonnx.ops import hadamard, schema
from mxonnx.passes.llama_structure import find_decoder_blocks, find_lm_head
from mxonnx.passes.lower import lower
from mxonnx.passes.rotation import block_rotation, fitted_block, rotate_columns, rotate_rows
from mxonnx.quantize import quantize_model
from mxonnx.session import create_session, native_library


@pytest.fixture(scope="module")
def untied_onnx(tmp_path_factory):
    """Untied embeddings, biases everywhere, hidden 48 (block 32 -> residual block 16), head_dim 12 (block 4)."""
    root = tmp_path_factory.mktemp("rotate_untied")
    hf = make_tiny_llama(root / "hf", seed=3, hidden=48, intermediate=96, heads=4, kv_heads=2,
                         tie_word_embeddings=False, attention_bias=True, mlp_bias=True)
    return _export(hf, root / "onnx", past=True)


def _logits(model: ir.Model, use_native: bool = True, head_dim: int = 16) -> np.ndarray:
    """Logits of two random sequences (the tiny models have 2 KV heads; ``head_dim`` 16, the untied one's 12)."""
    session = create_session(in_memory_proto(model).SerializeToString(), use_native=use_native)
    ids = np.random.default_rng(1).integers(3, 96, size=(2, 37))
    feed = decoder_feed(list(model.graph.inputs), ids, num_kv_heads=2, head_dim=head_dim)
    return session.run(["logits"], feed)[0]


def _norm_weights(model: ir.Model) -> list[np.ndarray]:
    blocks = find_decoder_blocks(model)
    return [n.weight_array for b in blocks for n in (b.attn_norm, b.mlp_norm)]


@pytest.mark.parametrize("fixture", ["tiny_onnx", "tiny_onnx_nopast", "untied_onnx"])
@pytest.mark.parametrize("block", [8, 32])
def test_rotation_keeps_logits(fixture, block, request):
    folder = request.getfixturevalue(fixture)
    model = ir.load(folder / "model.onnx")
    head_dim = find_decoder_blocks(model)[0].head_dim
    before, nodes = _logits(model, head_dim=head_dim), len(model.graph)
    tied = not find_lm_head(model).weight.is_initializer()  # read through a Transpose of the embedding
    weights = {n.name: n.weight_array for b in find_decoder_blocks(model) for n in b.linears()}
    block_rotation(model, QuantizeConfig(weights=f"mxint4-{block}", rotate=True))
    blocks = find_decoder_blocks(model)
    assert len(model.graph) == nodes + len(blocks) - tied  # one BlockHadamard per layer; a tied head's Transpose gone
    assert all(b.down_rotation is not None for b in blocks)
    assert all(np.array_equal(w, np.ones_like(w)) for w in _norm_weights(model))
    assert all(not np.allclose(weights[n.name], n.weight_array) for b in blocks for n in b.linears())
    hidden = blocks[0].q.shape[0]
    recorded = json.loads(model.metadata_props["mxonnx.rotation"])
    assert recorded == {"block": block, "residual": fitted_block(block, hidden),
                        "head": fitted_block(block, blocks[0].head_dim), "down": fitted_block(block, blocks[0].down.shape[0])}
    after = _logits(model, head_dim=head_dim)
    assert np.abs(after - before).max() <= 2e-6 * np.abs(before).max()
    head = find_lm_head(model, blocks)
    assert head.weight.is_initializer()  # a tied head has its own (rotated, norm-absorbed) weight now
    np.testing.assert_array_equal(_logits(ir.from_proto(in_memory_proto(model)), head_dim=head_dim), after)  # serializes whole


def test_rotation_refuses_a_rotated_model(tiny_onnx):
    model = block_rotation(ir.load(tiny_onnx / "model.onnx"), QuantizeConfig(rotate=True))
    with pytest.raises(InputError, match="rotated already"):
        block_rotation(model, QuantizeConfig(rotate=True))


def test_fitted_block_and_weight_rotations():
    assert [fitted_block(32, 576), fitted_block(128, 576), fitted_block(128, 1536), fitted_block(64, 48)] == [32, 64, 128, 16]
    rng = np.random.default_rng(0)
    w, b = rng.normal(size=(24, 16)), 8
    q = np.kron(np.eye(3), hadamard.hadamard_matrix(b))
    np.testing.assert_allclose(rotate_rows(w, b), q.T @ w, atol=1e-12)
    np.testing.assert_allclose(rotate_columns(w.T, b), w.T @ q, atol=1e-12)
    np.testing.assert_allclose(q @ q.T, np.eye(24), atol=1e-12)


def _hadamard_model(block: int, shape: tuple[int, ...]) -> onnx.ModelProto:
    node = onnx.helper.make_node(schema.BLOCK_HADAMARD, ["X"], ["Y"], domain=schema.DOMAIN, block=block)
    node.overload = hadamard.overload(block)
    graph = onnx.helper.make_graph([node], "h", [onnx.helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, shape)],
                                   [onnx.helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, shape)])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", schema.STANDARD_OPSET),
                                                         onnx.helper.make_opsetid(schema.DOMAIN, 1)],
                                   functions=[hadamard.function_proto(block)])
    model.ir_version = schema.IR_VERSION
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("block", [1, 2, 8, 32, 128])
def test_block_hadamard_body_native_numpy(block):
    x = np.random.default_rng(block).normal(size=(3, 5, 4 * block)).astype(np.float32) * 10
    x[0, 0, :block] = 0  # an all-zero block
    reference = hadamard.block_hadamard(x, block)
    dense = x.astype(np.float64) @ np.kron(np.eye(4), hadamard.hadamard_matrix(block))
    np.testing.assert_allclose(reference, dense, rtol=0, atol=1e-5 * np.abs(dense).max())
    model = _hadamard_model(block, list(x.shape)).SerializeToString()
    body = create_session(model, threads=1, use_native=False).run(None, {"X": x})[0]
    np.testing.assert_array_equal(body, reference)
    if native_library() is None:
        pytest.skip("native library not built")
    native = create_session(model, threads=1).run(None, {"X": x})[0]
    np.testing.assert_array_equal(native, reference)


def test_native_block_hadamard_runs_and_checks_shape():
    if native_library() is None:
        pytest.skip("native library not built")
    session = create_session(_hadamard_model(8, [2, None]).SerializeToString(), threads=1)
    with pytest.raises(Exception, match="BlockHadamard: the last dimension"):  # the kernel's message: it is what runs
        session.run(None, {"X": np.zeros((2, 12), np.float32)})


def test_smoothquant_folds_exactly_into_a_rotated_model(tiny_onnx, tiny_text, tmp_path):
    """down's smoothing scales cannot fold through the online Hadamard: SQ leaves that group alone and the float
    model keeps its logits (sq with float weights and activations: only the folding changes the graph)."""
    out = tmp_path / "rot"
    quantize_model(tiny_onnx, out / "plain", QuantizeConfig(weights="none", acts="none", method="rtn", rotate=True,
                                                            rotate_block=16, progress=False))
    base = _logits(ir.load(out / "plain" / "model.onnx"))
    config = QuantizeConfig(weights="none", acts="none", method="sq", rotate=True, rotate_block=16, calib_path=tiny_text,
                            calib_samples=3, calib_seqlen=48, progress=False)
    quantize_model(tiny_onnx, out / "sq", config)
    model = ir.load(out / "sq" / "model.onnx")
    assert not np.allclose(_norm_weights(model)[0], 1.0)  # SQ folded into the (ones) norm weights
    after = _logits(model)
    assert np.abs(after - base).max() <= 1e-5 * np.abs(base).max()
    assert np.abs(after - _logits(ir.load(tiny_onnx / "model.onnx"))).max() <= 1e-5 * np.abs(base).max()


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq+gptq"])
def test_quantize_with_rotation_round_trip(method, tiny_onnx, tiny_text, tmp_path):
    common = dict(weights="mxfp4-16", acts="mxfp4-16", method=method, calib_path=tiny_text, calib_samples=3,
                  calib_seqlen=48, progress=False)
    result = quantize_model(tiny_onnx, tmp_path / "q", QuantizeConfig(rotate=True, **common))
    assert result["rotation"] == {"block": 16, "residual": 16, "head": 16, "down": 16}
    info = inspect_model(tmp_path / "q")
    assert info["rotation"] == {**result["rotation"], "online": 2}
    # 14 decoder linears and lm_head (MXINT8-32 by default, on the rotated residual stream)
    assert info["quantized_matmuls"] == 15 and info["custom_ops"]["com.mxonnx.BlockHadamard"] == 2
    model = ir.load(tmp_path / "q" / "model.onnx")
    logits = _logits(model)
    reference = _logits(ir.load(tiny_onnx / "model.onnx"))
    assert np.isfinite(logits).all() and np.abs(logits - reference).max() < np.abs(reference).max()
    quantize_model(tiny_onnx, tmp_path / "plain", QuantizeConfig(**common))
    assert inspect_model(tmp_path / "plain")["rotation"] is None
    assert not np.allclose(_logits(ir.load(tmp_path / "plain" / "model.onnx")), logits)
    for target in ("inline", "qdq"):  # the BlockHadamard is inlined (standard ops) by every target
        lowered, counts = lower(ir.load(tmp_path / "q" / "model.onnx"), target)
        assert counts["custom_ops_left"] == 0
        np.testing.assert_allclose(_logits(lowered, use_native=False), _logits(model, use_native=False), rtol=0,
                                   atol=1e-5)


def test_cli_rotate_errors(tiny_onnx, tmp_path, capsys):
    assert main(["quantize", str(tiny_onnx), "-o", str(tmp_path / "a"), "--method", "rtn", "--rotate-block", "16"]) == 2
    assert "--rotate-block" in capsys.readouterr().err
    assert main(["quantize", str(tiny_onnx), "-o", str(tmp_path / "b"), "--method", "rtn", "--rotate",
                 "--rotate-block", "24"]) == 2
    assert "power-of-two" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
