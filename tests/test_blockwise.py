"""The block-at-a-time runner reproduces the full graph: hidden states after every block, the inputs of every
linear group, and the effect of a block modified between calls (new weights, a block rewritten into a
model-local function); each call opens one session."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import mxonnx.blockwise as blockwise
from conftest import in_memory_proto
from mxonnx import formats
from mxonnx.blockwise import BlockwiseRunner, decoder_feed
from mxonnx.errors import InputError
from mxonnx.passes.llama_structure import find_decoder_blocks
from mxonnx.session import create_session

GROUPS = ("qkv", "o", "gate_up", "down")


@pytest.fixture(params=["tiny_onnx", "tiny_onnx_nopast"])
def model(request) -> ir.Model:
    return ir.load(request.getfixturevalue(request.param) / "model.onnx")


@pytest.fixture
def windows() -> np.ndarray:
    return np.random.default_rng(0).integers(3, 96, size=(3, 16))


def full_graph(model: ir.Model, values: list[ir.Value], windows: np.ndarray) -> list[list[np.ndarray]]:
    """Per window, ``values`` as the whole graph computes them (exposed as extra outputs of a proto copy); the tiny
    Llama has 2 KV heads of 16."""
    proto = in_memory_proto(model)
    proto.graph.output.extend(onnx.ValueInfoProto(name=v.name) for v in values)
    session = create_session(proto.SerializeToString())
    return [session.run([v.name for v in values], decoder_feed(list(model.graph.inputs), w[None], 2, 16))
            for w in windows]


def captured(runner: BlockwiseRunner, index: int) -> dict[str, list[np.ndarray]]:
    seen: dict[str, list[np.ndarray]] = {}
    runner.capture(index, lambda group, x: seen.setdefault(group, []).append(x.copy()))
    return seen


def test_advance_reproduces_hidden_states(model, windows):
    blocks = find_decoder_blocks(model)
    runner = BlockwiseRunner(model, blocks, windows)
    expected = full_graph(model, runner.boundaries, windows)
    for index in range(len(blocks)):
        np.testing.assert_allclose(np.stack(runner.hidden_states), np.stack([e[index] for e in expected]), atol=1e-5)
        runner.advance(index)
    assert runner.position == runner.num_blocks == len(blocks)
    last = np.stack([e[-1] for e in expected])
    np.testing.assert_allclose(np.stack(runner.hidden_states), last, atol=1e-5)
    assert np.abs(last).max() > 0.01


def test_capture_gives_group_inputs(model, windows):
    blocks = find_decoder_blocks(model)
    runner = BlockwiseRunner(model, blocks, windows)
    values = [block.groups()[g][0].input for block in blocks for g in GROUPS]
    expected = full_graph(model, values, windows)
    for block in blocks:
        seen = captured(runner, block.index)
        assert set(seen) == set(GROUPS)
        for g, name in enumerate(GROUPS):
            k = block.groups()[name][0].shape[0]
            want = [e[block.index * len(GROUPS) + g].reshape(-1, k) for e in expected]
            assert [x.shape for x in seen[name]] == [(windows.shape[1], k)] * len(windows)
            np.testing.assert_allclose(np.stack(seen[name]), np.stack(want), atol=1e-5)
        runner.advance(block.index)


def test_capture_with_advance_is_capture_then_advance(tiny_onnx, windows):
    model = ir.load(tiny_onnx / "model.onnx")
    blocks = find_decoder_blocks(model)
    separate, together = BlockwiseRunner(model, blocks, windows), BlockwiseRunner(model, blocks, windows)
    for block in blocks:
        expected = captured(separate, block.index)
        separate.advance(block.index)
        seen: dict[str, list[np.ndarray]] = {}
        together.capture(block.index, lambda group, x: seen.setdefault(group, []).append(x.copy()), advance=True)
        assert together.position == separate.position == block.index + 1
        for group in GROUPS:
            np.testing.assert_array_equal(np.stack(seen[group]), np.stack(expected[group]))
        np.testing.assert_array_equal(np.stack(together.hidden_states), np.stack(separate.hidden_states))


def test_interrupted_advance_leaves_runner_unusable(tiny_onnx, windows):
    model = ir.load(tiny_onnx / "model.onnx")
    runner = BlockwiseRunner(model, find_decoder_blocks(model), windows)
    calls = []

    def stop_at_second_window(group: str, x: np.ndarray) -> None:
        calls.append(group)
        if len(calls) > len(GROUPS):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        runner.capture(0, stop_at_second_window, advance=True)
    with pytest.raises(ValueError, match="interrupted pass"):
        runner.advance(0)


def test_later_blocks_see_modified_weights(tiny_onnx, windows):
    model = ir.load(tiny_onnx / "model.onnx")
    blocks = find_decoder_blocks(model)
    runner = BlockwiseRunner(model, blocks, windows)
    before = full_graph(model, [blocks[1].q.input], windows)
    down = blocks[0].down.weight
    down.const_value = ir.tensor(down.const_value.numpy() * -2.0, name=down.name)
    runner.advance(0)
    after = full_graph(model, [blocks[1].q.input], windows)
    got = np.stack(captured(runner, 1)["qkv"])
    hidden = blocks[1].q.shape[0]
    np.testing.assert_allclose(got, np.stack([a[0].reshape(-1, hidden) for a in after]), atol=1e-5)
    assert not np.allclose(got, np.stack([b[0].reshape(-1, hidden) for b in before]), atol=1e-3)


def _halving_matmul() -> ir.Function:
    """``test.local::HalfMatMul(x, w) = MatMul(x, w) * 0.5`` as a model-local function."""
    x, w = ir.Value(name="x"), ir.Value(name="w")
    matmul = ir.node("MatMul", [x, w])
    half = ir.node("Constant", [], attributes={"value": ir.tensor(np.float32(0.5))})
    mul = ir.node("Mul", [matmul.outputs[0], half.outputs[0]])
    body = ir.Graph([x, w], [mul.outputs[0]], nodes=[matmul, half, mul], opset_imports={"": 18})
    return ir.Function("test.local", "HalfMatMul", graph=body, attributes=[])


def test_block_rewritten_into_function_runs(model, windows):
    """A block whose linears became custom-domain calls of model-local functions (as the MX rewrite produces)."""
    blocks = find_decoder_blocks(model)
    runner = BlockwiseRunner(model, blocks, windows)
    unchanged = full_graph(model, [runner.boundaries[1]], windows)
    function = _halving_matmul()
    model.functions[function.identifier()] = function
    model.opset_imports["test.local"] = 1
    for linear in blocks[0].linears():
        call = ir.node("HalfMatMul", list(linear.node.inputs), domain="test.local")
        model.graph.insert_before(linear.node, call)
        linear.node.outputs[0].replace_all_uses_with(call.outputs[0])
        model.graph.remove(linear.node, safe=True)
    expected = full_graph(model, [runner.boundaries[1]], windows)
    runner.advance(0)
    np.testing.assert_allclose(np.stack(runner.hidden_states), np.stack([e[0] for e in expected]), atol=1e-5)
    assert not np.allclose(np.stack(runner.hidden_states), np.stack([u[0] for u in unchanged]), atol=1e-3)


def test_one_session_per_call(tiny_onnx, windows, monkeypatch):
    model = ir.load(tiny_onnx / "model.onnx")
    opened = []
    real = blockwise.create_session
    monkeypatch.setattr(blockwise, "create_session", lambda *a, **k: opened.append(1) or real(*a, **k))
    runner = BlockwiseRunner(model, find_decoder_blocks(model), windows)
    assert len(opened) == 1  # the prefix
    runner.capture(0, lambda group, x: None)
    runner.advance(0)
    runner.capture(1, lambda group, x: None)
    assert len(opened) == 4


def test_block_inputs(tiny_onnx, windows):
    model = ir.load(tiny_onnx / "model.onnx")
    runner = BlockwiseRunner(model, find_decoder_blocks(model), windows)
    feeds = list(runner.block_inputs(0))
    assert len(feeds) == len(windows)
    hidden = runner.boundaries[0].name
    for feed, h in zip(feeds, runner.hidden_states):
        assert feed[hidden] is h
        assert {"past_key_values.0.key", "past_key_values.0.value"} <= set(feed)
        assert feed["past_key_values.0.key"].shape == (1, 2, 0, 16)


def test_calls_out_of_order_are_refused(tiny_onnx, windows):
    model = ir.load(tiny_onnx / "model.onnx")
    runner = BlockwiseRunner(model, find_decoder_blocks(model), windows)
    with pytest.raises(ValueError, match="inputs of block 0"):
        runner.advance(1)
    with pytest.raises(ValueError, match="inputs of block 0"):
        runner.block_inputs(1)


@pytest.mark.parametrize("bad", [np.zeros((0, 8), np.int64), np.zeros(8, np.int64), np.zeros((2, 8), np.float32)])
def test_bad_windows_are_refused(tiny_onnx, bad):
    model = ir.load(tiny_onnx / "model.onnx")
    with pytest.raises(InputError, match=r"\[n, seqlen\] integer array"):
        BlockwiseRunner(model, find_decoder_blocks(model), bad)


def static_int8(x: np.ndarray, scales: np.ndarray) -> np.ndarray:
    return (np.clip(np.round(x / scales), -128, 127) * scales).astype(np.float32)


@pytest.mark.parametrize("acts", ["mxint8-32", "mxfp8e4m3-16", "int8", "none"])
def test_capture_grams_are_gram_matrices_of_quantized_inputs(tiny_onnx, windows, acts):
    model = ir.load(tiny_onnx / "model.onnx")
    blocks = find_decoder_blocks(model)
    fmt = formats.parse_format(acts)
    inputs, grams = BlockwiseRunner(model, blocks, windows), BlockwiseRunner(model, blocks, windows)
    for block in blocks:
        seen = captured(inputs, block.index)
        # static int8: scales from a quarter of each group's range, so that clipping is exercised too
        scales = {group: (np.abs(np.concatenate(seen[group])).max(axis=0) / 4 / 127 + 1e-6).astype(np.float32)
                  for group in GROUPS}
        got: dict[str, list[np.ndarray]] = {}
        grams.capture_grams(block.index, fmt, lambda group, xtx, n: got.setdefault(group, []).append((xtx, n)),
                            advance=True, group_scales=scales if fmt.kind == "int" else None)
        for group in GROUPS:
            for x, (xtx, tokens) in zip(seen[group], got[group]):
                if fmt.kind == "int":
                    a = static_int8(x, scales[group])
                    assert (np.abs(x) > 127.5 * scales[group]).any()  # some values are clipped
                else:
                    a = x if fmt.kind == "none" else formats.quantize_dequantize(x, fmt, axis=-1)
                assert tokens == x.shape[0] and xtx.shape == (x.shape[1], x.shape[1])
                np.testing.assert_allclose(xtx, a.T.astype(np.float64) @ a, rtol=1e-4, atol=1e-4 * np.abs(xtx).max())
        inputs.advance(block.index)
        np.testing.assert_array_equal(np.stack(grams.hidden_states), np.stack(inputs.hidden_states))


def test_block_protos_keep_external_weights_as_references(tiny_onnx, windows, tmp_path):
    """A block's serialized region points at the model's external data file (onnxruntime reads it from the folder
    returned) instead of carrying the weights; a tensor from another folder is embedded. Same results either way."""
    import shutil

    model = ir.load(tiny_onnx / "model.onnx")
    blocks = find_decoder_blocks(model)
    runner = BlockwiseRunner(model, blocks, windows)
    nodes, inputs = runner._block_region(0, [runner.boundaries[1]])
    feeds = runner._feeds(0, [v.name for v in inputs])
    proto, folder = blockwise.subgraph_proto(model, nodes, inputs, [runner.boundaries[1]], feeds)
    assert folder == str(tiny_onnx.resolve())
    stored = {t.name: t.data_location for t in proto.graph.initializer}
    q_weight = blocks[0].q.weight.name
    assert stored[q_weight] == onnx.TensorProto.EXTERNAL
    assert sum(loc == onnx.TensorProto.EXTERNAL for loc in stored.values()) >= 7  # the block's seven linears
    expected = captured(runner, 0)

    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.copy(tiny_onnx / "model.onnx_data", moved / "model.onnx_data")
    blocks[0].q.weight.const_value.base_dir = str(moved)
    proto, folder = blockwise.subgraph_proto(model, nodes, inputs, [runner.boundaries[1]], feeds)
    assert folder == str(tiny_onnx.resolve())
    q_proto = next(t for t in proto.graph.initializer if t.name == q_weight)
    assert q_proto.data_location != onnx.TensorProto.EXTERNAL and len(q_proto.raw_data) > 0
    for group, arrays in captured(runner, 0).items():
        for got, want in zip(arrays, expected[group]):
            np.testing.assert_array_equal(got, want)


def test_external_references_onnxruntime_would_refuse_are_embedded(tiny_onnx, tmp_path):
    """An absolute location, or a data file that resolves outside its folder (a symlink into a cache), is read by
    onnx-ir but refused by onnxruntime: such tensors are embedded."""
    data = (tiny_onnx / "model.onnx_data").resolve()
    tensor = find_decoder_blocks(ir.load(tiny_onnx / "model.onnx"))[0].q.weight.const_value
    assert blockwise.reference_folder(tensor) == str(tiny_onnx.resolve())
    absolute = ir.ExternalTensor(str(data), tensor.offset, tensor.length, tensor.dtype, shape=tensor.shape,
                                 name=tensor.name, base_dir=str(tiny_onnx))
    linked = tmp_path / "snapshot"
    linked.mkdir()
    (linked / "model.onnx_data").symlink_to(data)
    outside = ir.ExternalTensor("model.onnx_data", tensor.offset, tensor.length, tensor.dtype, shape=tensor.shape,
                                name=tensor.name, base_dir=str(linked))
    assert blockwise.reference_folder(absolute) is None and blockwise.reference_folder(outside) is None

    model = ir.load(tiny_onnx / "model.onnx")  # every external weight absolute: all embedded, no folder
    for value in model.graph.initializers.values():
        if isinstance(value.const_value, ir.ExternalTensor):
            t = value.const_value
            value.const_value = ir.ExternalTensor(str(data), t.offset, t.length, t.dtype, shape=t.shape, name=t.name,
                                                  base_dir=str(tiny_onnx))
    runner = BlockwiseRunner(model, find_decoder_blocks(model), np.random.default_rng(0).integers(3, 96, size=(1, 8)))
    nodes, inputs = runner._block_region(0, [runner.boundaries[1]])
    proto, folder = blockwise.subgraph_proto(model, nodes, inputs, [runner.boundaries[1]],
                                             runner._feeds(0, [v.name for v in inputs]))
    assert folder is None and all(t.data_location != onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    runner.advance(0)  # onnxruntime runs the embedded block
