"""Perplexity against stored bits per weight on SmolLM2-135M: uniform formats and ``--target-bits`` allocations
(project issue 20). Writes ``bench/results/pareto.json`` (its own rows) and ``bench/results/pareto.png``.

Rows are read, not recomputed: the uniform ``awq+gptq`` rows of mxonnx already published in
``bench/results/<date>.json`` (``bench/run.py``) under the same windows and sequence length, and the rows of
``pareto.json``; only a ``--target-bits`` point (or a ``--uniform`` control) missing from ``pareto.json`` under
the same settings is measured: ``mxonnx quantize`` (``awq+gptq``), ``mxonnx inspect`` (stored bits, as on disk)
and ``mxonnx eval``, each a child process, the row saved as soon as it is done.

    .venv/bin/python bench/pareto.py [--targets 4.1 4.25 4.5/mxint8-16 5/mxint8-16] [--acts mxint8-32]
                                     [--uniform mxint4-32/mxint8-32 ...] [--windows 40] [--calib-samples 128]
                                     [--method awq+gptq] [--report-only]

A target ``B/ACTS`` runs with those activations, a bare ``B`` with ``--acts``: by default 4.1 and 4.25 with
MXINT8-32 (as the uniform MXINT4-32 row), 4.5 and 5 with MXINT8-16 (as the uniform MXINT4-16 row).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
FP32 = REPO / "models" / "cache" / "smollm2-135m-fp32"
DEFAULT_TARGETS = ("4.1", "4.25", "4.5/mxint8-16", "5/mxint8-16")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", nargs="*", default=list(DEFAULT_TARGETS), metavar="B[/ACTS]",
                   help="--target-bits values, each with its activation format (default --acts)")
    p.add_argument("--acts", default="mxint8-32", help="activation format of the --target-bits runs without one")
    p.add_argument("--candidates", default=None, help="--candidates of the --target-bits runs (default mxonnx's)")
    p.add_argument("--uniform", nargs="*", default=[], metavar="W/A",
                   help="uniform controls to measure here too (weights/acts), e.g. mxint4-32/mxint8-128")
    p.add_argument("--method", default="awq+gptq")
    p.add_argument("--windows", type=int, default=40)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--sensitivity", default="share", help="--target-bits' loss (mxonnx quantize --sensitivity)")
    p.add_argument("--exponent-search", action="store_true",
                   help="every run with GPTQ's exponent search (the default recipe) instead of the OCP exponents of "
                        "the published uniform rows")
    p.add_argument("--fp32", type=Path, default=FP32)
    p.add_argument("--work", type=Path, default=REPO / "bench" / ".work" / "pareto")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--report-only", action="store_true", help="measure nothing: plot the rows there are")
    return p.parse_args(argv)


def settings(args: argparse.Namespace) -> dict:
    """What makes two rows comparable."""
    return {"method": args.method, "windows": args.windows, "seqlen": args.seqlen, "calib_samples": args.calib_samples,
            "exponent_search": args.exponent_search}


def wanted_rows(args: argparse.Namespace) -> list[dict]:
    """The recipes to have measured: one per target and one per uniform control."""
    rows = []
    for spec in args.targets:
        bits, _, acts = str(spec).partition("/")
        rows.append({"kind": "target-bits", "target_bits": float(bits), "acts": acts or args.acts,
                     "candidates": args.candidates, "sensitivity": args.sensitivity})
    for spec in args.uniform:
        weights, _, acts = spec.partition("/")
        rows.append({"kind": "uniform", "weights": weights, "acts": acts or "mxint8-128"})
    return [{**row, **settings(args)} for row in rows]


RECIPE_DEFAULTS = {"exponent_search": False}  # rows saved before a key existed were measured so
TARGET_DEFAULTS = {"sensitivity": "share"}


def recipe(row: dict) -> dict:
    keys = ("kind", "target_bits", "weights", "acts", "candidates", "method", "windows", "seqlen", "calib_samples",
            "exponent_search", "sensitivity")
    defaults = {**RECIPE_DEFAULTS, **(TARGET_DEFAULTS if row.get("kind") == "target-bits" else {})}
    return {k: row.get(k, defaults.get(k)) for k in keys}


def load_rows(path: Path) -> list[dict]:
    return json.loads(path.read_text())["rows"] if path.is_file() else []


def add_row(path: Path, row: dict) -> list[dict]:
    """Append ``row`` to the file's rows as they are now (another run of this script may have added some)."""
    rows = [*load_rows(path), row]
    save_rows(path, rows)
    return rows


def save_rows(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"model": "SmolLM2-135M-Instruct (FP32 ONNX)", "rows": rows}, indent=1) + "\n")
    tmp.replace(path)


def published_uniform_rows(results: Path, args: argparse.Namespace) -> list[dict]:
    """The uniform mxonnx rows of ``bench/run.py``'s result files measured with the same method, windows and
    sequence length (the newest of each configuration)."""
    found: dict[str, dict] = {}
    for path in sorted(results.glob("20*.json")):
        data = json.loads(path.read_text())
        meta = data.get("meta", {})
        if meta.get("windows") != args.windows or meta.get("seqlen") != args.seqlen:
            continue
        for r in data.get("rows", []):
            if r.get("tool") == "mxonnx" and r.get("method") == args.method and r.get("status") == "ok" \
                    and r.get("perplexity") is not None and r["weights"].startswith("mx"):
                found[r["config"]] = {"kind": "uniform", "weights": r["weights"], "acts": r["acts"],
                                      "perplexity": r["perplexity"],
                                      "bits_per_weight": r.get("bits_stored") or r["format_bits"],
                                      "source": path.name, "label": r["config"]}
    return list(found.values())


def mxonnx(*args: str) -> dict:
    """Run ``mxonnx ARGS --json`` in a child process; its JSON object."""
    run = subprocess.run([sys.executable, "-m", "mxonnx.cli", *args, "--json"], capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"mxonnx {args[0]} failed: {run.stderr.strip().splitlines()[-1:]}")
    return json.loads(run.stdout)


def measure(row: dict, args: argparse.Namespace) -> dict:
    """Quantize, inspect and evaluate one recipe; the row with its results."""
    name = (f"tb{row['target_bits']:g}-{row['acts']}-{row['sensitivity']}" if row["kind"] == "target-bits"
            else f"u-{row['weights']}-{row['acts']}")
    name += "-es" if row.get("exponent_search") else ""
    out = args.work / name
    shutil.rmtree(out, ignore_errors=True)
    args.work.mkdir(parents=True, exist_ok=True)
    # OCP exponents, as the published uniform rows it is compared with, unless --exponent-search
    flags = ["--method", row["method"], "--acts", row["acts"], "--calib-samples", str(row["calib_samples"]),
             "--exponent-search" if row.get("exponent_search") else "--no-exponent-search", "--lm-head", "none"]
    if row["kind"] == "target-bits":
        flags += ["--target-bits", str(row["target_bits"]), "--sensitivity", row.get("sensitivity", "share")]
        if row["candidates"]:
            flags += ["--candidates", row["candidates"]]
    else:
        flags += ["--weights", row["weights"]]
    quantized = mxonnx("quantize", str(args.fp32), "-o", str(out), *flags)
    inspected = mxonnx("inspect", str(out))
    evaluated = mxonnx("eval", str(out), "--seqlen", str(row["seqlen"]), "--max-windows", str(row["windows"]))
    shutil.rmtree(out, ignore_errors=True)
    allocation = quantized.get("allocation")
    return {**row, "perplexity": evaluated["perplexity"], "eval_windows": evaluated["windows"],
            "bits_per_weight": inspected["bits_per_weight"], "quantize_seconds": quantized["seconds"],
            "formats": dict(collections.Counter(l["weights"] for l in inspected["linears"] if l["weights"] != "none")),
            "allocation_bits": allocation["bits_per_weight"] if allocation else None,
            "measured_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                     text=True).stdout.strip()}


def plot(published: list[dict], rows: list[dict], out: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    targets = [r for r in rows if r["kind"] == "target-bits"]
    series = [("uniform formats (bench/run.py rows)", published, "o"),
              ("uniform controls", [r for r in rows if r["kind"] == "uniform"], "s")]
    for loss in sorted({recipe(r)["sensitivity"] for r in targets}):  # one line per --sensitivity
        series.append((f"--target-bits, --sensitivity {loss}",
                       sorted((r for r in targets if recipe(r)["sensitivity"] == loss), key=lambda r: r["target_bits"]),
                       "D" if loss == "share" else "^"))
    for label, points, marker in series:
        if not points:
            continue
        xs, ys = [p["bits_per_weight"] for p in points], [p["perplexity"] for p in points]
        ax.plot(xs, ys, marker=marker, linestyle="-" if marker in "D^" else "none", label=label)
        for p, x, y in zip(points, xs, ys):
            text = (f"B={p['target_bits']:g} {p['acts']}" if p["kind"] == "target-bits"
                    else p.get("label") or f"{p['weights']}/{p['acts']}")
            ax.annotate(text, (x, y), fontsize=6, xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel("stored bits per weight (decoder linears, codes + exponents on disk)")
    ax.set_ylabel("WikiText-2 perplexity")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=130)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    path = args.results / "pareto.json"
    rows = load_rows(path)
    have = {json.dumps(recipe(r), sort_keys=True) for r in rows}
    if not args.report_only:
        for row in wanted_rows(args):
            if json.dumps(recipe(row), sort_keys=True) in have:
                continue
            print(f"measuring {recipe(row)}", flush=True)
            try:
                rows = add_row(path, measure(row, args))
            except RuntimeError as exc:
                print(f"  {exc}", flush=True)
                continue
    mine = [r for r in rows if all(recipe(r)[k] == v for k, v in settings(args).items())]
    published = published_uniform_rows(args.results, args) if not args.exponent_search else []
    for r in sorted(mine, key=lambda r: r["bits_per_weight"]):
        what = (f"target {r['target_bits']:g} {recipe(r)['sensitivity']}" if r["kind"] == "target-bits"
                else f"uniform {r['weights']}")
        print(f"{what:<18} acts {r['acts']:<12} {r['bits_per_weight']:.4f} bits  ppl {r['perplexity']:.3f}")
    if mine or published:
        png = plot(published, mine, args.results / "pareto.png",
                   f"SmolLM2-135M, {args.method}, {args.windows} windows of {args.seqlen}, calibration "
                   f"{args.calib_samples} x 512")
        print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
