"""``--gptq-float-target`` (asymmetric calibration after GPTAQ): the target weights ``W*`` solve the ridge
regression of the float model's output on the quantized stream's input, so that GPTQ's quadratic loss on ``W*`` is
the float-target loss up to a constant; on equal streams ``W*`` is ``W``; the cross-grams of block 0 (both streams
still equal) are the Hessians when activations are float; the driver runs it and refuses what it cannot do."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import visible_lines

from mxonnx import formats
from mxonnx.blockwise import BlockwiseRunner
from mxonnx.calibrate import block_cross_grams, block_hessians, calibration_windows, load_tokenizer
from mxonnx.cli import main
from mxonnx.gptq import float_target_weights
from mxonnx.modelio import resolve_model
from mxonnx.passes.llama_structure import find_decoder_blocks

import onnx_ir as ir


def streams(n: int = 400, k: int = 24, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, k)) * rng.uniform(0.2, 3.0, k)
    a = x + 0.3 * rng.standard_normal((n, k))  # the quantized prefix's input: the float one plus an error
    return x, a


def test_target_solves_the_ridge_regression_of_the_float_output():
    x, a = streams()
    n, k = x.shape
    w = np.random.default_rng(1).standard_normal((k, 8))
    h, c = 2 / n * a.T @ a, 2 / n * a.T @ x
    damp = 0.05
    target = float_target_weights({"q": w[:, :5], "k": w[:, 5:]}, h, c, damp)
    assert set(target) == {"q", "k"} and target["q"].shape == (k, 5) and target["q"].dtype == np.float32
    v = np.concatenate([target["q"], target["k"]], axis=1).astype(np.float64)
    lam = damp * np.mean(np.diag(h))
    mu = lam * n / 2

    def float_loss(q):
        return np.sum((x @ w - a @ q) ** 2) + mu * np.sum((q - w) ** 2)

    assert np.allclose((a.T @ a + mu * np.eye(k)) @ v, a.T @ x @ w + mu * w, rtol=1e-5, atol=1e-3)  # normal equations
    rng = np.random.default_rng(2)
    for _ in range(3):  # GPTQ's loss on W* equals the float-target loss up to one constant for every Q
        q1, q2 = (np.round(v + rng.standard_normal(v.shape)) for _ in range(2))
        gptq_loss = lambda q: n / 2 * np.trace((v - q).T @ (h + lam * np.eye(k)) @ (v - q))  # noqa: E731
        assert float_loss(q1) - float_loss(q2) == pytest.approx(gptq_loss(q1) - gptq_loss(q2), rel=1e-4)
    assert float_loss(v) < float_loss(w)  # W itself does worse on the float target than W*


def test_equal_streams_keep_the_weights():
    x, _ = streams()
    w = np.random.default_rng(3).standard_normal((x.shape[1], 6)).astype(np.float32)
    h = 2 / len(x) * x.T @ x
    assert np.allclose(float_target_weights({"w": w}, h, h)["w"], w, rtol=1e-5, atol=1e-5)
    assert np.array_equal(float_target_weights({"w": w}, np.zeros_like(h), np.zeros_like(h))["w"], w)  # no signal


def test_block_zero_cross_grams_are_the_hessians_with_float_activations(tiny_onnx, tiny_text):
    model = ir.load(resolve_model(tiny_onnx).onnx)
    blocks = find_decoder_blocks(model)
    windows = calibration_windows(tiny_text, load_tokenizer(tiny_onnx), 4, 32, seed=0)
    runner = BlockwiseRunner(model, blocks, windows)
    float_states = list(runner.hidden_states)
    none = formats.parse_format("none")
    crosses = block_cross_grams(runner, blocks[0], none, float_states)
    hessians = block_hessians(runner, blocks[0], none, advance=True)
    assert set(crosses) == set(hessians)
    for key in hessians:
        assert np.allclose(crosses[key], hessians[key], rtol=1e-4, atol=1e-5 * np.abs(hessians[key]).max()), key
    for moved, advanced in zip(float_states, runner.hidden_states):  # the float stream moved past block 0 as well
        assert np.allclose(moved, advanced, atol=1e-5)
    mx = block_cross_grams(runner, blocks[1], formats.parse_format("mxint4-32"), float_states)
    assert not np.allclose(mx["layers.1.qkv"], block_hessians(runner, blocks[1], none)["layers.1.qkv"], rtol=1e-3)


@pytest.mark.parametrize("flags, message", [
    (["--method", "rtn"], "use a GPTQ method"),
    (["--method", "awq", "--exponent-search"], "use a GPTQ method"),
    (["--no-sequential"], "needs the sequential GPTQ"),
    (["--weights", "int4", "--acts", "int8"], "not int8"),
    (["--float-target-damp", "0"], "finite number > 0"),
])
def test_float_target_refuses_what_it_cannot_do(flags, message, tiny_onnx, tiny_text, tmp_path, capsys):
    out = tmp_path / "q"
    argv = ["quantize", str(tiny_onnx), "-o", str(out), "--calib", str(tiny_text), "--gptq-float-target", *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(visible_lines(err)) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_driver_with_float_target_beats_round_to_nearest(tiny_onnx, tiny_text, tmp_path):
    from test_gptq_pipeline import held_out_windows, logits, logits_mse, run_quantize, stored_weights

    windows = held_out_windows(tiny_onnx, tmp_path)
    reference = logits(tiny_onnx, windows)
    rtn = run_quantize(tiny_onnx, tmp_path / "rtn", tiny_text, "rtn")
    plain = run_quantize(tiny_onnx, tmp_path / "gptq", tiny_text, "gptq", calib_samples=32)
    target = run_quantize(tiny_onnx, tmp_path / "ft", tiny_text, "gptq", calib_samples=32, gptq_float_target=True)
    plain_w, target_w = stored_weights(plain), stored_weights(target)
    assert set(plain_w) == set(target_w)
    differ = {n for n in plain_w if not all(np.array_equal(a, b) for a, b in zip(plain_w[n], target_w[n]))}
    assert differ and "lm_head" not in differ  # lm_head is rounded to nearest either way
    assert logits_mse(target, reference, windows) < 0.8 * logits_mse(rtn, reference, windows)
