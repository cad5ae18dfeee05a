"""lm_head's formats (``mxonnx quantize --lm-head``): the default (auto) gives it W8A8 MXINT8-32 when the decoder's
weights and activations are MX, MXINT8-32 weights only when the activations are none, and keeps it float otherwise;
none, weights (= --quantize-lm-head), a format or WEIGHTS/ACTS; only a chosen lm_head takes the MX pre-scale;
one-line errors; ``inspect``'s bits_per_weight and ``--target-bits``' budget are the decoder linears'; ``lower
--target matmulnbits`` keeps the logits output."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import visible_lines

from mxonnx import formats
from mxonnx.cli import main
from mxonnx.config import LM_HEAD_DEFAULT
from mxonnx.eval import OrtCausalLM
from mxonnx.inspect import inspect_model

IDS = np.random.default_rng(2).integers(3, 96, (1, 24))
CALIB = ["--calib-samples", "4", "--calib-seqlen", "32"]


def quantize(src, out, capsys, *flags, text=None) -> dict:
    """``mxonnx quantize SRC -o OUT --method rtn FLAGS --json``'s result."""
    calib = ["--calib", str(text), *CALIB] if text is not None else []
    assert main(["quantize", str(src), "-o", str(out), "--method", "rtn", *calib, *flags, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def head_formats(folder) -> tuple[str, str]:
    """lm_head's (weights, acts) as ``inspect`` reads them from the model."""
    return next((l["weights"], l["acts"]) for l in inspect_model(folder)["linears"] if l["name"] == "lm_head")


@pytest.mark.parametrize("flags, expected", [
    (["--weights", "mxint4-32", "--acts", "mxfp8e4m3-32"], (LM_HEAD_DEFAULT, LM_HEAD_DEFAULT)),
    (["--weights", "mxfp4-32", "--acts", "none"], (LM_HEAD_DEFAULT, "none")),
    (["--weights", "int8", "--acts", "int8"], ("none", "none")),  # the fixed-point baseline keeps it float
    (["--weights", "int4-g32", "--acts", "none"], ("none", "none")),
    (["--weights", "mxint4-32", "--acts", "int8"], ("none", "none")),
    (["--weights", "none", "--acts", "mxint8-32"], ("none", "none")),
])
def test_auto_rule(flags, expected, tiny_onnx, tiny_text, tmp_path, capsys):
    result = quantize(tiny_onnx, tmp_path / "q", capsys, *flags, text=tiny_text)
    assert result["lm_head"] == ("none" if expected[0] == "none" else "/".join(expected))
    assert head_formats(tmp_path / "q") == expected


@pytest.mark.parametrize("flags, expected", [
    (["--lm-head", "none"], ("none", "none")),
    (["--lm-head", "weights"], ("mxint4-32", "mxfp8e4m3-32")),  # the decoder's formats
    (["--quantize-lm-head"], ("mxint4-32", "mxfp8e4m3-32")),
    (["--lm-head", "MXINT4-64"], ("mxint4-64", "mxfp8e4m3-32")),  # a weight format alone keeps the acts
    (["--lm-head", "mxint8-16/none"], ("mxint8-16", "none")),
    (["--lm-head", "mxfp6e2m3-32/mxint8-64"], ("mxfp6e2m3-32", "mxint8-64")),
    (["--lm-head", "auto"], (LM_HEAD_DEFAULT, LM_HEAD_DEFAULT)),
])
def test_lm_head_settings(flags, expected, tiny_onnx, tmp_path, capsys):
    result = quantize(tiny_onnx, tmp_path / "q", capsys, "--weights", "mxint4-32", "--acts", "mxfp8e4m3-32", *flags)
    assert result["lm_head"] == ("none" if expected[0] == "none" else "/".join(expected))
    assert head_formats(tmp_path / "q") == expected
    d = inspect_model(tmp_path / "q")
    assert (d["quantized_matmuls"], d["float_matmuls"]) == ((15, 0) if expected[0] != "none" else (14, 1))


@pytest.mark.parametrize("head, prescales", [("auto", (1.0, 1.0)), ("mxint8-32/mxint8-32", (0.75, 0.625)),
                                              ("weights", (0.75, 0.625))])
def test_only_a_chosen_lm_head_takes_the_prescale(head, prescales, tiny_onnx, tmp_path, capsys):
    """``--weights-prescale`` / ``--acts-prescale P`` reach an lm_head given formats, not the default 8-bit one."""
    quantize(tiny_onnx, tmp_path / "q", capsys, "--weights", "mxfp4-32", "--acts", "mxfp4-32", "--weights-prescale",
             "0.75", "--acts-prescale", "0.625", "--lm-head", head)
    d = inspect_model(tmp_path / "q")
    listed = next(l for l in d["linears"] if l["name"] == "lm_head")
    assert (listed["weights_prescale"], listed["acts_prescale"]) == prescales
    assert d["prescales"]["weights"]["count"] == 14 + (head != "auto")


@pytest.mark.parametrize("flags, message", [
    (["--lm-head", "mxint9-32"], "--lm-head 'mxint9-32': format 'mxint9-32': 9 bits is outside"),
    (["--lm-head", "bogus"], "--lm-head 'bogus': unknown format 'bogus'"),
    (["--lm-head", "mxint8-32/bogus"], "--lm-head 'mxint8-32/bogus': unknown format 'bogus'"),
    (["--lm-head", "mxint8-32", "--quantize-lm-head"], "--quantize-lm-head: not allowed with argument --lm-head"),
    (["--weights", "int8", "--acts", "int8", "--lm-head", "mxint8-32"], "lm_head with int8 activations"),
    (["--weights", "int8", "--acts", "int8", "--quantize-lm-head"], "--lm-head weights (--quantize-lm-head) with int8"),
])
def test_bad_lm_head_is_one_line_exit_2(flags, message, tiny_onnx, tmp_path, capsys):
    assert main(["quantize", str(tiny_onnx), "-o", str(tmp_path / "q"), "--method", "rtn", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and len(visible_lines(err)) == 1, err
    assert list(tmp_path.iterdir()) == []


def test_inspect_leaves_lm_head_out_of_bits_per_weight(tiny_onnx, tmp_path, capsys):
    """bits_per_weight = sum(bits) / sum(weights) over the decoder linears; lm_head listed with its own bits."""
    quantize(tiny_onnx, tmp_path / "q", capsys, "--weights", "mxint4-32", "--acts", "mxint8-32")
    d = inspect_model(tmp_path / "q")
    listed = {l["name"]: l for l in d["linears"]}
    head = listed.pop("lm_head")
    assert (head["weights"], head["bits_per_weight"]) == (LM_HEAD_DEFAULT, formats.bits_per_weight(LM_HEAD_DEFAULT))
    decoder = sum(l["bits_per_weight"] * l["weights_count"] for l in listed.values())
    assert d["bits_per_weight"] == pytest.approx(decoder / sum(l["weights_count"] for l in listed.values()), rel=1e-12)
    assert d["bits_per_weight"] == formats.bits_per_weight("mxint4-32")  # 4.25, not raised by lm_head's 8.25
    quantize(tiny_onnx, tmp_path / "float_head", capsys, "--weights", "mxint4-32", "--acts", "mxint8-32",
             "--lm-head", "none")
    assert inspect_model(tmp_path / "float_head")["bits_per_weight"] == d["bits_per_weight"]


@pytest.mark.parametrize("acts", ["mxint8-32", "none"])
def test_matmulnbits_lowering_of_a_quantized_lm_head(acts, tiny_onnx, tmp_path, capsys):
    """lm_head's MatMul gives the graph output ``logits``: its MatMulNBits takes its place with the same logits."""
    mx = tmp_path / "mx"
    quantize(tiny_onnx, mx, capsys, "--weights", "mxint4-32", "--acts", acts)
    assert head_formats(mx) == (LM_HEAD_DEFAULT, "none" if acts == "none" else LM_HEAD_DEFAULT)
    assert main(["lower", str(mx), "-o", str(tmp_path / "nbits"), "--target", "matmulnbits", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["matmulnbits"] == 15
    reference = OrtCausalLM(mx / "model.onnx").logits(IDS)
    lowered = OrtCausalLM(tmp_path / "nbits" / "model.onnx").logits(IDS)
    np.testing.assert_allclose(lowered, reference, rtol=0, atol=1e-5 * np.abs(reference).max())  # as test_lower


def test_target_bits_budget_leaves_lm_head_out(tiny_onnx, tiny_text, tmp_path, capsys):
    """The allocation is the same with lm_head MXINT8-32 or float, and its bits equal inspect's bits_per_weight."""
    flags = ["--weights", "mxint4-32", "--acts", "mxint8-32", "--target-bits", "4.8"]
    allocations = {}
    for head in ("auto", "none"):
        out = tmp_path / head
        result = quantize(tiny_onnx, out, capsys, *flags, "--lm-head", head, text=tiny_text)
        allocation = allocations[head] = result["allocation"]
        assert "lm_head" not in allocation["formats"] and len(allocation["formats"]) == 14
        assert allocation["bits_per_weight"] <= 4.8
        assert allocation["bits_per_weight"] == pytest.approx(inspect_model(out)["bits_per_weight"], rel=1e-12)
    assert head_formats(tmp_path / "auto") == (LM_HEAD_DEFAULT, LM_HEAD_DEFAULT)
    assert allocations["auto"] == allocations["none"]
