"""``--true-sequential``: GPTQ one linear group at a time inside a block, each group's Hessians taken with the groups
before it quantized. Block 0's q/k/v see the same inputs either way (the same codes); its later groups see quantized
q/k/v, o_proj (and so on) and differ; the result beats round to nearest; a method without sequential GPTQ, and the
float target (whose float stream needs the block unrewritten), are refused with one line."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import visible_lines
from test_gptq_pipeline import held_out_windows, logits, logits_mse, run_quantize, stored_weights

from mxonnx.cli import main


def test_groups_after_the_first_see_the_quantized_ones(tiny_onnx, tiny_text, tmp_path):
    plain = stored_weights(run_quantize(tiny_onnx, tmp_path / "plain", tiny_text, "gptq"))
    staged = stored_weights(run_quantize(tiny_onnx, tmp_path / "staged", tiny_text, "gptq", true_sequential=True))
    assert set(plain) == set(staged)
    same = {n for n in plain if all(np.array_equal(a, b) for a, b in zip(plain[n], staged[n]))}
    assert {"layers.0.q_proj", "layers.0.k_proj", "layers.0.v_proj", "lm_head"} <= same
    assert {"layers.0.o_proj", "layers.0.down_proj", "layers.1.q_proj"}.isdisjoint(same)


def test_true_sequential_beats_round_to_nearest(tiny_onnx, tiny_text, tmp_path):
    windows = held_out_windows(tiny_onnx, tmp_path)
    reference = logits(tiny_onnx, windows)
    rtn = logits_mse(run_quantize(tiny_onnx, tmp_path / "rtn", tiny_text, "rtn"), reference, windows)
    out = run_quantize(tiny_onnx, tmp_path / "ts", tiny_text, "awq+gptq", true_sequential=True, calib_samples=32)
    assert logits_mse(out, reference, windows) < 0.8 * rtn


@pytest.mark.parametrize("flags", [["--method", "awq"], ["--no-sequential"], ["--gptq-float-target"]])
def test_true_sequential_needs_sequential_gptq(flags, tiny_onnx, tiny_text, tmp_path, capsys):
    out = tmp_path / "q"
    argv = ["quantize", str(tiny_onnx), "-o", str(out), "--calib", str(tiny_text), "--true-sequential", *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--true-sequential" in err and len(visible_lines(err)) == 1
    assert not out.exists()
