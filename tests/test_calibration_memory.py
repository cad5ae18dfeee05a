"""What one block's GPTQ calibration holds (project issue 17, bounded memory): the float64 Hessians of its four
linear groups once, not a second copy made when they are scaled to ``2/n X^T X`` (a 7B down_proj's alone is
0.97 GB), with the same values as ``HessianAccumulator.hessian``."""

from __future__ import annotations

import tracemalloc

import numpy as np
import onnx_ir as ir
import pytest
from conftest import _export, make_text, make_tiny_llama

from mxonnx import formats
from mxonnx.blockwise import BlockwiseRunner
from mxonnx.calibrate import block_hessians, config_windows
from mxonnx.config import QuantizeConfig
from mxonnx.gptq import HessianAccumulator
from mxonnx.passes.llama_structure import find_decoder_blocks

SHAPE = {"hidden": 256, "intermediate": 1024, "heads": 4, "kv_heads": 2}  # down_proj's Hessian: 8 MB in float64


@pytest.fixture(scope="module")
def wide_onnx(tmp_path_factory):
    root = tmp_path_factory.mktemp("wide")
    return _export(make_tiny_llama(root / "hf", layers=1, **SHAPE), root / "onnx", past=True)


def test_take_hessian_equals_the_scaled_sum_bit_for_bit():
    rng = np.random.default_rng(0)
    accumulator = HessianAccumulator(24)
    for _ in range(3):
        accumulator.add_batch(rng.standard_normal((40, 24), dtype=np.float32))
    expected = accumulator.hessian
    taken = accumulator.take_hessian()
    np.testing.assert_array_equal(taken, expected)
    assert taken.dtype == np.float64


def test_block_hessians_hold_one_copy_of_the_hessians(wide_onnx, tmp_path):
    """The numpy memory ``block_hessians`` allocates at its peak (tracemalloc: onnxruntime's own buffers are not
    counted) stays below 1.5x the float64 Hessians it returns; a scaled copy of the running sums makes it 2x."""
    model = ir.load(wide_onnx / "model.onnx")
    blocks = find_decoder_blocks(model)
    config = QuantizeConfig(calib_path=str(make_text(tmp_path / "calib.txt", words=3000)), calib_samples=2,
                            calib_seqlen=128, progress=False)
    runner = BlockwiseRunner(model, blocks, config_windows(wide_onnx, config))
    acts = formats.parse_format("mxint8-32")
    block_hessians(runner, blocks[0], acts)  # a first run imports what the rewrite and onnxruntime need
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        hessians = block_hessians(runner, blocks[0], acts)
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    held = sum(h.nbytes for h in hessians.values())
    assert held == 8 * (3 * SHAPE["hidden"] ** 2 + SHAPE["intermediate"] ** 2)
    assert peak < 1.5 * held, (peak, held)
    for h in hessians.values():
        assert h.dtype == np.float64 and np.all(np.diagonal(h) >= 0) and np.allclose(h, h.T, rtol=1e-5, atol=1e-7)
