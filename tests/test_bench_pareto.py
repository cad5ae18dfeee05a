"""``bench/pareto.py`` reads rows instead of recomputing them: published uniform rows of the same settings, its own
rows by recipe; it measures only what is missing (end to end on the tiny Llama) and draws the PNG."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import pareto  # noqa: E402


def published(results: Path, windows: int) -> None:
    rows = [{"tool": "mxonnx", "config": "W4A8 MXINT4-32", "method": "awq+gptq", "weights": "mxint4-32",
             "acts": "mxint8-32", "status": "ok", "perplexity": 25.8, "bits_stored": None, "format_bits": 4.25},
            {"tool": "mxonnx", "config": "W4A8 MXINT4-16", "method": "rtn", "weights": "mxint4-16",
             "acts": "mxint8-16", "status": "ok", "perplexity": 30.7, "bits_stored": 4.5, "format_bits": 4.5},
            {"tool": "quark", "config": "W4A4 MXFP4-32", "method": "awq+gptq", "weights": "mxfp4-32",
             "acts": "mxfp4-32", "status": "ok", "perplexity": 90.0, "bits_stored": 4.25, "format_bits": 4.25}]
    (results / "2026-01-01.json").write_text(json.dumps({"meta": {"windows": windows, "seqlen": 2048}, "rows": rows}))


def test_published_rows_of_other_settings_or_methods_are_left_out(tmp_path):
    published(tmp_path, windows=40)
    args = pareto.parse_args(["--results", str(tmp_path)])
    assert [r["weights"] for r in pareto.published_uniform_rows(tmp_path, args)] == ["mxint4-32"]
    assert pareto.published_uniform_rows(tmp_path, pareto.parse_args(["--windows", "4"])) == []


def test_a_target_takes_its_own_activations_or_the_default():
    rows = pareto.wanted_rows(pareto.parse_args(["--targets", "4.25", "4.5/mxint8-16", "--acts", "mxint8-32"]))
    assert [(r["target_bits"], r["acts"]) for r in rows] == [(4.25, "mxint8-32"), (4.5, "mxint8-16")]
    default = pareto.wanted_rows(pareto.parse_args([]))
    assert [(r["target_bits"], r["acts"]) for r in default] == [
        (4.1, "mxint8-32"), (4.25, "mxint8-32"), (4.5, "mxint8-16"), (5.0, "mxint8-16")]


def test_measures_only_the_missing_rows_and_plots(tiny_onnx, tiny_text, tmp_path, monkeypatch, capsys):
    results = tmp_path / "results"
    results.mkdir()
    published(results, windows=2)
    argv = ["--results", str(results), "--work", str(tmp_path / "work"), "--fp32", str(tiny_onnx), "--windows", "2",
            "--seqlen", "64", "--calib-samples", "8", "--targets", "4.6", "--uniform", "mxint4-32/mxint8-32"]
    calls = []
    real = pareto.mxonnx

    def mxonnx(*args):
        calls.append(args[0])
        if args[0] == "quantize":  # the tiny model's calibration text and window length
            args = (*args, "--calib", str(tiny_text), "--calib-seqlen", "32")
        elif args[0] == "eval":
            args = (*args, "--data", str(tiny_text))
        return real(*args)

    monkeypatch.setattr(pareto, "mxonnx", mxonnx)
    assert pareto.main(argv) == 0
    rows = json.loads((results / "pareto.json").read_text())["rows"]
    assert [r["kind"] for r in rows] == ["target-bits", "uniform"]
    target = rows[0]
    assert target["bits_per_weight"] <= 4.6 and target["bits_per_weight"] == target["allocation_bits"]
    assert rows[1]["formats"] == {"mxint4-32": 14}
    assert (results / "pareto.png").stat().st_size > 0
    assert calls.count("quantize") == 2
    calls.clear()
    assert pareto.main(argv) == 0  # everything is there: nothing is measured again
    assert calls == []
    out = capsys.readouterr().out
    assert "target 4.6" in out and "uniform mxint4-32" in out


def test_rows_saved_before_a_setting_existed_count_as_its_old_value(tmp_path):
    """A row without ``exponent_search``/``sensitivity`` was measured with the OCP exponents and the share loss; a
    row another run added meanwhile is kept when this run adds its own."""
    old = {"kind": "target-bits", "target_bits": 4.25, "acts": "mxint8-32", "candidates": None, "method": "awq+gptq",
           "windows": 40, "seqlen": 2048, "calib_samples": 128}
    new = pareto.wanted_rows(pareto.parse_args(["--targets", "4.25"]))[0]
    assert pareto.recipe(old) == pareto.recipe(new)
    context = pareto.wanted_rows(pareto.parse_args(["--targets", "4.25", "--sensitivity", "context",
                                                    "--exponent-search"]))[0]
    assert pareto.recipe(context) != pareto.recipe(old)
    path = tmp_path / "pareto.json"
    pareto.save_rows(path, [old])
    assert pareto.add_row(path, context) == [old, context]
