"""The measured sensitivity of ``--target-bits`` (:mod:`mxonnx.sensitivity`): the divergence of each probed linear
is the whole model's KL with it alone rounded, the losses do not move under a rescaling that keeps the model's function (the Hessian error
alone does), and a damaged linear ranks first."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from mxonnx import formats
from mxonnx.allocate import measure_losses
from mxonnx.blockwise import BlockwiseRunner, decoder_feed
from mxonnx.passes.llama_structure import find_decoder_blocks
from mxonnx.sensitivity import (formats_to_measure, kl_divergence, linear_divergences, log_softmax, measured_divergences,
                                measured_losses, scaled_losses)
from mxonnx.session import create_session

CANDIDATES = ["mxint4-128", "mxint4-32", "mxint8-32"]


def load(folder):
    model = ir.load(folder / "model.onnx")
    return model, find_decoder_blocks(model)


def windows(n: int = 3, seqlen: int = 24, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, 96, (n, seqlen))


def set_weight(linear, array: np.ndarray) -> None:
    linear.weight.const_value = ir.tensor(np.asarray(array, np.float32), name=linear.weight.name)


def logits(model: ir.Model, ids: np.ndarray, blocks, tmp_path) -> list[np.ndarray]:
    path = tmp_path / f"whole{len(list(tmp_path.glob('*.onnx')))}.onnx"
    ir.save(model, path, external_data=f"{path.name}_data")
    session = create_session(path)
    return [session.run(["logits"], decoder_feed(list(model.graph.inputs), w[None], blocks[0].num_kv_heads,
                                                 blocks[0].head_dim))[0][0] for w in ids]


@pytest.mark.parametrize("max_streams", [64, 1])
def test_each_probed_linear_gives_the_models_kl(max_streams, tiny_onnx, tmp_path):
    """D_i is the KL of the whole model with linear i alone rounded, for linears of different blocks, however many
    streams a pass carries."""
    model, blocks = load(tiny_onnx)
    ids = windows()
    names = ["layers.0.v_proj", "layers.1.down_proj", "layers.1.q_proj"]
    got = linear_divergences(model, blocks, ids, "mxint4-128", names, positions=ids.shape[1], max_streams=max_streams)
    assert set(got) == set(names)
    ref = [log_softmax(x) for x in logits(model, ids, blocks, tmp_path)]
    by_name = {l.name: l for b in blocks for l in b.linears()}
    for name in names:
        linear = by_name[name]
        original = linear.weight_array.copy()
        set_weight(linear, formats.quantize_dequantize(original, "mxint4-128", axis=0))
        expected = np.mean([kl_divergence(r, x) for r, x in zip(ref, logits(model, ids, blocks, tmp_path))])
        set_weight(linear, original)
        assert expected > 0
        assert got[name] == pytest.approx(expected, rel=1e-4), name


def sensitivities(model, blocks, ids):
    names = [l.name for b in blocks for l in b.linears()]
    raw = measure_losses(BlockwiseRunner(model, blocks, ids), blocks, names, CANDIDATES)
    return raw, scaled_losses(raw, linear_divergences(model, blocks, ids, CANDIDATES[0], names), 0)


def test_losses_ignore_a_rescaling_that_keeps_the_function(tiny_onnx, tmp_path):
    """v_proj x 8 with o_proj / 8 (attention is linear in V), up_proj x 8 with down_proj / 8 (the MLP is linear in
    up): the same model, MX rounding commutes with powers of two; the Hessian errors of v and up grow 64-fold."""
    model, blocks = load(tiny_onnx)
    ids = windows()
    raw, scaled = sensitivities(model, blocks, ids)
    before = logits(model, ids, blocks, tmp_path)
    for big, small in ((blocks[0].v, blocks[0].o), (blocks[1].up, blocks[1].down)):
        set_weight(big, big.weight_array * 8)
        set_weight(small, small.weight_array / 8)
    np.testing.assert_allclose(logits(model, ids, blocks, tmp_path)[0], before[0], rtol=1e-4, atol=1e-5)
    raw2, scaled2 = sensitivities(model, blocks, ids)
    for name in ("layers.0.v_proj", "layers.1.up_proj"):
        np.testing.assert_allclose(raw2[name], np.array(raw[name]) * 64, rtol=1e-3)
    for name in scaled:
        np.testing.assert_allclose(scaled2[name], scaled[name], rtol=2e-3, err_msg=name)
    assert len({round(row[0], 12) for row in scaled.values()}) > 1


def test_a_damaged_linear_ranks_first(tiny_onnx):
    """Input channel 0 of block 0's MLP scaled by 2^-10 in the norm and row 0 of up_proj by 2^10 (gate_proj keeps
    its row): the float output is as before, but rounding to MXINT4-128 now zeroes the rest of up_proj's columns."""
    model, blocks = load(tiny_onnx)
    norm, up = blocks[0].mlp_norm, blocks[0].up
    gain = np.array(norm.weight_array, np.float32)
    gain[0] /= 1024
    norm.weight.const_value = ir.tensor(gain, name=norm.weight.name)
    w = up.weight_array
    w[0] *= 1024
    set_weight(up, w)
    names = [l.name for b in blocks for l in b.linears()]
    got = linear_divergences(model, blocks, windows(), "mxint4-128", names)
    assert set(got) == set(names) and all(v >= 0 for v in got.values())
    assert max(got, key=got.get) == "layers.0.up_proj"


def test_several_formats_per_linear_are_each_measured(tiny_onnx):
    model, blocks = load(tiny_onnx)
    ids = windows()
    table = measured_divergences(model, blocks, ids, {"layers.0.o_proj": ["mxint4-128", "mxint4-32"],
                                                      "layers.1.up_proj": ["mxint4-32"]}, max_streams=2)
    assert {k: set(v) for k, v in table.items()} == {"layers.0.o_proj": {"mxint4-128", "mxint4-32"},
                                                     "layers.1.up_proj": {"mxint4-32"}}
    for name, row in table.items():
        for fmt, value in row.items():
            assert value == pytest.approx(linear_divergences(model, blocks, ids, fmt, [name])[name], rel=1e-6)


def test_measured_losses_carry_unmeasured_candidates_and_never_rise_as_the_error_falls():
    cands = ["mxint4-128", "mxint4-32", "mxint4-16", "mxint8-32"]
    losses = {"a": [8.0, 4.0, 2.0, 0.01], "b": [8.0, 4.0, 2.0, 0.01], "c": [0.0, 0.0, 0.0, 0.0]}
    assert {k: [f.name for f in v] for k, v in formats_to_measure(losses, cands, 0).items()} == {
        "a": cands[:3], "b": cands[:3], "c": cands[:1]}
    divergences = {"a": {"mxint4-128": 0.4, "mxint4-32": 0.1, "mxint4-16": 0.05},
                   "b": {"mxint4-128": 0.4, "mxint4-32": 0.5, "mxint4-16": 0.3},  # 4-32 measured worse than 4-128
                   "c": {"mxint4-128": 0.0}}
    got = measured_losses(losses, divergences, cands, 0)
    assert got["a"] == pytest.approx([0.4, 0.1, 0.05, 0.4 * 0.01 / 8])
    assert got["b"] == pytest.approx([0.4, 0.4, 0.3, 0.0005])
    assert got["c"] == [0.0, 0.0, 0.0, 0.0]
