"""SmoothQuant and AWQ folded into the weights: the float graph computes the same logits, no node is added,
GQA scales go into v_proj's columns, AWQ at alpha 0 is plain RTN, the searched AWQ scales beat RTN and reach the grid
minimum of the output error (computed in the test from the formats alone), shared norm weights get their own copy."""

from __future__ import annotations

import collections
import json

import numpy as np
import onnx_ir as ir
import pytest

from conftest import in_memory_proto
from mxonnx.blockwise import decoder_feed
from mxonnx.calibrate import collect_statistics
from mxonnx.config import QuantizeConfig
from mxonnx.errors import InputError
from mxonnx.formats import quantize_dequantize
from mxonnx.passes.awq import SAMPLE_TOKENS, awq, awq_block_scales, awq_scales
from mxonnx.passes.llama_structure import find_decoder_blocks
from mxonnx.passes.mx_matmul import rewrite_mx_matmuls, static_activation_scales
from mxonnx.passes.smoothing import (
    SmoothingPass, choose_block_scales, fold_smoothing_scales, folded_rows, per_kv_channel, sane_scales, to_o_inputs)
from mxonnx.passes.smoothquant import smoothquant, smoothquant_scale, smoothquant_scales, weight_row_max
from mxonnx.session import create_session


GROUPS = ("qkv", "o", "gate_up", "down")


def _config(text, **kw) -> QuantizeConfig:
    return QuantizeConfig(calib_path=text, calib_samples=3, calib_seqlen=48, progress=False,
                          weights="mxint4-32", acts="mxint8-32", **kw)


def _logits(model: ir.Model) -> np.ndarray:
    session = create_session(in_memory_proto(model).SerializeToString())
    ids = np.random.default_rng(1).integers(3, 96, size=(2, 37))
    return session.run(["logits"], decoder_feed(list(model.graph.inputs), ids, num_kv_heads=2, head_dim=16))[0]


def _ops(model: ir.Model) -> collections.Counter:
    return collections.Counter((n.domain, n.op_type) for n in model.graph)


def _linear_weights(model: ir.Model) -> list[np.ndarray]:
    return [lin.weight_array for b in find_decoder_blocks(model) for lin in b.linears()]


def _group_weights(block, group: str) -> list[np.ndarray]:
    return [lin.weight_array for lin in block.groups()[group]]


def _statistics(model, blocks, folder, config):
    """The statistics the method needs, on the model as it is (AWQ's search: with sampled rows)."""
    search = config.uses_awq and config.alpha is None
    return collect_statistics(model, blocks, folder, config, sample_tokens=SAMPLE_TOKENS if search else 0)


def _smooth(model, blocks, stats, config):
    return (smoothquant if config.uses_smoothquant else awq)(model, blocks, stats, config)


@pytest.mark.parametrize("fixture", ["tiny_onnx", "tiny_onnx_nopast"])
@pytest.mark.parametrize("method", ["sq", "awq"])
def test_folding_keeps_logits_and_nodes(method, fixture, request, tiny_text):
    folder = request.getfixturevalue(fixture)
    model = ir.load(folder / "model.onnx")
    blocks = find_decoder_blocks(model)
    before, ops, count, weights = _logits(model), _ops(model), len(model.graph), _linear_weights(model)
    config = _config(tiny_text, method=method)
    _smooth(model, blocks, _statistics(model, blocks, folder, config), config)
    assert len(model.graph) == count and _ops(model) == ops
    moved = [not np.array_equal(a, b) for a, b in zip(weights, _linear_weights(model))]
    assert all(moved) if method == "sq" else any(moved)  # AWQ may choose alpha 0 (no change) for some groups
    after = _logits(model)
    assert np.abs(after - before).max() <= 1e-5 * np.abs(before).max()
    reloaded = ir.from_proto(in_memory_proto(model))  # the folded model serializes with its new weights
    np.testing.assert_array_equal(_logits(reloaded), after)


def test_gqa_scales_fold_into_v_columns(tiny_onnx):
    model = ir.load(tiny_onnx / "model.onnx")
    blocks = find_decoder_blocks(model)
    block = blocks[0]
    assert (block.num_heads, block.num_kv_heads, block.head_dim) == (4, 2, 16)
    v, o, before = block.v.weight_array.copy(), block.o.weight_array.copy(), _logits(model)
    s_kv = np.random.default_rng(0).uniform(0.25, 4.0, size=2 * 16)
    SmoothingPass(blocks, lambda b, group: s_kv if (b.index, group) == (0, "o") else None)(model)
    np.testing.assert_allclose(block.v.weight_array, v / s_kv, rtol=1e-6)
    rows = np.concatenate([s_kv[:16], s_kv[:16], s_kv[16:], s_kv[16:]])  # query heads 0,1 read KV head 0
    np.testing.assert_allclose(block.o.weight_array, o * rows[:, None], rtol=1e-6)
    assert np.abs(_logits(model) - before).max() <= 1e-5 * np.abs(before).max()


def test_folded_weights_are_computed_when_read(tiny_onnx):
    """Folding keeps no copy of a weight: it becomes a lazy tensor of the memory-mapped source and its scales,
    equal bit for bit to folding eagerly in float64 (o's columns into v, then qkv's rows), and reading weights
    leaves no external data mapped."""
    model = ir.load(tiny_onnx / "model.onnx")
    blocks = find_decoder_blocks(model)
    block = blocks[0]
    assert isinstance(block.v.weight.const_value, ir.ExternalTensor)
    v = block.v.weight_array
    rng = np.random.default_rng(1)
    scales = {"o": rng.uniform(0.25, 4.0, size=32), "qkv": rng.uniform(0.25, 4.0, size=64)}
    SmoothingPass(blocks, lambda b, group: scales.get(group) if b.index == 0 else None)(model)
    assert isinstance(block.v.weight.const_value, ir.LazyTensor)
    eager = ((v.astype(np.float64) * (1.0 / scales["o"])).astype(np.float32).astype(np.float64)
             * scales["qkv"][:, None]).astype(np.float32)
    np.testing.assert_array_equal(block.v.weight_array, eager)
    for linear in (lin for b in blocks for lin in b.linears()):
        linear.weight_array
    mapped = [v.name for v in model.graph.initializers.values()
              if isinstance(v.const_value, ir.ExternalTensor) and v.const_value.raw is not None]
    assert not mapped
    # the row scales folded, per group (o: repeated over the query heads)
    folded = folded_rows(block, scales)
    assert sorted(folded) == ["layers.0.o", "layers.0.qkv"]
    np.testing.assert_array_equal(folded["layers.0.o"], to_o_inputs(scales["o"], block))


def test_chosen_scales_see_the_weights_folding_gives(tiny_onnx):
    """``choose_block_scales`` hands each group its weights as folding the groups before it (FOLD_ORDER) makes
    them: v_proj divided by o's scales, up_proj by down's, bit for bit what the folded model then holds."""
    model = ir.load(tiny_onnx / "model.onnx")
    block = find_decoder_blocks(model)[1]
    rng = np.random.default_rng(2)
    proposed = {"o": rng.uniform(0.25, 4.0, 32), "down": rng.uniform(0.25, 4.0, 128),
                "qkv": rng.uniform(0.25, 4.0, 64), "gate_up": rng.uniform(0.25, 4.0, 64)}
    seen = {}

    def choose(group, weights):
        seen[group] = weights(group)
        return proposed[group]

    scales = choose_block_scales(block, choose)
    assert list(seen) == ["o", "down", "qkv", "gate_up"] and scales.keys() == proposed.keys()
    unfolded = {g: _group_weights(block, g) for g in proposed}
    fold_smoothing_scales(model, [block], {block.index: {"o": scales["o"], "down": scales["down"]}})
    v, up = seen["qkv"][2], seen["gate_up"][1]
    np.testing.assert_array_equal(v, block.v.weight_array)
    np.testing.assert_array_equal(up, block.up.weight_array)
    assert not np.array_equal(v, unfolded["qkv"][2]) and not np.array_equal(up, unfolded["gate_up"][1])
    np.testing.assert_array_equal(seen["qkv"][0], unfolded["qkv"][0])


def test_kv_channel_reduction_layout(tiny_onnx):
    block = find_decoder_blocks(ir.load(tiny_onnx / "model.onnx"))[0]
    per_o = np.arange(64.0)
    np.testing.assert_array_equal(per_kv_channel(per_o, block), np.concatenate([np.arange(16, 32), np.arange(48, 64)]))
    np.testing.assert_array_equal(per_kv_channel(per_o, block, np.mean), np.concatenate([np.arange(8, 24), np.arange(40, 56)]))
    np.testing.assert_array_equal(to_o_inputs(np.arange(32.0), block)[16:32], np.arange(16.0))


def test_smoothquant_balances_activation_and_weight_maxima(tiny_onnx, tiny_text):
    """At alpha 0.5 (Eq. 3) each smoothed input channel's max equals its smoothed weight row's max."""
    model = ir.load(tiny_onnx / "model.onnx")
    blocks = find_decoder_blocks(model)
    config = _config(tiny_text, method="sq")
    stats = collect_statistics(model, blocks, tiny_onnx, config)
    x, w = stats["layers.1.down"].max_abs, weight_row_max(_group_weights(blocks[1], "down"))
    np.testing.assert_allclose(smoothquant_scale(blocks[1], "down", stats["layers.1.down"], 0.5), np.sqrt(x / w), rtol=1e-6)
    smoothquant(model, blocks, stats, config)
    smoothed = collect_statistics(model, blocks, tiny_onnx, config)
    for block in blocks:
        for group in ("qkv", "gate_up", "down"):
            np.testing.assert_allclose(smoothed[f"layers.{block.index}.{group}"].max_abs,
                                       weight_row_max(_group_weights(block, group)), rtol=1e-4)
        np.testing.assert_allclose(per_kv_channel(smoothed[f"layers.{block.index}.o"].max_abs, block),
                                   per_kv_channel(weight_row_max(_group_weights(block, "o")), block), rtol=1e-4)


def test_awq_alpha_zero_is_rtn_bit_for_bit(tiny_onnx, tiny_text):
    model = ir.load(tiny_onnx / "model.onnx")
    blocks = find_decoder_blocks(model)
    config = _config(tiny_text, method="awq")
    stats = _statistics(model, blocks, tiny_onnx, config)
    initializers = {name: v.const_value.numpy().copy() for name, v in model.graph.initializers.items()}
    rtn = [quantize_dequantize(w, "mxint4-32", axis=0) for w in _linear_weights(model)]
    awq(model, blocks, stats, config, alphas=[0.0])
    assert json.loads(model.metadata_props["mxonnx.awq_alpha"]) == [dict.fromkeys(GROUPS, 0.0)] * 2
    for name, array in initializers.items():
        assert model.graph.initializers[name].const_value.numpy().tobytes() == array.tobytes(), name
    for expected, w in zip(rtn, _linear_weights(model)):
        assert quantize_dequantize(w, "mxint4-32", axis=0).tobytes() == expected.tobytes()
    rtn_model = ir.load(tiny_onnx / "model.onnx")  # the RTN rewrite of both graphs: identical weights
    rewrite_mx_matmuls(rtn_model, config)
    rewrite_mx_matmuls(model, config)
    assert {n: v.const_value.tobytes() for n, v in model.graph.initializers.items()} == \
        {n: v.const_value.tobytes() for n, v in rtn_model.graph.initializers.items()}


def _row_factors(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """The factor each row of a weight ``[K, N]`` was multiplied by: ``||after_k|| / ||before_k||``."""
    return np.linalg.norm(after.astype(np.float64), axis=1) / np.linalg.norm(before.astype(np.float64), axis=1)


def _output_error(x: np.ndarray, weights: list[np.ndarray], rows: np.ndarray) -> float:
    """``sum_W ||Q_a(X / r) Q_w(r W) - X W||^2`` in float64 (MXINT8-32 activations along K, MXINT4-32 weights along
    K), written here from the formats alone."""
    xq = quantize_dequantize((x / rows).astype(np.float32), "mxint8-32", axis=-1).astype(np.float64)
    total = 0.0
    for w in weights:
        wq = quantize_dequantize((w * rows[:, None]).astype(np.float32), "mxint4-32", axis=0).astype(np.float64)
        total += float(np.square(xq @ wq - x.astype(np.float64) @ w.astype(np.float64)).sum())
    return total


@pytest.fixture
def searched_awq(tiny_onnx, tiny_text):
    """The tiny model through the searched AWQ pass: ``(blocks, stats, alphas, groups)`` with, per ``(block, group)``,
    the row factors the pass folded (read from the weights before and after it; q, o, gate, down have no column
    folding) and the group's weights as they were before its own scales (``after / rows``)."""
    model = ir.load(tiny_onnx / "model.onnx")
    blocks = find_decoder_blocks(model)
    config = _config(tiny_text, method="awq")
    stats = _statistics(model, blocks, tiny_onnx, config)
    before = {(b.index, g): np.array(_group_weights(b, g)[0]) for b in blocks for g in GROUPS}
    awq(model, blocks, stats, config)
    alphas = json.loads(model.metadata_props["mxonnx.awq_alpha"])
    groups = {}
    for block in blocks:
        for group in GROUPS:
            after = _group_weights(block, group)
            rows = _row_factors(before[block.index, group], after[0])
            groups[block.index, group] = rows, [w.astype(np.float64) / rows[:, None] for w in after]
    return blocks, stats, alphas, groups


def test_awq_search_beats_alpha_zero(searched_awq):
    """Every group's quantized output error on the calibration sample is, with the scales the searched AWQ pass folds
    into the model, at most the error of plain RTN (alpha 0), and below it where a non-zero alpha was chosen; the
    error is computed here in numpy, with the row scales read from the weights before and after the pass."""
    blocks, stats, alphas, groups = searched_awq
    improved = 0
    for block in blocks:
        for group in GROUPS:
            rows, unscaled = groups[block.index, group]
            x = stats[f"layers.{block.index}.{group}"].sample.astype(np.float64)
            searched, rtn = _output_error(x, unscaled, rows), _output_error(x, unscaled, np.ones_like(rows))
            assert searched <= rtn * (1 + 1e-6), (block.index, group, alphas[block.index][group], searched, rtn)
            if alphas[block.index][group] > 0:
                assert searched < rtn, (block.index, group)
                improved += 1
            else:
                np.testing.assert_allclose(rows, 1.0, rtol=1e-6)
    assert improved >= 2  # the search moved some groups away from RTN


def test_awq_alpha_is_the_grid_minimum(searched_awq):
    """The folded scales reach the smallest output error over the alpha grid, both computed here: Eq. 5
    ``s = m^a / sqrt(max(m^a) min(m^a))`` with ``m = mean|X|`` (floored at 1e-5 of its max; o_proj: averaged over
    the query heads of a KV head, repeated over them) and the error of ``_output_error``."""
    from mxonnx.passes.awq import default_grid

    blocks, stats, _, groups = searched_awq
    for block in blocks:
        rep = block.num_heads // block.num_kv_heads
        for group in GROUPS:
            rows, unscaled = groups[block.index, group]
            st = stats[f"layers.{block.index}.{group}"]
            m = st.mean_abs.astype(np.float64)
            if group == "o":
                m = m.reshape(block.num_kv_heads, rep, block.head_dim).mean(axis=1)
            m = np.maximum(m, 1e-5 * m.max())
            x = st.sample.astype(np.float64)
            errors = []
            for a in default_grid():
                s = m ** a / np.sqrt((m ** a).max() * (m ** a).min())
                if group == "o":
                    s = np.repeat(s.reshape(block.num_kv_heads, 1, block.head_dim), rep, axis=1).reshape(-1)
                errors.append(_output_error(x, unscaled, s))
            assert _output_error(x, unscaled, rows) <= min(errors) * (1 + 1e-6), (block.index, group)


def test_fixed_awq_alpha_skips_the_search(tiny_onnx, tiny_text):
    """A fixed --alpha collects no samples and folds Eq. 5's ``s = m^a / sqrt(max(m^a) min(m^a))`` (m = mean|X|)."""
    model = ir.load(tiny_onnx / "model.onnx")
    blocks = find_decoder_blocks(model)
    config = _config(tiny_text, method="awq", alpha=0.3)
    fixed = _statistics(model, blocks, tiny_onnx, config)
    assert fixed["layers.0.down"].sample is None  # no search: no samples collected
    down = np.array(blocks[0].down.weight_array)
    awq(model, blocks, fixed, config)
    assert json.loads(model.metadata_props["mxonnx.awq_alpha"]) == [dict.fromkeys(GROUPS, 0.3)] * 2
    m = fixed["layers.0.down"].mean_abs.astype(np.float64) ** 0.3
    np.testing.assert_allclose(_row_factors(down, blocks[0].down.weight_array), m / np.sqrt(m.max() * m.min()),
                               rtol=1e-5)


def test_shared_norm_weight_gets_its_own_initializer(tiny_onnx, tiny_text):
    """Both attention norms read one initializer through Identity nodes: each gets its own weight, the
    Identities and the shared initializer become unused and are removed."""
    model = ir.load(tiny_onnx / "model.onnx")
    blocks = find_decoder_blocks(model)
    shared = blocks[0].attn_norm.weight
    for block in blocks:
        identity = ir.node("Identity", [shared], name=f"shared_norm_{block.index}")
        model.graph.insert_before(block.attn_norm.node, identity)
        old = block.attn_norm.weight
        index = list(block.attn_norm.node.inputs).index(old)
        block.attn_norm.node.replace_input_with(index, identity.outputs[0])
        block.attn_norm.weight = identity.outputs[0]
        if old is not shared:
            model.graph.initializers.pop(old.name)
    before, count = _logits(model), len(model.graph)
    config = _config(tiny_text, method="sq")
    smoothquant(model, blocks, collect_statistics(model, blocks, tiny_onnx, config), config)
    assert len(model.graph) == count - 2 and not any(n.name.startswith("shared_norm") for n in model.graph)
    assert shared.name not in model.graph.initializers
    assert all(b.attn_norm.weight.is_initializer() and b.attn_norm.weight in b.attn_norm.node.inputs for b in blocks)
    assert np.abs(_logits(model) - before).max() <= 1e-5 * np.abs(before).max()


@pytest.mark.parametrize("method", ["sq", "awq"])
def test_folded_scales_carry_input_ranges_over(method, tiny_onnx, tiny_text):
    """Static int8 ranges taken from the statistics before folding divided by the folded row scales equal those of
    a calibration pass over the folded model (what the driver does instead of a second pass)."""
    model = ir.load(tiny_onnx / "model.onnx")
    blocks = find_decoder_blocks(model)
    config = _config(tiny_text, method=method, **({"alpha": 0.7} if method == "awq" else {}))
    stats = _statistics(model, blocks, tiny_onnx, config)
    choose = smoothquant_scales if method == "sq" else (lambda b, st, c: awq_block_scales(b, st, c)[0])
    scales = {b.index: choose(b, stats, config) for b in blocks}
    fold_smoothing_scales(model, blocks, scales)
    folded = {key: rows for b in blocks for key, rows in folded_rows(b, scales[b.index]).items()}
    assert sorted(folded) == sorted(f"layers.{b.index}.{g}" for b in blocks for g in GROUPS)
    derived = static_activation_scales(stats, blocks, folded)
    measured = static_activation_scales(collect_statistics(model, blocks, tiny_onnx, config), blocks)
    unfolded = static_activation_scales(stats, blocks)
    assert derived.keys() == measured.keys()
    for name in measured:
        np.testing.assert_allclose(derived[name], measured[name], rtol=1e-5, err_msg=name)
    assert sum(not np.allclose(unfolded[n], measured[n], rtol=1e-3) for n in measured) >= len(measured) // 2


def test_scales_are_sane():
    s = sane_scales(np.array([0.0, -1.0, np.inf, np.nan, 1e-9, 1e9, 2.5]))
    np.testing.assert_array_equal(s, [1.0, 1.0, 1.0, 1.0, 1e-5, 1e5, 2.5])
    floor = np.sqrt(4e-5)  # mean|X| floored at 1e-5 of its maximum
    np.testing.assert_allclose(awq_scales(np.array([1.0, 4.0, 0.0]), 0.5), np.array([1.0, 2.0, floor]) / np.sqrt(2 * floor))
    np.testing.assert_array_equal(awq_scales(np.zeros(3), 0.5), np.ones(3))


def test_awq_search_without_samples_is_refused(tiny_onnx, tiny_text):
    model = ir.load(tiny_onnx / "model.onnx")
    blocks = find_decoder_blocks(model)
    config = _config(tiny_text, method="awq")
    stats = collect_statistics(model, blocks, tiny_onnx, config)
    with pytest.raises(InputError, match="AWQ search needs sampled calibration inputs"):
        awq(model, blocks, stats, config)
