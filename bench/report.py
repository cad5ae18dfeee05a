"""The benchmark's markdown table: one line per row, ratios against the FP32 row of the same run.

Ratios: perplexity / FP32 perplexity; file bytes / FP32 bytes; prefill speed-up = FP32 prefill ms / row prefill ms;
decode speed-up = row tokens/s / FP32 tokens/s. A row that could not run shows its reason instead of numbers.
"""

from __future__ import annotations

import math

from bench.rows import ALL_METHODS

COLUMNS = ("tool", "config", "method", "PPL", "PPL / FP32", "bits/w stored", "bits/w format", "size MB",
           "size / FP32", "quantize s", "quantize peak RSS MB", "prefill ms (512)", "prefill speed-up",
           "decode tok/s", "decode speed-up", "run peak RSS MB", "load avg", "measured at commit")


def _fmt(value, digits: int) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{value:,.{digits}f}"


def _ratio(a, b):
    return a / b if a is not None and b not in (None, 0) else None


def table_lines(results: list[dict]) -> list[str]:
    """Markdown header and one line per result (results carry ``status`` ``ok`` or ``unavailable``)."""
    fp32 = next((r for r in results if r["tool"] == "fp32" and r["status"] == "ok"), None)
    base = fp32 or {}
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * 3 + "---:|" * (len(COLUMNS) - 3)]
    for r in results:
        head = [r["tool"], r["config"], r["method"]]
        if r["status"] != "ok":
            lines.append("| " + " | ".join(head + [f"*{r['reason']}*"] + [""] * (len(COLUMNS) - 4)) + " |")
            continue
        prefill_up = _ratio(base.get("prefill_ms"), r["prefill_ms"])
        decode_up = _ratio(r["decode_tokens_per_second"], base.get("decode_tokens_per_second"))
        cells = [
            _fmt(r["perplexity"], 3), _fmt(_ratio(r["perplexity"], base.get("perplexity")), 3),
            _fmt(r["bits_stored"], 2), _fmt(r["format_bits"], 2), _fmt(r["file_bytes"] / 1e6, 1),
            _fmt(_ratio(r["file_bytes"], base.get("file_bytes")), 2), _fmt(r["quantize_seconds"], 1),
            _fmt(r["quantize_peak_rss_mb"], 0), _fmt(r["prefill_ms"], 0), _fmt(prefill_up, 2),
            _fmt(r["decode_tokens_per_second"], 1), _fmt(decode_up, 2), _fmt(r["run_peak_rss_mb"], 0),
            _fmt(r.get("load_average_mean"), 1), f"`{r['commit']}`" if r.get("commit") else "—",
        ]
        lines.append("| " + " | ".join(head + cells) + " |")
    return lines


def grid_lines(results: list[dict], methods: list[str]) -> list[str]:
    """The paper's Table 1/2 layout for mxonnx: one line per method (in ``methods`` order), one column per mxonnx
    configuration with at least one measured row, perplexity in each cell (``—``: not measured)."""
    ours = [r for r in results if r["tool"] == "mxonnx" and r["status"] == "ok"]
    configs = list(dict.fromkeys(r["config"] for r in ours))
    if not configs:
        return []
    ppl = {(r["method"], r["config"]): r["perplexity"] for r in ours}
    lines = ["| method | " + " | ".join(configs) + " |", "|---|" + "---:|" * len(configs)]
    for method in methods:
        if any((method, c) in ppl for c in configs):
            lines.append(f"| {method} | " + " | ".join(_fmt(ppl.get((method, c)), 3) for c in configs) + " |")
    return lines


def cost_line(results: list[dict]) -> str:
    """How long the measured rows took: the sum of their quantize and perplexity times (speed runs, a few seconds
    per row, not counted), and how many rows are still to measure."""
    ok = [r for r in results if r["status"] == "ok"]
    seconds = sum((r.get("quantize_seconds") or 0) + (r.get("eval_seconds") or 0) for r in ok)
    hours, minutes = divmod(round(seconds / 60), 60)
    line = f"Measuring the {len(ok)} rows with figures took {hours} h {minutes:02d} min (quantize + perplexity, summed)"
    missing = len(results) - len(ok)
    return line + (f"; {missing} row(s) have none yet." if missing else ".")


def render_markdown(results: list[dict], meta: dict) -> str:
    """``table.md``: how the numbers were taken, then the table."""
    windows = "all" if meta["windows"] is None else f"the first {meta['windows']}"
    m = meta["machine"]
    intro = [
        f"# Benchmark: {meta['model']}",
        "",
        f"Run {meta['date']} at commit `{meta['commit']}` on {m['cpu']} ({m['nproc']} logical CPUs, "
        f"{m['memory_gb']} GB), {m['os']}.",
        f"Perplexity: WikiText-2 raw test, {windows} window(s) of {meta['seqlen']} tokens, every model through "
        "the same `mxonnx eval`. Speed: `bench/speed.py` with "
        f"{meta['threads']} onnxruntime thread(s), prefill of {meta['prompt']} tokens (median of 3), "
        f"decode of {meta['decode']} tokens with the KV cache.",
        "Bits/w stored: bytes feeding the decoder's linear weights x 8 / their weight count, measured in the file; "
        "bits/w format: what the format needs (elements + scales). Quantize time and peak RSS are the quantizing "
        "process's wall time and `ru_maxrss`; run peak RSS is the speed process's.",
        "Calibration: WikiText-2 *validation* (the paper uses the train split, not available here); "
        f"mxonnx uses its defaults, peers {meta['peer_calibration']}. "
        "The FP32 model is exported from a Q4_1 GGUF, so its linear weights already sit on a 4-bit grid.",
        "Ratios are against the FP32 row of this table. Absolute times depend on the machine's load: load avg is "
        "the mean 1-minute load average while the row was produced and measured (far above the "
        f"{m['nproc']} CPUs: other jobs were sharing them and the row's times are slow; `—`: rows measured before "
        "it was recorded). Rows may come from earlier runs: the last column gives the commit each was measured at "
        "(`+dirty`: with uncommitted changes), the JSON file also its time.",
        cost_line(results),
        "",
    ]
    grid = grid_lines(results, list(ALL_METHODS))
    if grid:
        grid = ["", "## mxonnx perplexity in the paper's Table 1/2 layout", ""] + grid
    return "\n".join(intro + table_lines(results) + grid) + "\n"
