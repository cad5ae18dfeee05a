"""Perplexity block by block (``mxonnx.stream_eval``) equals the whole-graph perplexity on float, quantized (fused
or not) and lowered tiny Llamas; the residual stream is found from the graph alone; the automatic choice and the
CLI flag."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from mxonnx.blockwise import residual_boundaries
from mxonnx.cli import main
from mxonnx.config import QuantizeConfig
from mxonnx.errors import InputError
from mxonnx.eval import evaluate_perplexity
from mxonnx.lower import lower_model
from mxonnx.passes.llama_structure import find_decoder_blocks
from mxonnx.quantize import quantize_model
from mxonnx.stream_eval import StreamedCausalLM, residual_stream, whole_graph_bytes

SEQLEN = 32


def _both(folder, text, **kwargs) -> tuple[dict, dict]:
    whole = evaluate_perplexity(folder, data=text, seqlen=SEQLEN, max_windows=4, progress=False, blockwise=False,
                                **kwargs)
    streamed = evaluate_perplexity(folder, data=text, seqlen=SEQLEN, max_windows=4, progress=False, blockwise=True,
                                   **kwargs)
    assert (whole["path"], streamed["path"]) == ("whole-graph", "blockwise")
    return whole, streamed


@pytest.fixture(scope="module")
def quantized(tiny_onnx, tmp_path_factory):
    out = tmp_path_factory.mktemp("stream") / "w4a8"
    quantize_model(tiny_onnx, out, QuantizeConfig(weights="mxint4-32", acts="mxint8-32", method="rtn", progress=False))
    return out


@pytest.mark.parametrize("fixture", ["tiny_onnx", "tiny_onnx_nopast"])
def test_residual_stream_is_the_blockwise_runners(request, fixture):
    model = ir.load(request.getfixturevalue(fixture) / "model.onnx")
    assert residual_stream(model.graph) == residual_boundaries(find_decoder_blocks(model))


@pytest.mark.parametrize("fixture", ["tiny_onnx", "tiny_onnx_nopast"])
def test_float_perplexity_equals_whole_graph(request, fixture, tiny_text):
    whole, streamed = _both(request.getfixturevalue(fixture), tiny_text)
    assert streamed["perplexity"] == pytest.approx(whole["perplexity"], rel=1e-6)
    assert (streamed["windows"], streamed["tokens"]) == (whole["windows"], whole["tokens"])


@pytest.mark.parametrize("native", ["1", "0"])
def test_quantized_perplexity_equals_whole_graph(quantized, tiny_text, monkeypatch, native):
    """With the native library the linears run fused (MXMatMul), without it as function bodies."""
    monkeypatch.setenv("MXONNX_NO_NATIVE", "0" if native == "1" else "1")
    whole, streamed = _both(quantized, tiny_text)
    assert streamed["perplexity"] == pytest.approx(whole["perplexity"], rel=1e-6)


@pytest.mark.parametrize("target", ["inline", "qdq", "matmulnbits"])
def test_lowered_perplexity_equals_whole_graph(quantized, tiny_text, tmp_path, target):
    lower_model(quantized, tmp_path / target, target)
    whole, streamed = _both(tmp_path / target, tiny_text)
    assert streamed["perplexity"] == pytest.approx(whole["perplexity"], rel=1e-6)


def test_residual_stream_of_quantized_and_lowered_graphs(tiny_onnx, quantized, tmp_path):
    """Two blocks in every form: the cut does not depend on MatMuls with constant weights."""
    lower_model(quantized, tmp_path / "inline", "inline")
    names = [v.name for v in residual_stream(ir.load(tiny_onnx / "model.onnx").graph)]
    for folder in (quantized, tmp_path / "inline"):
        assert [v.name for v in residual_stream(ir.load(folder / "model.onnx").graph)] == names


def test_chunks_of_one_window_give_the_same_logits(tiny_onnx):
    windows = np.random.default_rng(0).integers(3, 96, size=(3, SEQLEN))
    one_chunk = list(StreamedCausalLM(tiny_onnx / "model.onnx").window_logits(windows))
    chunked = list(StreamedCausalLM(tiny_onnx / "model.onnx", state_budget=1).window_logits(windows))
    assert len(one_chunk) == len(chunked) == 3 and one_chunk[0].shape == (SEQLEN, 96)
    for a, b in zip(one_chunk, chunked):
        np.testing.assert_array_equal(a, b)


def test_automatic_choice_follows_the_budget(tiny_onnx, tiny_text, monkeypatch):
    size = whole_graph_bytes(tiny_onnx / "model.onnx")
    assert size > (tiny_onnx / "model.onnx_data").stat().st_size
    monkeypatch.setenv("MXONNX_EVAL_BUDGET_MB", str(size / 2**20 / 2))
    small = evaluate_perplexity(tiny_onnx, data=tiny_text, seqlen=SEQLEN, max_windows=2, progress=False)
    monkeypatch.setenv("MXONNX_EVAL_BUDGET_MB", str(size / 2**20 * 2))
    large = evaluate_perplexity(tiny_onnx, data=tiny_text, seqlen=SEQLEN, max_windows=2, progress=False)
    assert (small["path"], large["path"]) == ("blockwise", "whole-graph")
    assert small["perplexity"] == pytest.approx(large["perplexity"], rel=1e-6)


def test_float16_weights_count_their_float32_copies(tiny_onnx, tmp_path):
    model = onnx.load(tiny_onnx / "model.onnx")
    for tensor in model.graph.initializer:
        assert tensor.data_type == onnx.TensorProto.FLOAT
    onnx.save(model, tmp_path / "model.onnx")
    float32 = whole_graph_bytes(tmp_path / "model.onnx")
    big = next(t for t in model.graph.initializer if len(t.dims) == 2)
    array = onnx.numpy_helper.to_array(big).astype(np.float16)
    big.CopyFrom(onnx.numpy_helper.from_array(array, big.name))
    onnx.save(model, tmp_path / "model.onnx")
    # 2 bytes an element stored instead of 4, plus the float32 copy of 4 (a few bytes of proto framing apart)
    assert whole_graph_bytes(tmp_path / "model.onnx") - float32 == pytest.approx(array.size * (2 - 4 + 4), abs=64)


def test_graph_without_residual_stream_is_refused():
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2]))
    relu = ir.node("Relu", [x])
    neg = ir.node("Neg", relu.outputs)
    add = ir.node("Add", [relu.outputs[0], neg.outputs[0]])  # one residual Add: not a decoder block
    graph = ir.Graph([x], add.outputs, nodes=[relu, neg, add], opset_imports={"": 18})
    with pytest.raises(InputError, match="longest chain of residual Adds has 1"):
        residual_stream(graph)


def test_cli_blockwise_flag(tiny_onnx, tiny_text, capsys):
    argv = ["eval", str(tiny_onnx), "--data", str(tiny_text), "--seqlen", str(SEQLEN), "--max-windows", "2", "--json"]
    assert main([*argv, "--blockwise"]) == 0
    streamed = json.loads(capsys.readouterr().out)
    assert main([*argv, "--no-blockwise"]) == 0
    whole = json.loads(capsys.readouterr().out)
    assert (streamed["path"], whole["path"]) == ("blockwise", "whole-graph")
    assert streamed["perplexity"] == pytest.approx(whole["perplexity"], rel=1e-6)


def test_one_session_open_at_a_time(tiny_onnx, monkeypatch):
    """The prefix, each block and the head get one session each, and each is closed before the next one opens."""
    import gc
    import weakref

    import mxonnx.stream_eval

    real, alive, counts = mxonnx.stream_eval.open_region_session, weakref.WeakSet(), {"opened": 0, "most_alive": 0}

    class Session:  # onnxruntime's sessions take no weak references
        def __init__(self, session):
            self.run = session.run

    def counting(*args, **kwargs):
        gc.collect()
        session = Session(real(*args, **kwargs))
        alive.add(session)
        counts["opened"] += 1
        counts["most_alive"] = max(counts["most_alive"], len(alive))
        return session

    monkeypatch.setattr(mxonnx.stream_eval, "open_region_session", counting)
    lm = StreamedCausalLM(tiny_onnx / "model.onnx")
    assert len(list(lm.window_logits(np.random.default_rng(0).integers(3, 96, size=(2, SEQLEN))))) == 2
    assert counts == {"opened": 1 + lm.num_blocks + 1, "most_alive": 1}


def test_graph_that_cannot_be_cut(tiny_onnx, tiny_text, monkeypatch, capsys):
    """By default the whole graph runs instead (with a warning); asked for, block by block fails with one line."""
    import mxonnx.stream_eval

    monkeypatch.setattr(mxonnx.stream_eval, "residual_adds", lambda graph: {})
    monkeypatch.setenv("MXONNX_EVAL_BUDGET_MB", "0")
    with pytest.warns(UserWarning, match="whole graph at once: cannot cut"):
        r = evaluate_perplexity(tiny_onnx, data=tiny_text, seqlen=SEQLEN, max_windows=1, progress=False)
    assert r["path"] == "whole-graph"
    argv = ["eval", str(tiny_onnx), "--data", str(tiny_text), "--seqlen", str(SEQLEN), "--blockwise"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mxonnx eval: ") and "cannot cut the graph" in err[0]
