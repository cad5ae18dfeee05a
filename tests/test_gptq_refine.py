"""``--gptq-refine N``: coordinate descent on GPTQ's layer loss after Algorithm 1 (mxonnx.gptq.
refine_by_coordinate_descent). Each sweep keeps the shared exponents, never raises the loss ``tr(D^T H D)``, and
stops moving once every channel sits at its grid minimum; in the driver it changes the codes and keeps block
0's exponents; without GPTQ it is refused with one line."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import visible_lines
from test_gptq_pipeline import run_quantize

from mxonnx import formats
from mxonnx.cli import main
from mxonnx.gptq import gptq_quantize


def correlated_problem(k: int = 128, n: int = 48, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A weight and a Hessian of correlated inputs with a few large channels, as real linears see them."""
    rng = np.random.default_rng(seed)
    mix = np.eye(k) + 0.4 * rng.standard_normal((k, k)) / np.sqrt(k)
    x = rng.standard_normal((4 * k, k)) @ mix
    x[:, :3] *= 6.0
    return (0.05 * rng.standard_normal((k, n))).astype(np.float32), 2.0 / len(x) * x.T @ x


def layer_loss(w: np.ndarray, h: np.ndarray, codes: np.ndarray, scales: np.ndarray, fmt: str) -> float:
    d = (w - formats.dequantize(codes, scales, fmt, axis=0)).astype(np.float64)
    return float(np.einsum("kn,kl,ln->", d, h, d))


@pytest.mark.parametrize("fmt", ["mxint4-32", "mxfp4-32", "int4-g32"])
@pytest.mark.parametrize("exponent_search", [False, True])
def test_sweeps_lower_the_layer_loss_and_keep_the_scales(fmt, exponent_search):
    w, h = correlated_problem()
    kwargs = dict(act_order=True, exponent_search=exponent_search, damp=0.0001)
    losses, scales = [], []
    for sweeps in (0, 1, 3):
        c, s = gptq_quantize(w, h, fmt, refine_sweeps=sweeps, **kwargs)
        losses.append(layer_loss(w, h, c, s, fmt))
        scales.append(s)
    assert losses[1] < losses[0] and losses[2] <= losses[1] * (1 + 1e-6)
    assert losses[2] < 0.995 * losses[0]  # the refinement does something on correlated inputs
    for s in scales[1:]:
        np.testing.assert_array_equal(s, scales[0])


def test_a_converged_solution_does_not_move():
    """With a diagonal Hessian GPTQ already rounds every channel to its nearest grid point: nothing to refine."""
    w, _ = correlated_problem()
    h = np.diag(np.linspace(1.0, 3.0, len(w)))
    plain = gptq_quantize(w, h, "mxint4-32", act_order=True)
    refined = gptq_quantize(w, h, "mxint4-32", act_order=True, refine_sweeps=4)
    for a, b in zip(plain, refined):
        np.testing.assert_array_equal(a, b)


def test_refine_in_the_driver(tiny_onnx, tiny_text, tmp_path):
    def stored(folder):
        return {t.name: onnx.numpy_helper.to_array(t)
                for t in onnx.load(str(folder / "model.onnx")).graph.initializer}

    plain = stored(run_quantize(tiny_onnx, tmp_path / "plain", tiny_text, "gptq"))
    refined = stored(run_quantize(tiny_onnx, tmp_path / "cd", tiny_text, "gptq", gptq_refine=2))
    codes = [n for n in plain if n.endswith(".weight_codes")]
    assert codes and set(plain) == set(refined)
    assert sum(not np.array_equal(plain[n], refined[n]) for n in codes) >= len(codes) // 2
    # block 0 sees the same inputs either way, so its exponents are GPTQ's own (later blocks see other inputs)
    first = [n for n in plain if n.startswith("layers.0.") and n.endswith(".weight_exponents")]
    assert len(first) == 7
    for n in first:
        np.testing.assert_array_equal(plain[n], refined[n])


def test_refine_needs_gptq(tiny_onnx, tiny_text, tmp_path, capsys):
    out = tmp_path / "q"
    argv = ["quantize", str(tiny_onnx), "-o", str(out), "--calib", str(tiny_text), "--method", "awq",
            "--gptq-refine", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--gptq-refine" in err and len(visible_lines(err)) == 1
    assert not out.exists()
