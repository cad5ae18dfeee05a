"""Calibration cost against plain inference (project issue 6, goal: at most 1.5x).

Over the same calibration windows (``--samples`` x ``--seqlen`` tokens of the calibration text, drawn as
``mxonnx quantize`` draws them) and with the same onnxruntime threads, the wall time of

- ``forward``: plain FP32 forward passes of the whole exported graph, one session, one window per run;
- ``stats``: the statistics pass of ``--method sq`` (per-channel max|x| and mean|x| of every linear input), block
  by block through ``mxonnx.blockwise.BlockwiseRunner``;
- ``awq-stats``: the same plus the sampled input rows AWQ's search needs.

Each part runs in its own child process (its peak RSS is its own); session creation and the prefix run count,
tokenizing the text does not. Ratios are against ``forward`` measured in the same run.

    python bench/calibration.py [--model FOLDER] [--samples 128] [--seqlen 512] [--threads 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PARTS = ("forward", "stats", "awq-stats")
DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "cache" / "smollm2-135m-fp32"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="exported FP32 folder")
    p.add_argument("--samples", type=int, default=128, help="calibration windows (mxonnx quantize's default)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per window")
    p.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    p.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)  # child mode: time one part, print JSON
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return p.parse_args(argv)


def time_part(args: argparse.Namespace) -> dict:
    import onnx_ir as ir

    from mxonnx.blockwise import decoder_feed
    from mxonnx.calibrate import calibration_windows, collect_statistics, load_tokenizer
    from mxonnx.config import QuantizeConfig, default_calib_text
    from mxonnx.modelio import resolve_model
    from mxonnx.passes.awq import SAMPLE_TOKENS
    from mxonnx.passes.llama_structure import find_decoder_blocks
    from mxonnx.session import create_session

    paths = resolve_model(args.model)
    config = QuantizeConfig(method="awq" if args.part == "awq-stats" else "sq", calib_samples=args.samples,
                            calib_seqlen=args.seqlen, progress=False)
    windows = calibration_windows(default_calib_text(), load_tokenizer(paths.folder), args.samples, args.seqlen, 0)
    model = ir.load(paths.onnx)
    blocks = find_decoder_blocks(model)
    start = time.perf_counter()
    if args.part == "forward":
        session = create_session(paths.onnx, threads=args.threads)
        inputs = list(model.graph.inputs)
        for ids in windows:
            session.run(["logits"], decoder_feed(inputs, ids[None], blocks[0].num_kv_heads, blocks[0].head_dim))
    else:  # what `mxonnx quantize --method sq|awq` computes before folding
        sample = SAMPLE_TOKENS if config.uses_awq else 0  # AWQ's search keeps sampled rows
        collect_statistics(model, blocks, paths.folder, config, sample_tokens=sample, threads=args.threads)
    return {"part": args.part, "seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.part:
        print(json.dumps(time_part(args)))
        return
    from bench.measure import run_child

    results = {}
    for part in PARTS:
        run = run_child([sys.executable, str(Path(__file__).resolve()), "--part", part, "--model", str(args.model),
                         "--samples", str(args.samples), "--seqlen", str(args.seqlen), "--threads", str(args.threads)])
        if run.returncode != 0:
            sys.exit(f"calibration benchmark: {part} failed: {run.failure()}")
        results[part] = {"seconds": run.json()["seconds"], "peak_rss_mb": run.peak_rss_mb}
    base = results["forward"]["seconds"]
    for part in PARTS:
        results[part]["ratio_to_forward"] = results[part]["seconds"] / base
    summary = {"model": str(args.model), "windows": args.samples, "seqlen": args.seqlen, "threads": args.threads,
               "parts": results}
    if args.json:
        print(json.dumps(summary, indent=1))
        return
    print(f"{args.samples} windows of {args.seqlen} tokens, {args.threads} onnxruntime threads, {args.model}")
    print("| part | seconds | / forward | peak RSS MB |\n|---|---:|---:|---:|")
    for part in PARTS:
        r = results[part]
        print(f"| {part} | {r['seconds']:.1f} | {r['ratio_to_forward']:.2f} | {r['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
