"""Reproduction benchmark (``make bench``): the paper's configurations on SmolLM2-135M, peers side by side.

For every row of ``bench/rows.py``: quantize (``mxonnx quantize`` or the peer's runner), then, through the same
code for every model, WikiText-2 perplexity (``mxonnx eval``), stored bits per weight and file size, and prefill /
decode speed (``bench/speed.py``). Writes ``bench/results/<date>.json``, ``table.md`` and ``ppl_vs_bits.png``
(``--quick``: ``-quick`` suffixes) with every row of the table, whatever the filters, and prints the table.
Resumable: each finished row is cached in ``bench/.work/rows/`` under a key of its recipe, the FP32 model's hash
and the measurement settings, and rows already published in ``bench/results/*.json`` under the same FP32 hash and
settings count as measured (so a fresh checkout resumes where the last machine stopped; ``--refresh`` measures
again); a row that fails (a method not implemented yet, a peer that cannot install) is reported with its reason and
retried next run.

    .venv/bin/python bench/run.py [--quick] [--full | --windows N] [--methods rtn gptq ...] [--tools mxonnx ...]
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

import onnx
import onnx.external_data_helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.measure import (  # noqa: E402
    LoadSampler, git_commit, linear_weight_bits, machine, model_file_bytes, run_child)
from bench.plot import plot_ppl_vs_bits  # noqa: E402
from bench.produce import (  # noqa: E402
    PEER_CALIB_SAMPLES, PEER_CALIB_SEQLEN, REPO, Produced, RowUnavailable, child_env, produce, run_for)
from bench.report import render_markdown, table_lines  # noqa: E402
from bench.rows import ALL_METHODS, CONFIGS, TOOLS, Row, select_rows  # noqa: E402
from mxonnx.modelio import resolve_model  # noqa: E402

CACHE = REPO / "models" / "cache"
GGUF = CACHE / "SmolLM2-135M-Instruct.Q4_1.gguf"
FP32 = CACHE / "smollm2-135m-fp32"
DEFAULT_WINDOWS, QUICK_WINDOWS = 40, 4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help=f"a handful of rows on {QUICK_WINDOWS} windows")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true", help="every window of the test set")
    size.add_argument("--windows", type=int, help=f"first N windows (default {DEFAULT_WINDOWS}, --quick {QUICK_WINDOWS})")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--methods", nargs="+", choices=ALL_METHODS, help="only rows of these methods (FP32 always)")
    p.add_argument("--tools", nargs="+", choices=[t for t in TOOLS if t != "fp32"], help="only rows of these tools")
    p.add_argument("--configs", nargs="+", choices=CONFIGS, metavar="CONFIG",
                   help="only rows of these configurations (quoted labels: " + "; ".join(CONFIGS) + ")")
    p.add_argument("--report-only", action="store_true",
                   help="measure nothing: write the table from the rows already measured (others: 'not measured')")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime threads of the speed measurement (default 1)")
    p.add_argument("--prompt", type=int, default=512, help="prefill length (default 512)")
    p.add_argument("--decode", type=int, default=64, help="decode steps with the KV cache (default 64)")
    p.add_argument("--fp32", type=Path, default=FP32, help=f"float ONNX folder with past (default: exported from {GGUF.name})")
    p.add_argument("--work", type=Path, default=REPO / "bench" / ".work", help="models and row cache")
    p.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--refresh", action="store_true", help="recompute the selected rows even if cached (after code changes)")
    p.add_argument("--keep-models", action="store_true", help="keep quantized models after measuring them")
    return p.parse_args(argv)


def ensure_fp32(folder: Path) -> Path:
    """The FP32 folder, exported from the GGUF of ``make models`` when missing."""
    if (folder / "model.onnx").is_file():
        return folder
    if not GGUF.is_file():
        sys.exit(f"bench: {folder} is missing and so is {GGUF}; run `make models` first")
    print(f"exporting {GGUF.name} -> {folder}", flush=True)
    run = run_child([sys.executable, "-m", "mxonnx.cli", "export", str(GGUF), "-o", str(folder), "--json"], env=child_env())
    if run.returncode != 0:
        sys.exit(f"bench: export failed: {run.failure()}")
    return folder


def fingerprint(folder: Path) -> str:
    """sha256 of the FP32 model's graph file and the external data files its tensors name, in name order (part of
    every row's cache key); other files in the folder do not count."""
    graph = resolve_model(folder).onnx
    proto = onnx.load(str(graph), load_external_data=False)
    files = {graph.resolve()} | {(graph.parent / entry.value).resolve()
                                 for tensor in onnx.external_data_helper._get_all_tensors(proto)
                                 for entry in tensor.external_data if entry.key == "location"}
    digest = hashlib.sha256()
    for path in sorted(files, key=lambda f: f.name):
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def measure(produced: Produced, args: argparse.Namespace, windows: int | None) -> dict:
    """Perplexity, bits, bytes and speed of a produced model (every number from a child process or the file)."""
    eval_args = ["eval", str(produced.folder), "--seqlen", str(args.seqlen), "--json"]
    if windows is not None:
        eval_args += ["--max-windows", str(windows)]
    ev = run_for(produced, "mxonnx.cli", *eval_args)
    if ev.returncode != 0:
        raise RowUnavailable(f"eval failed: {ev.failure()}")
    sp = run_for(produced, "bench.speed", str(produced.folder), "--threads", str(args.threads),
                 "--prompt", str(args.prompt), "--decode", str(args.decode))
    if sp.returncode != 0:
        raise RowUnavailable(f"speed measurement failed: {sp.failure()}")
    evaluation, speed = ev.json(), sp.json()
    config = json.loads((produced.folder / "config.json").read_text())
    return {
        "perplexity": evaluation["perplexity"], "eval_tokens": evaluation["tokens"],
        "eval_windows": evaluation["windows"], "eval_seconds": evaluation["seconds"],
        "bits_stored": linear_weight_bits(resolve_model(produced.folder).onnx, config),
        "file_bytes": model_file_bytes(produced.folder),
        "quantize_seconds": produced.quantize_seconds, "quantize_peak_rss_mb": produced.quantize_peak_rss_mb,
        "prefill_ms": speed["prefill_ms"], "decode_tokens_per_second": speed["decode_tokens_per_second"],
        "run_peak_rss_mb": sp.peak_rss_mb, "native_mx_library": speed["native_library"] is not None,
    }


def published_result(row: Row, args: argparse.Namespace, windows: int | None, fp32_id: str) -> dict | None:
    """The newest row of ``args.results/*.json`` measured with the same recipe, FP32 model and settings, if any."""
    wanted = {"fp32_sha256_16": fp32_id, "windows": windows, "seqlen": args.seqlen, "threads": args.threads,
              "prompt": args.prompt, "decode": args.decode}
    for path in sorted(args.results.glob("*.json"), reverse=True):  # dated names: newest first
        try:
            published = json.loads(path.read_text())
            meta, rows = published["meta"], published["rows"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if any(meta.get(k) != v for k, v in wanted.items()):
            continue
        for result in rows:
            if (result.get("status") == "ok" and result.get("tool") == row.tool and result.get("config") == row.config
                    and result.get("method") == row.method and result.get("options") == list(row.options)):
                return {**result, "published_in": path.name}
    return None


def row_result(row: Row, args: argparse.Namespace, windows: int | None, fp32: Path, fp32_id: str) -> dict:
    """The cached (or published) result of ``row`` or a fresh one; failures come back as ``status: unavailable``."""
    settings = [row.key, fp32_id, windows, args.seqlen, args.threads, args.prompt, args.decode]
    cache = args.work / "rows" / (hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:20] + ".json")
    base = {"tool": row.tool, "config": row.config, "method": row.method, "weights": row.weights,
            "acts": row.acts, "format_bits": row.format_bits, "options": list(row.options)}
    if cache.is_file() and not args.refresh:
        return {**json.loads(cache.read_text()), **base, "cached": True}
    published = None if args.refresh else published_result(row, args, windows, fp32_id)
    if published is not None:
        return {**published, **base, "cached": True}
    if args.report_only:
        return {**base, "status": "not measured", "reason": "not measured yet on this machine", "cached": False}
    try:
        with LoadSampler() as load:
            produced = produce(row, fp32, args.work)
            numbers = measure(produced, args, windows)
    except RowUnavailable as exc:
        return {**base, "status": "unavailable", "reason": str(exc)}
    result = {**base, "status": "ok", **numbers, "load_average_mean": load.mean, "load_average_peak": load.peak,
              "commit": git_commit(REPO),
              "measured_at": datetime.datetime.now().isoformat(timespec="seconds")}
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(result, indent=1))
    if row.tool != "fp32" and not args.keep_models:
        shutil.rmtree(produced.folder, ignore_errors=True)
    return {**result, "cached": False}


def progress_line(result: dict, seconds: float) -> str:
    if result["status"] != "ok":
        return f"  {result['reason']}"
    source = "cached" if result["cached"] else f"{seconds:.0f} s"
    return (f"  ppl {result['perplexity']:.3f}, {result['bits_stored']:.2f} bits/w stored, "
            f"prefill {result['prefill_ms']:.0f} ms, decode {result['decode_tokens_per_second'] or 0:.1f} tok/s ({source})")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.work, args.results = args.work.resolve(), args.results.resolve()  # children run inside args.work
    windows = None if args.full else args.windows or (QUICK_WINDOWS if args.quick else DEFAULT_WINDOWS)
    fp32 = ensure_fp32(args.fp32).resolve()
    fp32_id = fingerprint(fp32)
    rows = select_rows(args.quick, args.methods, args.tools, args.configs)
    print(f"{len(rows)} rows, {'all' if windows is None else windows} windows of {args.seqlen} tokens; "
          f"FP32 model {fp32} ({fp32_id})", flush=True)
    measured = {}
    for i, row in enumerate(rows, 1):
        print(f"[{i}/{len(rows)}] {row.label}", flush=True)
        start = time.perf_counter()
        measured[row] = row_result(row, args, windows, fp32, fp32_id)
        print(progress_line(measured[row], time.perf_counter() - start), flush=True)
    # The files hold the whole table: rows outside --tools/--methods/--configs come from the cache or the
    # published results (or say 'not measured'), so a partial run never drops rows measured before.
    report_args = argparse.Namespace(**{**vars(args), "report_only": True, "refresh": False})
    results = [measured[row] if row in measured else row_result(row, report_args, windows, fp32, fp32_id)
               for row in select_rows(args.quick, None, None, None)]

    date = datetime.date.today().isoformat()
    suffix = "-quick" if args.quick else ""
    meta = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF, exported to FP32 ONNX)", "date": date,
            "commit": git_commit(REPO), "machine": machine(), "windows": windows, "seqlen": args.seqlen,
            "threads": args.threads, "prompt": args.prompt, "decode": args.decode, "fp32_sha256_16": fp32_id,
            "peer_calibration": f"{PEER_CALIB_SAMPLES} windows of {PEER_CALIB_SEQLEN} tokens"}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{date}{suffix}.json").write_text(json.dumps({"meta": meta, "rows": results}, indent=1))
    (args.results / f"table{suffix}.md").write_text(render_markdown(results, meta))
    plot_ppl_vs_bits(results, args.results / f"ppl_vs_bits{suffix}.png",
                     f"SmolLM2-135M, WikiText-2 ({'all' if windows is None else windows} x {args.seqlen} tokens), {date}")
    print("\n" + "\n".join(table_lines(results)))
    print(f"\nwrote {args.results}/{date}{suffix}.json, table{suffix}.md, ppl_vs_bits{suffix}.png")


if __name__ == "__main__":
    main()
