"""``mxonnx inspect`` on float and quantized tiny Llamas: counts, formats and the bits weights take on disk."""

from __future__ import annotations

import json

import pytest

from mxonnx import formats
from mxonnx.cli import main
from mxonnx.config import LM_HEAD_DEFAULT, QuantizeConfig
from mxonnx.inspect import format_inspection, inspect_model
from mxonnx.quantize import quantize_model


@pytest.fixture(scope="module")
def quantized_folder(tiny_onnx, tmp_path_factory):
    out = tmp_path_factory.mktemp("inspect") / "q"
    quantize_model(tiny_onnx, out, QuantizeConfig(weights="mxint4-32", acts="mxint8-32", method="rtn"))
    return out


def test_float_model(tiny_onnx):
    d = inspect_model(tiny_onnx)
    assert (d["quantized_matmuls"], d["float_matmuls"], d["custom_ops"]) == (0, 15, {})
    assert d["bits_per_weight"] is None and d["opset"] == {"ai.onnx": 18}


def test_quantized_model(quantized_folder):
    d = inspect_model(quantized_folder)
    # 14 decoder linears and, by default for an MX decoder, lm_head W8A8 MXINT8-32 (its input's QDQ is the 9th)
    assert d["quantized_matmuls"] == 15 and d["float_matmuls"] == 0
    assert d["custom_ops"] == {"com.mxonnx.MXDequantize": 15, "com.mxonnx.MXQuantizeDequantize": 9}
    assert d["formats"] == {"weights": {"mxint4-32": 14, LM_HEAD_DEFAULT: 1}, "acts": {"mxint8-32": 9}}
    assert d["opset"] == {"ai.onnx": 21, "com.mxonnx": 1}
    # the average is the decoder linears' (lm_head listed with its own figure, left out)
    assert d["bits_per_weight"] == pytest.approx(formats.bits_per_weight("mxint4-32"), rel=0.03)
    head = next(linear for linear in d["linears"] if linear["name"] == "lm_head")
    assert (head["weights"], head["acts"]) == (LM_HEAD_DEFAULT, LM_HEAD_DEFAULT)
    assert head["bits_per_weight"] == pytest.approx(formats.bits_per_weight(LM_HEAD_DEFAULT), rel=0.03)
    on_disk = sum(p.stat().st_size for p in quantized_folder.iterdir() if p.name.startswith("model.onnx"))
    assert d["file_bytes"] == on_disk


@pytest.mark.parametrize("weights, expected_bits", [("mxint8-64", 8.125), ("mxfp4-32", 4.25), ("int4-g32", 5.0)])
def test_stored_bits_per_weight(tiny_onnx, tmp_path, weights, expected_bits):
    out = tmp_path / "q"
    quantize_model(tiny_onnx, out, QuantizeConfig(weights=weights, acts="none", method="rtn"))
    assert inspect_model(out)["bits_per_weight"] == pytest.approx(expected_bits, rel=0.03)


def test_cli_json_and_table(quantized_folder, capsys):
    assert main(["inspect", str(quantized_folder), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert set(d) == {"opset", "custom_ops", "quantized_matmuls", "float_matmuls", "bits_per_weight", "file_bytes",
                      "formats", "kv_cache", "linears", "rotation"}
    assert main(["inspect", str(quantized_folder)]) == 0
    table = capsys.readouterr().out
    assert table.strip() == format_inspection(d).strip()
    assert "bits per weight     4.2500" in table
