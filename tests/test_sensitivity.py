"""The measured sensitivity of ``--target-bits`` (:mod:`mxonnx.sensitivity`): the divergence of one probed linear is
the whole model's KL, the losses do not move under a rescaling that keeps the model's function (the Hessian error
alone does), and a damaged linear ranks first."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from mxonnx import formats
from mxonnx.allocate import measure_losses
from mxonnx.blockwise import BlockwiseRunner, decoder_feed
from mxonnx.passes.llama_structure import find_decoder_blocks
from mxonnx.sensitivity import kl_divergence, linear_divergences, log_softmax, scaled_losses
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


def test_one_probed_linear_gives_the_models_kl(tiny_onnx, tmp_path):
    model, blocks = load(tiny_onnx)
    ids = windows()
    got = linear_divergences(model, blocks, ids, "mxint4-128", ["layers.1.down_proj"], positions=ids.shape[1])
    assert set(got) == {"layers.1.down_proj"}
    ref = [log_softmax(x) for x in logits(model, ids, blocks, tmp_path)]
    down = blocks[1].down
    set_weight(down, formats.quantize_dequantize(down.weight_array, "mxint4-128", axis=0))
    expected = np.mean([kl_divergence(r, x) for r, x in zip(ref, logits(model, ids, blocks, tmp_path))])
    assert expected > 0
    assert got["layers.1.down_proj"] == pytest.approx(expected, rel=1e-4)


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


def test_context_divergence_is_the_models_kl_beside_the_base_quantized_others(tiny_onnx, tmp_path):
    """``D_ic`` of :func:`context_divergences` is the whole model's KL with every linear rounded in its base format
    but linear ``i``, rounded in ``c``; a candidate equal to the base scores the all-base KL; a budget of one
    block's streams (several runs of origins) gives the same figures as one run."""
    from mxonnx.sensitivity import context_divergences

    model, blocks = load(tiny_onnx)
    ids = windows()
    linears = [l for b in blocks for l in b.linears()]
    base = {l.name: formats.parse_format("mxint4-32") for l in linears}
    names = [blocks[0].v.name, blocks[-1].down.name]
    cands = ["mxint4-128", "mxint4-32", "mxint8-32"]
    got = context_divergences(model, blocks, ids, base, cands, names, positions=ids.shape[1])
    small = context_divergences(model, blocks, ids, base, cands, names, positions=ids.shape[1], budget_bytes=1)
    assert set(got) == set(names)
    for name in names:
        assert small[name] == pytest.approx(got[name], rel=1e-6)

    ref = [log_softmax(x) for x in logits(model, ids, blocks, tmp_path)]
    floats = {l.name: l.weight_array.copy() for l in linears}

    def model_kl(formats_by_name: dict[str, str]) -> float:
        for l in linears:
            set_weight(l, formats.quantize_dequantize(floats[l.name], formats_by_name[l.name], axis=0))
        return float(np.mean([kl_divergence(r, x) for r, x in zip(ref, logits(model, ids, blocks, tmp_path))]))

    all_base = model_kl({l.name: "mxint4-32" for l in linears})
    for name in names:
        assert got[name][1] == pytest.approx(all_base, rel=1e-4)
        for c in (0, 2):
            expected = model_kl({l.name: cands[c] if l.name == name else "mxint4-32" for l in linears})
            assert got[name][c] == pytest.approx(expected, rel=1e-4)
    assert got[blocks[-1].down.name][0] > got[blocks[-1].down.name][2]  # 4 bits in blocks of 128 cost more than 8
