"""AWQ's alpha search sees the activation quantization the rewritten graph computes: for static ``int8`` that is
one scale per channel from the calibrated peak (``QuantizeLinear`` with per-channel scales), not a scale per token.
Checked against plain numpy written here, not against the helpers the search uses."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from mxonnx.calibrate import collect_statistics
from mxonnx.config import QuantizeConfig
from mxonnx.formats import quantize_dequantize
from mxonnx.passes.awq import SAMPLE_TOKENS, awq_scales, quantized_inputs, search_group
from mxonnx.passes.llama_structure import find_decoder_blocks


def _static_int8(x: np.ndarray, peak: np.ndarray) -> np.ndarray:
    """Per-channel int8 quantize-dequantize with scale peak_j / 127 (1 for a zero channel), ties to even."""
    scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
    return (np.clip(np.rint(x / scale), -127, 127) * scale).astype(np.float32)


def test_static_int8_inputs_use_the_calibrated_channel_peak():
    rng = np.random.default_rng(0)
    channel_range = np.geomspace(0.01, 50.0, 64)  # very different channel ranges: per token and per channel differ
    x = (rng.standard_normal((40, 64)) * channel_range).astype(np.float32)
    rows = rng.uniform(0.5, 2.0, 64)
    peak = np.abs(x).max(axis=0) * 1.3  # the calibration set saw larger values than this sample
    expected = _static_int8(x / rows, peak / rows)
    got = quantized_inputs(x, rows, "int8", peak)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6 * float(np.abs(expected).max()))
    per_token = quantize_dequantize((x / rows).astype(np.float32), "int8", axis=-1)
    assert np.abs(per_token - expected).max() > 1e-3  # the old search's per-token choice is a different quantizer


def test_int8_search_minimises_the_static_error(tiny_onnx, tiny_text):
    """The alpha chosen for down_proj with int8 activations is the grid argmin of the error recomputed here."""
    model = ir.load(tiny_onnx / "model.onnx")
    blocks = find_decoder_blocks(model)
    config = QuantizeConfig(calib_path=tiny_text, calib_samples=3, calib_seqlen=48, progress=False,
                            weights="mxint4-32", acts="int8", method="awq")
    stats = collect_statistics(model, blocks, tiny_onnx, config, sample_tokens=SAMPLE_TOKENS)["layers.0.down"]
    block, grid = blocks[0], np.linspace(0, 1, 6)
    w = np.asarray(block.groups()["down"][0].weight_array, np.float32)
    x = stats.sample.astype(np.float32)
    errors = []
    for alpha in grid:
        s = awq_scales(stats.mean_abs, alpha)
        xq = _static_int8((x / s).astype(np.float32), stats.max_abs / s)
        wq = quantize_dequantize((w * s[:, None]).astype(np.float32), "mxint4-32", axis=0)
        errors.append(float(np.square(xq.astype(np.float64) @ wq - x.astype(np.float64) @ w).sum()))
    _, alpha = search_group(block, "down", stats, grid, "mxint4-32", "int8")
    assert alpha == grid[int(np.argmin(errors))]


def test_gptq_search_scores_the_scaled_weights_gptq_quantized():
    """``gptq_group_error`` is ``tr(E^T H_s E)`` of GPTQ run on ``s W`` with ``H_s = S^-1 H S^-1``, computed here by
    hand; with ``s = 1`` it is GPTQ's own loss on ``W``, and it never exceeds the same error of round to nearest."""
    from mxonnx.formats import dequantize
    from mxonnx.gptq import gptq_quantize
    from mxonnx.passes.awq import gptq_group_error

    rng = np.random.default_rng(1)
    x = (rng.standard_normal((512, 64)) * np.geomspace(0.1, 10.0, 64)).astype(np.float64)
    h = 2.0 / len(x) * x.T @ x
    weights = [rng.standard_normal((64, 24)).astype(np.float32), rng.standard_normal((64, 8)).astype(np.float32)]
    rows = rng.uniform(0.5, 2.0, 64)
    options = dict(damp=0.01, act_order=False, block_size=128, micro_block=None, exponent_search=False)
    hs = h / np.outer(rows, rows)
    expected = rtn = 0.0
    for w in weights:
        ws = (w.astype(np.float64) * rows[:, None]).astype(np.float32)
        codes, scales = gptq_quantize(ws, hs, "mxint4-32", damp=0.01)
        e = ws - dequantize(codes, scales, "mxint4-32", axis=0)
        expected += float(np.sum((hs @ e) * e))
        r = ws - quantize_dequantize(ws, "mxint4-32", axis=0)
        rtn += float(np.sum((hs @ r) * r))
    got = gptq_group_error(weights, rows, h, "mxint4-32", options)
    assert abs(got - expected) <= 1e-6 * expected
    assert got < rtn


def test_awq_search_gptq_end_to_end(tiny_onnx, tiny_text, tmp_path):
    """``--awq-search gptq`` runs on the tiny model, records alphas from the grid and beats round to nearest; a
    method without AWQ and GPTQ is refused with one line."""
    from conftest import visible_lines
    from test_gptq_pipeline import held_out_windows, logits, logits_mse, run_quantize

    from mxonnx.cli import main
    from mxonnx.passes.awq import ALPHA_METADATA

    windows = held_out_windows(tiny_onnx, tmp_path)
    reference = logits(tiny_onnx, windows)
    rtn = logits_mse(run_quantize(tiny_onnx, tmp_path / "rtn", tiny_text, "rtn"), reference, windows)
    out = run_quantize(tiny_onnx, tmp_path / "ag", tiny_text, "awq+gptq", awq_search="gptq", calib_samples=32)
    assert logits_mse(out, reference, windows) < 0.8 * rtn
    import json
    alphas = json.loads(ir.load(out / "model.onnx").metadata_props[ALPHA_METADATA])
    grid = set(np.round(np.linspace(0, 1, 20), 4))
    assert alphas and all(a in grid for block in alphas for a in block.values())

    code = main(["quantize", str(tiny_onnx), "-o", str(tmp_path / "bad"), "--method", "gptq", "--awq-search", "gptq"])
    assert code == 2 and not (tmp_path / "bad").exists()
