"""``--target-bits``: stored bits per format, the Hessian-weighted error, the Lagrangian allocation against a brute
force optimum, and end to end on the tiny Llama: the budget is met (<= B, as ``inspect`` measures it), the model
holds the allocated formats, pinned overrides stay, and a budget below the cheapest candidate is one clear error."""

from __future__ import annotations

import itertools
import json

import numpy as np
import onnx_ir as ir
import pytest
from conftest import visible_lines

from mxonnx import formats
from mxonnx.allocate import (
    _breakpoints, allocate, choose_formats, hessian_error, lagrangian_choice, measure_losses, stored_bits)
from mxonnx.blockwise import BlockwiseRunner
from mxonnx.calibrate import collect_statistics, config_windows
from mxonnx.cli import main
from mxonnx.config import QuantizeConfig
from mxonnx.errors import InputError
from mxonnx.inspect import inspect_model
from mxonnx.passes.llama_structure import find_decoder_blocks

CALIB = ["--calib-samples", "8", "--calib-seqlen", "32"]


@pytest.mark.parametrize("fmt, k, expected", [
    ("mxint4-32", 128, 4 + 8 / 32), ("mxint4-128", 128, 4 + 8 / 128), ("mxint8-32", 64, 8.25),
    ("mxint4-128", 64, 4 + 8 / 64),  # one partial block per column: a whole exponent byte for 64 weights
    ("mxint3-32", 64, 4 + 8 / 32),  # 3-bit codes are stored in 4 bits
    ("int4", 64, 4 + 32 / 64), ("int8-g32", 64, 8 + 32 / 32),
])
def test_stored_bits(fmt, k, expected):
    assert stored_bits(fmt, k, 48) == pytest.approx(expected * k * 48, abs=0)


def test_hessian_error_is_the_trace_formula():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 40)).astype(np.float32)
    x = rng.standard_normal((300, 64))
    h = x.T @ x
    e = (w - formats.quantize_dequantize(w, "mxint4-32", axis=0)).astype(np.float64)
    assert hessian_error(w, h, "mxint4-32", columns=7) == pytest.approx(np.trace(e.T @ h @ e), rel=1e-5)
    assert hessian_error(w, h, "mxint8-32") < hessian_error(w, h, "mxint4-32")
    grid = formats.quantize_dequantize(w, "mxint4-32", axis=0)  # already on the grid: no error
    assert hessian_error(grid, h, "mxint4-32") == 0.0


def brute_force(losses: np.ndarray, bits: np.ndarray, budget: float) -> float:
    rows = range(len(losses))
    return min(sum(losses[i, c[i]] for i in rows) for c in itertools.product(range(losses.shape[1]), repeat=len(losses))
               if sum(bits[i, c[i]] for i in rows) <= budget)


def random_problem(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Items with 2..4 candidates: more bits, less loss (like formats), not convex in general."""
    n, c = int(rng.integers(2, 6)), int(rng.integers(2, 5))
    bits = np.sort(rng.integers(1, 20, (n, c)), axis=1).astype(float) * rng.integers(1, 4, (n, 1))
    losses = np.sort(rng.random((n, c)) * rng.uniform(0.1, 10, (n, 1)), axis=1)[:, ::-1]
    return losses, bits


def test_lagrangian_allocation_equals_brute_force_on_the_hull():
    """Where the budget is the total of a Lagrangian solution (a vertex of the loss/bits hull), the allocation is
    optimal: it equals the brute force optimum."""
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(60):
        losses, bits = random_problem(rng)
        rows = np.arange(len(losses))
        for lam in [0.0, *_breakpoints(losses, bits)]:
            budget = float(bits[rows, lagrangian_choice(losses, bits, lam)].sum())
            choice = allocate(losses, bits, budget)
            assert bits[rows, choice].sum() <= budget
            assert losses[rows, choice].sum() == pytest.approx(brute_force(losses, bits, budget), rel=1e-12)
            checked += 1
    assert checked > 100


def test_allocation_meets_any_budget_and_improves_on_the_hull_vertex_below():
    rng = np.random.default_rng(1)
    for _ in range(200):
        losses, bits = random_problem(rng)
        rows = np.arange(len(losses))
        budget = float(rng.uniform(bits.min(axis=1).sum(), bits.max(axis=1).sum() + 5))
        choice = allocate(losses, bits, budget)
        loss = losses[rows, choice].sum()
        assert bits[rows, choice].sum() <= budget
        vertex = min(losses[rows, c].sum() for c in (lagrangian_choice(losses, bits, lam)
                                                      for lam in [0.0, *_breakpoints(losses, bits)])
                     if bits[rows, c].sum() <= budget)
        assert brute_force(losses, bits, budget) - 1e-9 <= loss <= vertex + 1e-9


def test_a_small_case_by_hand():
    # item 0 gains 10 for 2 extra bits, item 1 gains 3 for 2: with 2 bits to spend the upgrade goes to item 0
    losses = np.array([[12.0, 2.0], [4.0, 1.0]])
    bits = np.array([[4.0, 6.0], [4.0, 6.0]])
    assert list(allocate(losses, bits, 10.0)) == [1, 0]
    assert list(allocate(losses, bits, 12.0)) == [1, 1]
    assert list(allocate(losses, bits, 9.0)) == [0, 0]
    with pytest.raises(ValueError):
        allocate(losses, bits, 7.0)


def test_choose_formats_counts_the_fixed_linears_and_refuses_too_small_a_target():
    shapes = {"a": (128, 64), "b": (128, 64)}
    losses = {"a": [10.0, 1.0], "b": [5.0, 4.0]}
    cands = ["mxint4-128", "mxint8-32"]
    chosen = choose_formats(6.2, cands, shapes, losses)
    assert chosen.formats == {"a": "mxint8-32", "b": "mxint4-128"}
    assert chosen.bits_per_weight == pytest.approx((8.25 + 4.0625) / 2) and chosen.bits_per_weight <= 6.2
    # a fixed 8.25-bit linear of the same size takes the budget the upgrade needed
    fixed = choose_formats(6.2, cands, shapes, losses, fixed_bits=stored_bits("mxint8-32", 128, 64),
                           fixed_weights=128 * 64)
    assert fixed.formats == {"a": "mxint4-128", "b": "mxint4-128"}
    with pytest.raises(InputError, match="below the 4.0625 bits per weight"):
        choose_formats(4.06, cands, shapes, losses)


def test_measured_losses_use_the_float_inputs_hessians(tiny_onnx, tiny_text):
    model = ir.load(tiny_onnx / "model.onnx")
    blocks = find_decoder_blocks(model)
    config = QuantizeConfig(calib_path=tiny_text, calib_samples=4, calib_seqlen=32, progress=False)
    names = ["layers.0.k_proj", "layers.1.down_proj"]
    cands = ["mxint4-32", "mxint8-32"]
    losses = measure_losses(BlockwiseRunner(model, blocks, config_windows(tiny_onnx, config)), blocks, names, cands)
    assert set(losses) == set(names)
    stats = collect_statistics(model, blocks, tiny_onnx, config, hessians=True)
    for name, key, linear in (("layers.0.k_proj", "layers.0.qkv", blocks[0].k),
                              ("layers.1.down_proj", "layers.1.down", blocks[1].down)):
        for c, got in zip(cands, losses[name]):
            assert got == pytest.approx(hessian_error(linear.weight_array, stats[key].xtx, c), rel=1e-4)
        assert losses[name][1] < losses[name][0]


@pytest.mark.parametrize("target", [4.5, 4.8, 5.5])
def test_target_bits_meets_the_budget(target, tiny_onnx, tiny_text, tmp_path, capsys):
    out = tmp_path / "q"
    argv = ["quantize", str(tiny_onnx), "-o", str(out), "--method", "rtn", "--calib", str(tiny_text), *CALIB,
            "--target-bits", str(target), "--override", "layers.1.o_proj=mxint8-16", "--json"]
    assert main(argv) == 0
    allocation = json.loads(capsys.readouterr().out)["allocation"]
    d = inspect_model(out)
    assert d["bits_per_weight"] <= target
    assert d["bits_per_weight"] == pytest.approx(allocation["bits_per_weight"], rel=1e-12)
    listed = {l["name"]: l["weights"] for l in d["linears"]}
    assert listed["layers.1.o_proj"] == "mxint8-16" and "layers.1.o_proj" not in allocation["formats"]
    assert {name: listed[name] for name in allocation["formats"]} == allocation["formats"]
    assert len(allocation["formats"]) == 13 and len(set(allocation["formats"].values())) > 1


def test_target_bits_takes_the_least_loss_when_the_budget_allows(tiny_onnx, tiny_text, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_onnx), "-o", str(out), "--method", "rtn", "--calib", str(tiny_text), *CALIB,
                 "--target-bits", "9", "--candidates", "mxint4-32,mxint8-32", "--json"]) == 0
    allocation = json.loads(capsys.readouterr().out)["allocation"]
    assert set(allocation["formats"].values()) == {"mxint8-32"} and allocation["bits_per_weight"] == 8.25


@pytest.mark.parametrize("flags, message", [
    (["--target-bits", "4.05"], "--target-bits 4.05 is below the"),
    (["--target-bits", "4.5", "--candidates", "mxint4-32,none"], "not 'none'"),
    (["--target-bits", "4.5", "--candidates", "mxint4-33"], "block size 33"),
    (["--target-bits", "4.5", "--override", "*=mxint4-32"], "no linear to choose a format for"),
    (["--target-bits", "0"], "must be a positive number"),
])
def test_bad_target_bits_are_one_line_exit_2(flags, message, tiny_onnx, tiny_text, tmp_path, capsys):
    argv = ["quantize", str(tiny_onnx), "-o", str(tmp_path / "q"), "--method", "rtn", "--calib", str(tiny_text), *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(visible_lines(err)) == 1, err
    assert list(tmp_path.iterdir()) == []
