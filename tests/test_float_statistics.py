"""``--float-statistics``: SmoothQuant/AWQ take their statistics on the float model's inputs (as ``--no-sequential``
does) while GPTQ stays on the quantized prefix's, so the folded scales are ``--no-sequential``'s and the GPTQ weights
the sequential run's own; combinations it cannot mean are refused (resume: ``tests/test_resume.py``)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from conftest import visible_lines
from test_gptq_pipeline import run_quantize, stored_weights

from mxonnx.cli import main
from mxonnx.passes.llama_structure import find_decoder_blocks


def norm_weights(folder, source) -> list[np.ndarray]:
    """The RMSNorm weights of the quantized model in ``folder``, found by their names in the float ``source``."""
    names = [n.weight.name for b in find_decoder_blocks(ir.load(source / "model.onnx")) for n in (b.attn_norm, b.mlp_norm)]
    initializers = ir.load(folder / "model.onnx").graph.initializers
    return [np.asarray(initializers[name].const_value.numpy()) for name in names]


def same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    """Equal up to float32 rounding: ``--no-sequential`` moves its stream through the block after the scales are
    folded (an exact identity in real numbers), ``--float-statistics`` before."""
    return len(a) == len(b) and all(np.allclose(x, y, rtol=1e-5, atol=0) for x, y in zip(a, b))


@pytest.mark.parametrize("method", ["sq+gptq", "awq+gptq"])
def test_smoothing_from_the_float_model_gptq_on_the_prefix(method, tiny_onnx, tiny_text, tmp_path):
    prefix = run_quantize(tiny_onnx, tmp_path / "prefix", tiny_text, method)
    floats = run_quantize(tiny_onnx, tmp_path / "float", tiny_text, method, float_statistics=True)
    independent = run_quantize(tiny_onnx, tmp_path / "independent", tiny_text, method, sequential=False)
    # block 0 sees the same inputs either way; later blocks' scales are the float model's, as without sequence
    norms = {name: norm_weights(folder, tiny_onnx) for name, folder in
             (("prefix", prefix), ("float", floats), ("independent", independent))}
    assert same(norms["float"], norms["independent"])
    assert not same(norms["float"][2:], norms["prefix"][2:])
    assert same(norms["float"][:2], norms["prefix"][:2])
    # GPTQ still runs on the quantized prefix: the weights after block 0 are neither run's
    weights = {name: stored_weights(folder) for name, folder in
               (("float", floats), ("independent", independent))}
    later = [n for n in weights["float"] if n.startswith("layers.1.")]
    assert later and any(not np.array_equal(weights["float"][n][0], weights["independent"][n][0]) for n in later)


@pytest.mark.parametrize("flags, message", [
    (["--method", "gptq"], "use sq, awq, sq+gptq or awq+gptq"),
    (["--method", "rtn"], "use sq, awq, sq+gptq or awq+gptq"),
    (["--no-sequential"], "--no-sequential already takes every statistic"),
])
def test_refuses_what_it_cannot_mean(flags, message, tiny_onnx, tiny_text, tmp_path, capsys):
    out = tmp_path / "q"
    argv = ["quantize", str(tiny_onnx), "-o", str(out), "--calib", str(tiny_text), "--float-statistics", *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(visible_lines(err)) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []
