"""Re-measure the perplexity of published mxonnx rows with today's code (issue 17: accuracy must not drop).

For each selected mxonnx row of the published benchmark JSON: quantize with the row's own recipe (``bench/produce.py``:
``--no-exponent-search --lm-head none``, default calibration), ``mxonnx eval`` on the same windows, and compare with
the published perplexity: ``change = new / published - 1``; a row passes when ``change <= +1 %``. Each finished row is
appended to ``bench/results/recheck.jsonl`` (one JSON object per row: both figures, both commits, quantize wall time
and peak RSS), so an interrupted run resumes; ``recheck.md`` is rendered from the newest record of every row.
Models are deleted once measured.

    .venv/bin/python bench/recheck.py [--methods sq awq ...] [--configs "W4A8 MXINT4-128" ...] [--windows 40]
    .venv/bin/python bench/recheck.py --report-only
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.measure import git_commit, machine  # noqa: E402
from bench.produce import RowUnavailable, produce, run_for  # noqa: E402
from bench.rows import ALL_METHODS, CONFIGS, select_rows  # noqa: E402

FP32 = REPO / "models" / "cache" / "smollm2-135m-fp32"
TOLERANCE = 0.01


def published_rows(results: Path, windows: int) -> dict[tuple[str, str], dict]:
    """The newest published mxonnx row per (config, method) measured on ``windows`` windows of 2048 tokens."""
    rows: dict[tuple[str, str], dict] = {}
    for path in sorted(results.glob("20*.json")):
        for row in json.loads(path.read_text()).get("rows", []):
            if row.get("tool") == "mxonnx" and row.get("status") == "ok" and row.get("eval_windows") == windows:
                rows[(row["config"], row["method"])] = {**row, "source": path.name}
    return rows


def records(path: Path) -> dict[tuple[str, str], dict]:
    """The newest recheck record per (config, method)."""
    out: dict[tuple[str, str], dict] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                out[(rec["config"], rec["method"])] = rec
    return out


def render(recs: dict[tuple[str, str], dict], windows: int) -> str:
    """Markdown table of the records, in the benchmark's row order."""
    order = {(r.config, r.method): i for i, r in enumerate(select_rows(False, None, ["mxonnx"]))}
    lines = [
        "# Recheck: published mxonnx rows re-measured with the block-by-block driver",
        "",
        f"Written by `bench/recheck.py`. WikiText-2 test, first {windows} windows of 2048 tokens, default calibration, "
        "each row's own recipe (`--no-exponent-search --lm-head none`, as the published rows). "
        f"change = now / published - 1; a row passes at change <= +{TOLERANCE:.0%} (issue 17).",
        "",
        "| config | method | published PPL | at commit | now PPL | change | passes | quantize s | quantize peak RSS MB | now at commit |",
        "|---|---|---:|---|---:|---:|---|---:|---:|---|",
    ]
    for key in sorted(recs, key=lambda k: order.get(k, 1 << 30)):
        r = recs[key]
        change = r["perplexity"] / r["published_perplexity"] - 1
        lines.append(
            f"| {r['config']} | {r['method']} | {r['published_perplexity']:.3f} | `{r['published_commit']}` | "
            f"{r['perplexity']:.3f} | {change:+.2%} | {'yes' if change <= TOLERANCE else '**no**'} | "
            f"{r['quantize_seconds']:.0f} | {r['quantize_peak_rss_mb']:.0f} | `{r['commit']}` |")
    passed = sum(r["perplexity"] / r["published_perplexity"] - 1 <= TOLERANCE for r in recs.values())
    lines += ["", f"{passed} of {len(recs)} rows pass."]
    if recs:
        m = next(iter(recs.values()))["machine"]
        lines.append(f"Machine: {m.get('cpu', '?')}, {m.get('nproc', '?')} logical CPUs.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", choices=ALL_METHODS)
    p.add_argument("--configs", nargs="+", choices=CONFIGS, metavar="CONFIG")
    p.add_argument("--windows", type=int, default=40)
    p.add_argument("--fp32", type=Path, default=FP32)
    p.add_argument("--work", type=Path, default=REPO / "models" / "cache" / "recheck")
    p.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--refresh", action="store_true", help="measure rows already in recheck.jsonl again")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    log = args.results / "recheck.jsonl"
    published = published_rows(args.results, args.windows)
    if not args.report_only:
        done = records(log)
        rows = [r for r in select_rows(False, args.methods, ["mxonnx"], args.configs)
                if r.tool == "mxonnx" and (r.config, r.method) in published and (args.refresh or (r.config, r.method) not in done)]
        commit, host = git_commit(REPO), machine()
        for i, row in enumerate(rows, 1):
            old = published[(row.config, row.method)]
            print(f"[{i}/{len(rows)}] {row.label}: published {old['perplexity']:.3f}", flush=True)
            try:
                produced = produce(row, args.fp32.resolve(), args.work.resolve())
                ev = run_for(produced, "mxonnx.cli", "eval", str(produced.folder), "--max-windows",
                             str(args.windows), "--json")
                if ev.returncode != 0:
                    raise RowUnavailable(f"eval failed: {ev.failure()}")
            except RowUnavailable as exc:
                print(f"  failed: {exc}", flush=True)
                continue
            rec = {"config": row.config, "method": row.method, "weights": row.weights, "acts": row.acts,
                   "perplexity": ev.json()["perplexity"], "published_perplexity": old["perplexity"],
                   "published_commit": old.get("commit", "?"), "published_in": old["source"],
                   "quantize_seconds": produced.quantize_seconds, "quantize_peak_rss_mb": produced.quantize_peak_rss_mb,
                   "eval_seconds": ev.seconds, "windows": args.windows, "commit": commit, "machine": host,
                   "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
            with open(log, "a") as f:
                f.write(json.dumps(rec) + "\n")
            shutil.rmtree(produced.folder, ignore_errors=True)
            print(f"  now {rec['perplexity']:.3f} ({rec['perplexity'] / old['perplexity'] - 1:+.2%}), "
                  f"quantize {produced.quantize_seconds:.0f} s", flush=True)
    (args.results / "recheck.md").write_text(render(records(log), args.windows))
    print(f"wrote {args.results / 'recheck.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
