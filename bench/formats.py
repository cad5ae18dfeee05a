"""Throughput of ``mxonnx.formats.quantize_dequantize`` per format on a float32 matrix (default 4096 x 4096).

Prints a markdown table: format, M elements/s (best of ``--repeat`` runs), and the ratio to a plain
``np.round(x)`` over the same matrix measured in the same run (a floor for one numpy pass).

    .venv/bin/python bench/formats.py [--size 4096] [--repeat 3] [--axis -1] [--formats mxint4-32 ...]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from mxonnx.formats import quantize_dequantize

DEFAULT_FORMATS = (
    "mxint8-32", "mxint8-128", "mxint4-32", "mxint4-128", "mxint2-32",
    "mxfp8e4m3-32", "mxfp8e5m2-32", "mxfp6e3m2-32", "mxfp6e2m3-32", "mxfp4-32", "mxfp4-2", "mxfp4-1024",
    "int8", "int4", "int4-g128", "none",
)


def best_seconds(fn, repeat: int) -> float:
    """Shortest wall time of ``repeat`` calls (the least disturbed by other processes on a shared machine)."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096, help="matrix is size x size (default 4096)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--axis", type=int, default=-1, help="block axis (default -1; weights use 0)")
    parser.add_argument("--formats", nargs="+", default=DEFAULT_FORMATS)
    args = parser.parse_args()

    x = np.random.default_rng(0).standard_normal((args.size, args.size), dtype=np.float32)
    baseline = best_seconds(lambda: np.round(x), args.repeat)
    print(f"{args.size}x{args.size} float32, axis {args.axis}, best of {args.repeat}; "
          f"np.round(x): {x.size / baseline / 1e6:.0f} M elements/s\n")
    print("| format | M elements/s | time / np.round time |")
    print("|---|---:|---:|")
    for name in args.formats:
        seconds = best_seconds(lambda: quantize_dequantize(x, name, axis=args.axis), args.repeat)
        print(f"| {name} | {x.size / seconds / 1e6:.0f} | {seconds / baseline:.1f} |")


if __name__ == "__main__":
    main()
