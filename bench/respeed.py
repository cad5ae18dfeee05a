"""Re-measure the speed columns of the published benchmark table without re-quantizing its rows (issue 18).

A row's speed depends on its graph, not on how its weights were chosen: the rows of one mxonnx configuration
(RTN, GPTQ, SmoothQuant, AWQ: the scales fold into existing weights) run the same graph with other numbers. So each
mxonnx configuration is quantized once with RTN, as the rows are (``--lm-head none --no-exponent-search``), the
onnxruntime int4 rows are re-made with ``bench/peers/ort_nbits.py``, and every such model and the FP32 model are
measured with ``bench/speed.py`` in interleaved rounds (medians). Rows of the other peers (Quark, INC: their own
virtual environments) are not re-measured: their speed cells are emptied (the earlier figures stay in the source
JSON), since a ratio against the new FP32 row would mix two machines. Writes ``bench/results/<date>-speed.json`` (the rows
with new ``prefill_ms``, ``decode_tokens_per_second`` and ``speed_measured_at``) and renders ``table.md`` from it.

    python bench/respeed.py [--rounds 2] [--threads 1] [--source bench/results/2026-11-29.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.measure import git_commit, machine  # noqa: E402
from bench.report import render_markdown  # noqa: E402
from bench.speed_grid import cpu_description, measure  # noqa: E402
from mxonnx.modelio import copy_model_assets  # noqa: E402

FP32 = REPO / "models" / "cache" / "smollm2-135m-fp32"
WORK = REPO / "models" / "cache" / "respeed"
SPEED_KEYS = ("prefill_ms", "decode_tokens_per_second")


def newest_table_json(results: Path) -> Path:
    dated = sorted(p for p in results.glob("*.json") if re.fullmatch(r"\d{4}-\d{2}-\d{2}(-speed)?\.json", p.name))
    if not dated:
        raise SystemExit(f"respeed: no dated benchmark JSON under {results}")
    return dated[-1]


def speed_model(row: dict) -> Path | None:
    """The folder whose speed stands for ``row`` (made if missing), or None for rows kept as they are."""
    if row["tool"] == "fp32":
        return FP32
    slug = re.sub(r"[^a-z0-9]+", "-", f"{row['tool']} {row['weights']} {row['acts']}".lower()).strip("-")
    folder = WORK / slug
    if row["tool"] == "mxonnx":
        command = [sys.executable, "-m", "mxonnx.cli", "quantize", str(FP32), "-o", str(folder), "--weights",
                   row["weights"], "--acts", row["acts"], "--method", "rtn", "--lm-head", "none"]
        if row["weights"].startswith("mx"):
            command.append("--no-exponent-search")
    elif row["tool"] == "ort-nbits":
        block = re.search(r"g(\d+)", row["config"])
        command = [sys.executable, str(REPO / "bench" / "peers" / "ort_nbits.py"), "--block", block.group(1),
                   str(FP32), str(folder)]
    else:
        return None
    if not (folder / "model.onnx").is_file():
        done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
        if done.returncode != 0:
            raise SystemExit(f"respeed: making {folder.name} failed: {done.stderr.strip().splitlines()[-1:]}")
        copy_model_assets(FP32, folder)  # the peer writes the graph only; speed.py reads config and tokenizer
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--source", type=Path, default=None, help="the table JSON to update (default the newest)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    source = args.source or newest_table_json(args.results)
    table = json.loads(source.read_text())
    meta, rows = table["meta"], table["rows"]
    folders = {}
    for row in rows:
        if row["status"] == "ok" and (folder := speed_model(row)) is not None:
            folders[folder] = None
    samples: dict[Path, list[dict]] = {folder: [] for folder in folders}
    loads = []
    for round_index in range(args.rounds):
        for folder in folders:
            r = measure(folder, True, args.threads, meta["prompt"], meta["decode"], 3)
            samples[folder].append(r)
            loads.append(os.getloadavg()[0])
            print(f"round {round_index + 1}: {folder.name}: prefill {r['prefill_ms']:.0f} ms, "
                  f"decode {r['decode_tokens_per_second']:.1f} tok/s", file=sys.stderr, flush=True)
    commit, now = git_commit(REPO), time.strftime("%Y-%m-%dT%H:%M:%S")
    kept = 0
    for row in rows:
        folder = speed_model(row) if row["status"] == "ok" else None
        if folder is None:  # not re-measured: its old figures came from another machine and baseline
            if row["status"] == "ok":
                kept += 1
                row.update({key: None for key in SPEED_KEYS}, run_peak_rss_mb=None, speed_earlier_in=source.name)
            continue
        for key in SPEED_KEYS:
            row[key] = statistics.median(s[key] for s in samples[folder])
        row["speed_measured_at"], row["speed_commit"], row["speed_model"] = now, commit, folder.name
        row["load_avg"] = row["run_peak_rss_mb"] = None  # not measured here
    name, flags = cpu_description()
    meta = {**meta, "threads": args.threads, "speed_machine": machine(),
            "speed_note": (f"Speed columns re-measured {now[:10]} at `{commit}` by `bench/respeed.py` on {name} "
                           f"(flags {' '.join(flags)}; load average {min(loads):.1f}-{max(loads):.1f}): "
                           f"{args.rounds} interleaved rounds, medians, each mxonnx configuration's graph measured "
                           "once on its RTN model (the methods change the weights, not the graph), lm_head float as "
                           f"in the rows; {kept} peer rows (Quark, INC: their own environments) are not re-measured and "
                           f"show no speed (their earlier figures, another machine: {source.name}). Perplexity "
                           "columns are unchanged (see each row's commit).")}
    out = args.results / f"{now[:10]}-speed.json"
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    text = render_markdown(rows, meta)
    head, sep, rest = text.partition("\n\n| tool")
    (args.results / "table.md").write_text(head + "\n" + meta["speed_note"] + sep + rest)
    print(f"wrote {out} and {args.results / 'table.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
