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
