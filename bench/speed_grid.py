"""Prefill and decode speed of several model folders in one interleaved run (project issue 18's measurement).

Every round runs ``bench/speed.py`` once per model and thread count, in the order given, so that slow phases of a
shared machine fall on all models alike; each cell is the median over rounds. Ratios are against the first model
(the baseline, e.g. FP32 as saved) and, if given, a second reference (``--reference LABEL``, e.g. onnxruntime's own
int4), both measured in the same run. Wall time: prefill ms of ``--prompt`` tokens, decode tokens/s over
``--decode`` steps with the KV cache. The header gives the CPU, its flags and the load average during the run.

    python bench/speed_grid.py --threads 1,2 --rounds 2 --out bench/results/speed \\
        FP32=models/cache/smollm2-135m-fp32:no-fuse W4A8=/path/to/q ...

A model is ``LABEL=FOLDER`` (fused for inference, the default of ``mxonnx``) or ``LABEL=FOLDER:no-fuse`` (the
graph as saved).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "amx_int8")


def cpu_description() -> tuple[str, list[str]]:
    """The CPU model name and which of FLAGS /proc/cpuinfo lists."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")),
                platform.processor())
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))
    return name, [f for f in FLAGS if f in flags]


def parse_model(text: str) -> tuple[str, Path, bool]:
    label, sep, rest = text.partition("=")
    if not sep or not label or not rest:
        raise SystemExit(f"speed_grid: model {text!r}: expected LABEL=FOLDER or LABEL=FOLDER:no-fuse")
    folder, _, mode = rest.partition(":")
    if mode not in ("", "no-fuse"):
        raise SystemExit(f"speed_grid: model {text!r}: the suffix may only be ':no-fuse'")
    return label, Path(folder), mode != "no-fuse"


def measure(folder: Path, fuse: bool, threads: int, prompt: int, decode: int, repeat: int) -> dict:
    command = [sys.executable, str(ROOT / "bench" / "speed.py"), str(folder), "--threads", str(threads),
               "--prompt", str(prompt), "--decode", str(decode), "--repeat", str(repeat),
               "--fuse" if fuse else "--no-fuse"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"speed_grid: {folder}: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(records: list[dict], labels: list[str], threads: list[int], reference: str | None) -> list[str]:
    """One line per model: per thread count the median prefill ms / decode tok/s and the ratios."""
    def median(label, t, key):
        values = [r[key] for r in records if r["label"] == label and r["threads"] == t]
        return statistics.median(values) if values else None

    base = labels[0]
    head = ["model"]
    for t in threads:
        head += [f"{t} thr prefill ms", f"{t} thr decode tok/s", f"{t} thr prefill vs {base}",
                 f"{t} thr decode vs {base}"] + ([f"{t} thr decode vs {reference}"] if reference else [])
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for label in labels:
        cells = [label]
        for t in threads:
            prefill, decode = median(label, t, "prefill_ms"), median(label, t, "decode_tokens_per_second")
            cells += [f"{prefill:,.0f}", f"{decode:.1f}", f"{median(base, t, 'prefill_ms') / prefill:.2f}x",
                      f"{decode / median(base, t, 'decode_tokens_per_second'):.2f}x"]
            if reference:
                cells.append(f"{decode / median(reference, t, 'decode_tokens_per_second'):.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", metavar="LABEL=FOLDER[:no-fuse]")
    parser.add_argument("--threads", default="1", help="comma-separated onnxruntime thread counts (default 1)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--decode", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3, help="prefill repeats inside one measurement (median)")
    parser.add_argument("--reference", default=None, help="a second label to give decode ratios against")
    parser.add_argument("--out", type=Path, default=None, help="write OUT.json (records) and OUT.md (table)")
    args = parser.parse_args(argv)
    models = [parse_model(m) for m in args.models]
    labels = [m[0] for m in models]
    if args.reference is not None and args.reference not in labels:
        raise SystemExit(f"speed_grid: --reference {args.reference!r} is not one of the labels")
    threads = [int(t) for t in args.threads.split(",")]
    records, loads = [], []
    for round_index in range(args.rounds):
        for t in threads:
            for label, folder, fuse in models:
                r = measure(folder, fuse, t, args.prompt, args.decode, args.repeat)
                loads.append(os.getloadavg()[0])
                records.append({"label": label, "folder": str(folder), "fused": fuse, "threads": t,
                                "round": round_index, **r})
                print(f"round {round_index + 1}, {t} thread(s), {label}: prefill {r['prefill_ms']:.0f} ms, "
                      f"decode {r['decode_tokens_per_second']:.1f} tok/s", file=sys.stderr, flush=True)
    name, flags = cpu_description()
    commit = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty=+dirty"], capture_output=True,
                            text=True).stdout.strip()
    header = [f"Measured {time.strftime('%Y-%m-%d %H:%M')} at commit `{commit}` on {name} ({os.cpu_count()} logical "
              f"CPUs), flags: {' '.join(flags)}; load average (1 min) during the run {min(loads):.1f}-{max(loads):.1f}.",
              f"`bench/speed_grid.py`: {args.rounds} interleaved rounds, medians; prefill of {args.prompt} tokens "
              f"(median of {args.repeat}), decode of {args.decode} tokens with the KV cache; wall time.", ""]
    lines = header + table(records, labels, threads, args.reference)
    print("\n".join(lines))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps({"header": header, "records": records}, indent=1))
        args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
