"""``mxonnx quantize`` with GPTQ on the tiny Llama: the output runs, its weights are valid codes of the format close
to the float weights, its logits are nearer the float model's than round-to-nearest's on held-out text; sequential
and non-sequential calibration give the same first block and different later ones; GPTQ after SmoothQuant/AWQ
beats the smoothing alone; raised dampening is reported once per linear group; lm_head (MXINT8-32 by default, or in the
decoder's formats) is rounded to nearest; bad settings exit 2 with one line and write nothing."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from conftest import make_text
from transformers import AutoConfig

import mxonnx.gptq
from mxonnx import formats
from mxonnx.calibrate import calibration_windows, load_tokenizer
from mxonnx.cli import main
from mxonnx.config import LM_HEAD_DEFAULT, QuantizeConfig
from mxonnx.errors import InputError
from mxonnx.eval import OrtCausalLM
from mxonnx.ops import schema
from mxonnx.passes.llama_structure import find_decoder_blocks, find_lm_head
from mxonnx.quantize import AVAILABLE_METHODS, quantize_model

WEIGHTS, ACTS = "mxint4-32", "mxint8-32"
CALIB = {"calib_samples": 8, "calib_seqlen": 64}  # 512 tokens >= the widest linear input (128)


def run_quantize(src: Path, out: Path, text: Path, method: str, **overrides) -> Path:
    settings = {"weights": WEIGHTS, "acts": ACTS, "calib_path": text, "progress": False, **CALIB, **overrides}
    quantize_model(src, out, QuantizeConfig(method=method, **settings))
    return out


def held_out_windows(folder: Path, tmp_path: Path) -> np.ndarray:
    """[4, 64] token windows of text drawn like the calibration text but with another seed."""
    text = make_text(tmp_path / "held_out.txt", seed=7)
    return calibration_windows(text, load_tokenizer(folder), 4, 64, seed=0)


def logits(folder: Path, windows: np.ndarray) -> np.ndarray:
    model = OrtCausalLM(folder / "model.onnx", AutoConfig.from_pretrained(folder))
    return np.concatenate([model.logits(w[None]) for w in windows])


def logits_mse(folder: Path, reference: np.ndarray, windows: np.ndarray) -> float:
    return float(np.mean(np.square(logits(folder, windows) - reference, dtype=np.float64)))


def stored_weights(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{linear name: (codes as integers, exponents)}`` of every MXDequantize in the model."""
    model = ir.load(folder / "model.onnx")
    found = {}
    for node in model.graph:
        if node.op_type == schema.DEQUANTIZE and node.domain == schema.DOMAIN:
            codes, exponents = (np.asarray(v.const_value.numpy()) for v in node.inputs)
            found[node.name.removesuffix("/MXDequantize")] = (codes.astype(np.int8), exponents)
    return found


@pytest.mark.parametrize("fixture", ["tiny_onnx", "tiny_onnx_nopast"])
def test_gptq_end_to_end(fixture, request, tiny_text, tmp_path, capsys):
    src = request.getfixturevalue(fixture)
    out = tmp_path / "gptq"
    argv = ["quantize", str(src), "-o", str(out), "--method", "gptq", "--weights", WEIGHTS, "--acts", ACTS,
            "--calib", str(tiny_text), "--calib-samples", "8", "--calib-seqlen", "64", "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["method"], result["weights"], result["acts"]) == ("gptq", WEIGHTS, ACTS)
    rtn = run_quantize(src, tmp_path / "rtn", tiny_text, "rtn")

    float_weights = {lin.name: lin.weight_array for b in find_decoder_blocks(ir.load(src / "model.onnx"))
                     for lin in b.linears()}
    gptq, rounded = stored_weights(out), stored_weights(rtn)
    assert set(gptq) == set(float_weights) | {"lm_head"} and len(float_weights) == 14
    source = ir.load(src / "model.onnx")
    head = formats.quantize(find_lm_head(source, find_decoder_blocks(source)).weight_array, LM_HEAD_DEFAULT, axis=0)
    for stored in (gptq["lm_head"], rounded["lm_head"]):  # lm_head by default: MXINT8-32, rounded to nearest
        np.testing.assert_array_equal(stored[0], head[0])
        np.testing.assert_array_equal(stored[1], head[1])
    fmt = formats.parse_format(WEIGHTS)
    for name, w in float_weights.items():
        codes, exponents = gptq[name]
        assert codes.shape == w.shape and exponents.shape == (-(-w.shape[0] // fmt.block_size), w.shape[1])
        assert codes.min() >= -7 and codes.max() <= 7  # symmetric MXINT4: k in -7..7
        decoded = formats.dequantize(codes, exponents, fmt, axis=0)  # with the exponents as stored
        # GPTQ trades weight error for output error (here ~19% vs RTN's ~12%); a misplaced exponent would be >= 50%
        assert np.linalg.norm(decoded - w) < 0.3 * np.linalg.norm(w), name
        assert not np.array_equal(codes, rounded[name][0]), name

    windows = held_out_windows(src, tmp_path)
    reference = logits(src, windows)
    assert logits_mse(out, reference, windows) < 0.8 * logits_mse(rtn, reference, windows)


def test_gptq_beats_rtn_for_other_calibration_seeds(tiny_onnx, tiny_text, tmp_path):
    windows = held_out_windows(tiny_onnx, tmp_path)
    reference = logits(tiny_onnx, windows)
    rtn_mse = logits_mse(run_quantize(tiny_onnx, tmp_path / "rtn", tiny_text, "rtn"), reference, windows)
    for seed in (1, 2):
        out = run_quantize(tiny_onnx, tmp_path / f"gptq{seed}", tiny_text, "gptq", seed=seed)
        assert logits_mse(out, reference, windows) < 0.8 * rtn_mse, seed


def test_sequential_and_non_sequential_differ_after_the_first_block(tiny_onnx, tiny_text, tmp_path):
    sequential = stored_weights(run_quantize(tiny_onnx, tmp_path / "seq", tiny_text, "gptq", sequential=True))
    parallel = stored_weights(run_quantize(tiny_onnx, tmp_path / "par", tiny_text, "gptq", sequential=False))
    for name in sequential:
        same = all(np.array_equal(a, b) for a, b in zip(sequential[name], parallel[name]))
        # block 0 sees the same (float) inputs either way; block 1 sees a quantized or a float block 0; lm_head is
        # rounded to nearest either way
        assert same == (name.startswith("layers.0.") or name == "lm_head"), name


def static_activation_quantizers(folder: Path) -> dict[str, np.ndarray]:
    """``{activation name: int8 scales}`` of every QuantizeLinear that reads an activation (not a weight)."""
    model = ir.load(folder / "model.onnx")
    return {node.inputs[0].name: np.asarray(node.inputs[1].const_value.numpy()) for node in model.graph
            if node.op_type == "QuantizeLinear" and node.inputs[0].const_value is None}


def test_gptq_with_static_int8_activations(tiny_onnx, tiny_text, tmp_path):
    """The paper's fixed-point baseline with GPTQ: INT4 per-channel weights, static per-channel int8 activations.
    The activation ranges of a block are calibrated on its inputs before its weights are quantized, so block 0's
    equal round-to-nearest's (later blocks read differently quantized predecessors), and GPTQ's Hessians see the
    activations through those quantizers."""
    settings = {"weights": "int4", "acts": "int8"}
    rtn = run_quantize(tiny_onnx, tmp_path / "rtn", tiny_text, "rtn", **settings)
    gptq = run_quantize(tiny_onnx, tmp_path / "gptq", tiny_text, "gptq", **settings)
    rtn_scales, gptq_scales = static_activation_quantizers(rtn), static_activation_quantizers(gptq)
    assert len(gptq_scales) == 8 and gptq_scales.keys() == rtn_scales.keys()
    first_block = [name for name in gptq_scales if "layers.0" in name]
    assert len(first_block) == 4
    for name in first_block:
        np.testing.assert_array_equal(gptq_scales[name], rtn_scales[name], err_msg=name)
    assert any(not np.array_equal(gptq_scales[n], rtn_scales[n]) for n in gptq_scales if n not in first_block)
    windows = held_out_windows(tiny_onnx, tmp_path)
    reference = logits(tiny_onnx, windows)
    assert logits_mse(gptq, reference, windows) < 0.8 * logits_mse(rtn, reference, windows)


@pytest.mark.parametrize("smoothing", ["sq", "awq"])
def test_gptq_after_smoothing_beats_smoothing_alone(smoothing, tiny_onnx, tiny_text, tmp_path):
    combined = f"{smoothing}+gptq"
    if combined not in AVAILABLE_METHODS:
        pytest.skip(f"{combined} is not wired into mxonnx.quantize yet")
    windows = held_out_windows(tiny_onnx, tmp_path)
    reference = logits(tiny_onnx, windows)
    alone = run_quantize(tiny_onnx, tmp_path / smoothing, tiny_text, smoothing)
    with_gptq = run_quantize(tiny_onnx, tmp_path / "combined", tiny_text, combined)
    assert logits_mse(with_gptq, reference, windows) < 0.8 * logits_mse(alone, reference, windows)


def test_bad_gptq_input_exits_2_and_writes_nothing(tiny_onnx, tiny_text, tmp_path, capsys):
    out = tmp_path / "q"
    calib = ["--calib", str(tiny_text), "--calib-samples", "8", "--calib-seqlen", "64"]
    cases = {
        "micro-block": (["--gptq-micro-block", "48", *calib], tiny_onnx, "not a multiple of the block size 32"),
        "too few tokens": (["--calib", str(tiny_text), "--calib-samples", "2", "--calib-seqlen", "32"], tiny_onnx,
                           "at least 128 calibration tokens"),
        "no weights": (["--weights", "none", *calib], tiny_onnx, "--weights none leaves nothing to do"),
        "negative damp": (["--damp", "-0.1", *calib], tiny_onnx, "dampening must be"),
        "no tokenizer": (calib, tiny_onnx / "model.onnx", "needs the model folder with its tokenizer"),
    }
    for name, (flags, src, message) in cases.items():
        argv = ["quantize", str(src), "-o", str(out), "--method", "gptq", "--weights", WEIGHTS, *flags]
        assert main(argv) == 2, name
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (name, err)
        assert not out.exists() and not list(tmp_path.glob(".q*")), name


def test_too_small_calibration_fails_before_smoothing(tiny_onnx, tiny_text, tmp_path, capsys, monkeypatch):
    """``awq+gptq`` refuses a calibration set smaller than GPTQ needs before the AWQ statistics pass runs."""
    import mxonnx.quantize

    def no_statistics(*args, **kwargs):
        raise AssertionError("the AWQ statistics pass ran")

    monkeypatch.setattr(mxonnx.quantize, "block_statistics", no_statistics)
    argv = ["quantize", str(tiny_onnx), "-o", str(tmp_path / "q"), "--method", "awq+gptq", "--weights", WEIGHTS,
            "--calib", str(tiny_text), "--calib-samples", "2", "--calib-seqlen", "32"]
    assert main(argv) == 2
    assert "at least 128 calibration tokens" in capsys.readouterr().err


def test_raised_dampening_is_reported_once_per_group(tiny_onnx, tiny_text, tmp_path, monkeypatch):
    factor = mxonnx.gptq._inverse_cholesky_upper
    first_attempt = itertools.cycle([True, False])  # every factorisation fails once, then succeeds with 10x damp
    monkeypatch.setattr(mxonnx.gptq, "_inverse_cholesky_upper", lambda h: None if next(first_attempt) else factor(h))
    with pytest.warns(mxonnx.gptq.HessianDampingWarning) as caught:
        run_quantize(tiny_onnx, tmp_path / "q", tiny_text, "gptq")
    groups = [f"layers.{i}.{g}" for i in range(2) for g in ("qkv", "o", "gate_up", "down")]
    assert sorted(str(w.message) for w in caught) == sorted(
        f"Hessian of {g} not positive definite; damp raised to 0.1" for g in groups)


def test_lm_head_in_decoder_formats_is_rounded_to_nearest(tiny_onnx, tiny_text, tmp_path):
    out = run_quantize(tiny_onnx, tmp_path / "q", tiny_text, "gptq", lm_head="weights")
    source = ir.load(tiny_onnx / "model.onnx")
    w = find_lm_head(source, find_decoder_blocks(source)).weight_array
    codes, exponents = stored_weights(out)["lm_head"]
    expected_codes, expected_exponents = formats.quantize(w, WEIGHTS, axis=0)
    np.testing.assert_array_equal(codes, expected_codes)
    np.testing.assert_array_equal(exponents, expected_exponents)
    assert np.isfinite(logits(out, held_out_windows(tiny_onnx, tmp_path))).all()
