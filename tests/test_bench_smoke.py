"""Smoke test of the benchmark harness (bench/) on the tiny Llama: measurements, table, and one resumable run."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import measure, produce, report, run  # noqa: E402
from bench.rows import ALL_METHODS, select_rows  # noqa: E402
from bench.measure import LoadSampler, linear_weight_bits, run_child  # noqa: E402
from bench.speed import measure_speed  # noqa: E402


def test_run_child_reports_the_peak_rss_of_that_child_alone():
    # the peak is polled (every 50 ms): the child holds its memory for a few polls, as any measured command does
    big = run_child([sys.executable, "-c",
                     "import time; import numpy as np; a = np.ones(40_000_000); time.sleep(0.5); print('{\"n\": 1}')"])
    small = run_child([sys.executable, "-c", "print('{\"n\": 2}')"])
    assert big.returncode == 0 and big.json() == {"n": 1}
    assert big.peak_rss_mb > 300  # 40 M float64 = 320 MB
    assert small.peak_rss_mb < 100


def test_run_child_failure_is_the_last_stderr_line():
    failed = run_child([sys.executable, "-c", "import sys; print('x', file=sys.stderr); sys.exit('no such method')"])
    assert failed.returncode == 1 and failed.failure() == "no such method"


def test_stored_bits_of_float_and_matmulnbits_models(tiny_onnx, tmp_path):
    config = json.loads((tiny_onnx / "config.json").read_text())
    assert linear_weight_bits(tiny_onnx / "model.onnx", config) == 32.0
    out = tmp_path / "nbits"
    done = run_child([sys.executable, str(REPO / "bench" / "peers" / "ort_nbits.py"), str(tiny_onnx), str(out),
                      "--block", "32"])
    assert done.returncode == 0, done.stderr[-500:]
    # int4 codes (4 bits) + one fp32 scale per 32 weights; every K of the tiny model is a multiple of 32.
    assert linear_weight_bits(out / "model.onnx", config) == pytest.approx(4 + 32 / 32)


def test_speed_of_a_model_with_kv_cache(tiny_onnx):
    speed = measure_speed(tiny_onnx, threads=1, prompt=16, decode=4, repeat=1)
    assert speed["prefill_ms"] > 0 and speed["decode_tokens"] == 4 and speed["decode_tokens_per_second"] > 0


def test_fingerprint_covers_the_model_files_only(tiny_onnx, tmp_path):
    copy = tmp_path / "fp32"
    shutil.copytree(tiny_onnx, copy)
    reference = run.fingerprint(copy)
    # the graph file, then its weights file: the value rows published before this rule were keyed by
    data_files = [p for p in copy.iterdir() if p.name.endswith(("_data", ".data"))]
    assert len(data_files) == 1
    expected = hashlib.sha256((copy / "model.onnx").read_bytes() + data_files[0].read_bytes()).hexdigest()[:16]
    assert reference == expected
    (copy / "model.onnx_augment.onnx").write_bytes(b"left by a peer")  # other files do not count
    assert run.fingerprint(copy) == reference
    data = next(p for p in copy.iterdir() if p.name.endswith(("_data", ".data")))
    with open(data, "r+b") as f:  # the weights do
        first = f.read(1)
        f.seek(0)
        f.write(bytes([first[0] ^ 1]))
    assert run.fingerprint(copy) != reference


def test_peers_get_a_copy_of_the_fp32_folder_removed_afterwards(tiny_onnx, tmp_path):
    before = {p.name: p.read_bytes() for p in tiny_onnx.iterdir()}
    with pytest.raises(RuntimeError, match="peer failed"):
        with produce.peer_input(tiny_onnx, tmp_path / "inputs", "row") as source:
            assert source.parent == tmp_path / "inputs" and source.resolve() != tiny_onnx.resolve()
            assert {p.name for p in source.iterdir()} == set(before)
            (source / "model.onnx_augment.onnx").write_bytes(b"left by the peer")
            (source / "model.onnx").write_bytes(b"overwritten by the peer")
            raise RuntimeError("peer failed")
    assert not list((tmp_path / "inputs").iterdir())  # removed, with what the peer wrote
    assert {p.name: p.read_bytes() for p in tiny_onnx.iterdir()} == before


def test_load_sampler_samples_the_load_average_while_the_block_runs(monkeypatch):
    readings = iter([1.0, 3.0, 2.0] + [2.0] * 100)
    monkeypatch.setattr(measure.os, "getloadavg", lambda: (next(readings), 0.0, 0.0))
    with LoadSampler(interval=0.02) as load:
        while len(load.samples) < 3:
            time.sleep(0.01)
    assert load.samples[:3] == [1.0, 3.0, 2.0] and load.samples[3:] == [2.0] * (len(load.samples) - 3)
    assert load.peak == 3.0 and load.mean == pytest.approx(sum(load.samples) / len(load.samples))


def test_table_ratios_are_against_the_fp32_row():
    common = {"bits_stored": 32.0, "format_bits": 32.0, "quantize_seconds": None, "quantize_peak_rss_mb": None,
              "run_peak_rss_mb": 100.0}
    rows = [
        {"tool": "fp32", "config": "FP32", "method": "-", "status": "ok", "perplexity": 10.0, "file_bytes": 4e6,
         "prefill_ms": 100.0, "decode_tokens_per_second": 20.0, **common},
        {"tool": "mxonnx", "config": "W4A8", "method": "rtn", "status": "ok", "perplexity": 12.0, "file_bytes": 1e6,
         "prefill_ms": 50.0, "decode_tokens_per_second": 30.0, **common},
        {"tool": "mxonnx", "config": "W4A8", "method": "gptq", "status": "unavailable", "reason": "not available yet: x"},
    ]
    lines = report.table_lines(rows)
    cells = [c.strip() for c in lines[3].split("|")]
    assert cells[4:6] == ["12.000", "1.200"]  # PPL, PPL / FP32
    assert cells[9] == "0.25"  # size / FP32
    assert cells[13] == "2.00" and cells[15] == "1.50"  # prefill and decode speed-ups
    assert "not available yet: x" in lines[4]
    assert cells[17] == "—"  # load average: not recorded for this row
    rows[1]["load_average_mean"] = 3.46
    assert [c.strip() for c in report.table_lines(rows)[3].split("|")][17] == "3.5"
    rows[0]["eval_seconds"], rows[1]["eval_seconds"], rows[1]["quantize_seconds"] = 3000.0, 1500.0, 1140.0
    assert report.cost_line(rows) == ("Measuring the 2 rows with figures took 1 h 34 min (quantize + perplexity, "
                                      "summed); 1 row(s) have none yet.")


def test_resumable_run_on_the_tiny_model(tiny_onnx, tiny_text, tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    for rel in ("wikitext-2-raw/wiki.test.raw", "wikitext-2/valid.txt"):
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        (data / rel).write_text(tiny_text.read_text())
    monkeypatch.setenv("MXONNX_DATA", str(data))
    argv = ["--fp32", str(tiny_onnx), "--work", str(tmp_path / "work"), "--results", str(tmp_path / "results"),
            "--tools", "ort-nbits", "--methods", "rtn", "--windows", "1", "--seqlen", "64", "--prompt", "16",
            "--decode", "4"]
    before = sorted(p.name for p in tiny_onnx.iterdir())
    run.main(argv)
    assert sorted(p.name for p in tiny_onnx.iterdir()) == before  # peers ran on a copy of it
    result_files = list((tmp_path / "results").glob("*.json"))
    assert len(result_files) == 1
    everything = json.loads(result_files[0].read_text())["rows"]  # the whole table, unselected rows unmeasured
    assert len(everything) == len(select_rows(False, None, None))
    rows = [r for r in everything if r["status"] == "ok"]
    assert [(r["tool"], r["status"]) for r in rows] == [("fp32", "ok"), ("ort-nbits", "ok"), ("ort-nbits", "ok")]
    assert {r["status"] for r in everything if r not in rows} == {"not measured"}
    assert rows[0]["bits_stored"] == 32.0 and rows[1]["bits_stored"] == pytest.approx(5.0)
    assert all(0 <= r["load_average_mean"] <= r["load_average_peak"] for r in rows)
    table = (tmp_path / "results" / "table.md").read_text()
    assert table.count("| ort-nbits |") == 3 and table.count("| ort-nbits | W4 INT4-g128 | gptq | *not measured") == 1
    assert (tmp_path / "results" / "ppl_vs_bits.png").stat().st_size > 0
    assert not list((tmp_path / "work" / "models").iterdir())  # quantized models removed once measured

    capsys.readouterr()
    run.main(argv)  # every row comes from the cache
    assert capsys.readouterr().out.count("(cached)") == 3

    shutil.rmtree(tmp_path / "work" / "rows")  # a fresh checkout: only the published results remain
    run.main(argv + ["--report-only"])
    rows = [r for r in json.loads(result_files[0].read_text())["rows"] if r["status"] == "ok"]
    assert len(rows) == 3 and all(r["published_in"] == result_files[0].name for r in rows)

    report_argv = argv[:8] + ["--methods", "gptq", "--configs", "W4 INT4-g128", *argv[10:]]
    run.main(report_argv)  # a run of another row keeps the rows published before in the day's file
    rows = json.loads(result_files[0].read_text())["rows"]  # same date: the run replaced the file
    assert [(r["config"], r["method"]) for r in rows if r["status"] == "ok"] == [
        ("FP32", "-"), ("W4 INT4-g32", "rtn"), ("W4 INT4-g128", "rtn"), ("W4 INT4-g128", "gptq")]

    other_settings = [a if a != "4" else "5" for a in argv]  # --decode 5: published rows do not match
    run.main(other_settings + ["--report-only"])
    assert {r["status"] for r in json.loads(result_files[0].read_text())["rows"]} == {"not measured"}


def test_rows_filtered_by_configuration():
    rows = select_rows(False, ["rtn"], ["mxonnx"], ["W8A8 MXINT8-128", "W4A8 MXINT4-16"])
    assert [(r.tool, r.config) for r in rows] == [("fp32", "FP32"), ("mxonnx", "W8A8 MXINT8-128"),
                                                  ("mxonnx", "W4A8 MXINT4-16")]
    assert {r.method for r in select_rows(False, None, None, ["W8A8 MXINT8-128"]) if r.tool == "mxonnx"} == set(ALL_METHODS)


def test_calibration_cost_benchmark(tiny_onnx, tiny_text, tmp_path, monkeypatch, capsys):
    from bench import calibration

    data = tmp_path / "data" / "wikitext-2"
    data.mkdir(parents=True)
    (data / "valid.txt").write_text(tiny_text.read_text())
    monkeypatch.setenv("MXONNX_DATA", str(tmp_path / "data"))
    calibration.main(["--model", str(tiny_onnx), "--samples", "2", "--seqlen", "16", "--threads", "1", "--json"])
    parts = json.loads(capsys.readouterr().out)["parts"]
    assert list(parts) == ["forward", "stats", "awq-stats"]
    assert parts["forward"]["ratio_to_forward"] == 1.0
    assert all(p["seconds"] > 0 and p["peak_rss_mb"] > 0 for p in parts.values())


def test_grid_in_the_papers_layout():
    def row(config, method, ppl, tool="mxonnx", status="ok"):
        return {"tool": tool, "config": config, "method": method, "status": status, "perplexity": ppl}

    results = [row("FP32", "-", 10.0, tool="fp32"), row("W8A8 MXINT8-128", "rtn", 10.5),
               row("W4A8 MXINT4-128", "rtn", 14.0), row("W4A8 MXINT4-128", "awq+gptq", 12.25),
               row("W4A8 MXINT4-16", "gptq", None, status="unavailable")]
    assert report.grid_lines(results, list(ALL_METHODS)) == [
        "| method | W8A8 MXINT8-128 | W4A8 MXINT4-128 |", "|---|---:|---:|",
        "| rtn | 10.500 | 14.000 |", "| awq+gptq | — | 12.250 |"]


def test_commit_is_dirty_only_for_changes_outside_the_results(tmp_path):
    from bench.measure import git_commit

    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                       check=True, capture_output=True)

    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "bench" / "results" / "table.md").write_text("old")
    (tmp_path / "code.py").write_text("old")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "first")
    clean = git_commit(tmp_path)
    assert not clean.endswith("+dirty")
    (tmp_path / "bench" / "results" / "table.md").write_text("new")  # the benchmark's own output
    assert git_commit(tmp_path) == clean
    (tmp_path / "code.py").write_text("new")
    assert git_commit(tmp_path) == clean + "+dirty"



def _placement_logits(mode, folder, config, out):
    from bench.smoothquant_placement import smoothed_model
    from mxonnx.eval import OrtCausalLM

    smoothed_model(folder, out, mode, config)
    return OrtCausalLM(out / "model.onnx").logits(np.random.default_rng(0).integers(3, 96, (2, 40)))


def test_smoothquant_placements(tiny_onnx, tiny_text, tmp_path):
    """Every placement of SmoothQuant's scales computes the float model's function (formats ``none``; the ``Mul``
    placements add one Mul per linear); quantized (W4A4 MXFP4-32), folding and ``Mul`` differ, except where the
    column-folded scales are powers of two: then both quantize the same numbers."""
    import dataclasses

    from bench.smoothquant_placement import MODES
    from mxonnx.config import QuantizeConfig
    from mxonnx.eval import OrtCausalLM

    reference = OrtCausalLM(tiny_onnx / "model.onnx").logits(np.random.default_rng(0).integers(3, 96, (2, 40)))
    config = QuantizeConfig(calib_path=tiny_text, calib_samples=3, calib_seqlen=48, progress=False,
                            weights="none", acts="none")
    muls = sum(n.op_type == "Mul" for n in onnx.load(str(tiny_onnx / "model.onnx"), load_external_data=False).graph.node)
    for mode in MODES:
        logits = _placement_logits(mode, tiny_onnx, config, tmp_path / f"float-{mode}")
        assert np.abs(logits - reference).max() <= 1e-4 * np.abs(reference).max(), mode
        graph = onnx.load(str(tmp_path / f"float-{mode}" / "model.onnx"), load_external_data=False).graph
        added = sum(n.op_type == "Mul" for n in graph.node) - muls
        assert added == (7 * 2 if mode.startswith("mul") else 0), mode  # 7 linears in each of 2 blocks
    w4a4 = dataclasses.replace(config, weights="mxfp4-32", acts="mxfp4-32")
    q = {mode: _placement_logits(mode, tiny_onnx, w4a4, tmp_path / mode) for mode in
         ("fold", "fold-unfolded-scales", "mul-group-kv", "fold-pow2-columns", "mul-group-kv-pow2-columns")}
    assert 0 < np.abs(q["fold"] - reference).max() < 0.5 * np.abs(reference).max()
    assert not np.allclose(q["fold"], q["fold-unfolded-scales"])  # scales seen on folded vs unfolded weights
    apart = np.abs(q["fold-unfolded-scales"] - q["mul-group-kv"]).mean()
    pow2_apart = np.abs(q["fold-pow2-columns"] - q["mul-group-kv-pow2-columns"]).mean()
    assert pow2_apart < 0.1 * apart, (pow2_apart, apart)
