"""Peak memory does not grow with depth: the same Llama at 2 and 8 decoder blocks, quantized block by block, peaks
at nearly the same RSS (each command measured in its own process by ``os.wait4``), far below the growth of the
model itself."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_text, make_tiny_llama

SHAPE = {"hidden": 768, "intermediate": 2048, "heads": 12, "kv_heads": 4}  # 25 MB of float32 weights per block
CALIB = ["--calib-samples", "4", "--calib-seqlen", "512"]  # 2048 tokens: GPTQ's widest input


def peak_rss_bytes(argv: list[str]) -> int:
    """Run ``python -m mxonnx.cli ARGV`` as a child process; its own peak RSS (``ru_maxrss``) in bytes."""
    process = subprocess.Popen([sys.executable, "-m", "mxonnx.cli", *argv], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    error = process.stderr.read().decode()
    assert process.returncode == 0, error
    return usage.ru_maxrss * 1024


def data_bytes(folder: Path) -> int:
    return (folder / "model.onnx_data").stat().st_size


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[int, Path]:
    """The ONNX exports of one random Llama shape at 2 and 8 blocks."""
    root = tmp_path_factory.mktemp("depth")
    found = {}
    for layers in (2, 8):
        hf = make_tiny_llama(root / f"hf{layers}", layers=layers, **SHAPE)
        found[layers] = root / f"onnx{layers}"
        peak_rss_bytes(["export", str(hf), "-o", str(found[layers]), "--json"])
    return found


@pytest.mark.parametrize("method", ["rtn", "awq+gptq"])
def test_quantize_peak_rss_does_not_grow_with_depth(method, models, tmp_path):
    text = make_text(tmp_path / "calib.txt", words=20000)
    peaks = {layers: peak_rss_bytes(["quantize", str(folder), "-o", str(tmp_path / f"q{layers}"), "--method", method,
                                     "--weights", "mxint4-32", "--acts", "mxint8-32", "--calib", str(text), *CALIB,
                                     "--json"])
             for layers, folder in models.items()}
    model_growth = data_bytes(models[8]) - data_bytes(models[2])
    assert model_growth > 140e6  # six more blocks of 25 MB
    rss_growth = peaks[8] - peaks[2]
    # one block's weights, statistics and Hessians are what a run holds; six more blocks add a little graph
    assert rss_growth < 0.25 * model_growth, (peaks, model_growth)
