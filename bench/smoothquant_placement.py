"""Where SmoothQuant's scales go, and what that costs at W4A4 (why AMD Quark's SmoothQuant beats ours there).

SmoothQuant (paper Eq. 3: ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)``) from one set of calibration
statistics, placed in different ways, then the same round-to-nearest MX rewrite of weights and activations,
scored by ``mxonnx eval``. Folding puts ``1/s`` into the weights that exist (RMSNorm weight for q/k/v and gate/up,
v_proj/up_proj columns for o/down, so o gets one scale per KV channel under GQA); a ``Mul`` puts ``1/s`` into a
new float node before the linear, as Quark does. The float function is the same; what is quantized differs.

- ``fold``: the product (``mxonnx quantize --method sq``): group scales folded in ``FOLD_ORDER`` (q/k/v's and
  gate/up's scales see v/up as already folded);
- ``fold-unfolded-scales``: group scales all computed on the unfolded weights, then folded;
- ``fold-pow2-columns``: as ``fold-unfolded-scales`` with o's and down's scales rounded to powers of two;
- ``mul-group-kv`` / ``mul-group-kv-pow2-columns``: the scales of the two modes above applied by ``Mul`` nodes
  instead (v_proj and up_proj keep their columns);
- ``mul-group``: as ``mul-group-kv`` with o's scales per o input channel (a ``Mul`` needs no GQA constraint);
- ``mul-linear``: Quark's placement: a ``Mul`` before each linear with a scale fitted to that linear's own weight
  rows (``max|W_j|`` of that linear alone).

MX quantization along K is exact under power-of-two scaling of a column, so ``fold-pow2-columns`` and
``mul-group-kv-pow2-columns`` quantize the same numbers (up to float rounding of ``gamma/s`` against ``x * 1/s``).
The ``mul-*`` graphs have nodes the design of mxonnx forbids; they exist only for this comparison.

    python bench/smoothquant_placement.py [--weights mxfp4-32] [--acts mxfp4-32] [--windows 10]
        [--modes fold mul-linear ...] [--json] [--results FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MODES = ("fold", "fold-unfolded-scales", "fold-pow2-columns", "mul-group-kv", "mul-group-kv-pow2-columns",
         "mul-group", "mul-linear")
DEFAULT_MODEL = REPO / "models" / "cache" / "smollm2-135m-fp32"
ALPHA = 0.5
COLUMN_GROUPS = ("o", "down")  # groups whose scales fold into the columns of v_proj / up_proj


def power_of_two(s: np.ndarray) -> np.ndarray:
    """``2^round(log2 s)``: the nearest power of two (in log scale)."""
    return np.exp2(np.round(np.log2(s)))


def per_channel_scale(x_max: np.ndarray, w_max: np.ndarray) -> np.ndarray:
    """Eq. 3 for every input channel on its own (what a ``Mul`` allows: o_proj without the GQA constraint)."""
    from mxonnx.passes.smoothing import sane_scales

    with np.errstate(divide="ignore", invalid="ignore"):
        return sane_scales(x_max.astype(np.float64) ** ALPHA / w_max.astype(np.float64) ** (1 - ALPHA))


def unfolded_scales(blocks, stats, mode: str) -> dict[tuple[int, str], np.ndarray]:
    """Per (block index, linear name), the scales of ``mode`` computed on the unfolded weights: o's per KV channel
    ``[H_kv*d]`` for the ``*-kv`` and ``fold*`` modes (the product's ``smoothquant_scale``), else per input channel
    ``[K]``."""
    from mxonnx.passes.smoothquant import smoothquant_scale, weight_row_max
    from mxonnx.stats import group_key

    table = {}
    for block in blocks:
        for group, linears in block.groups().items():
            group_stats = stats[group_key(block, group)]
            if mode == "mul-linear":
                for linear in linears:
                    w_max = np.abs(linear.weight_array).max(axis=1)
                    table[block.index, linear.name] = per_channel_scale(group_stats.max_abs, w_max)
                continue
            if mode == "mul-group" and group == "o":
                s = per_channel_scale(group_stats.max_abs, weight_row_max([lin.weight_array for lin in linears]))
            else:
                s = smoothquant_scale(block, group, group_stats, ALPHA)
            if mode.endswith("pow2-columns") and group in COLUMN_GROUPS:
                s = power_of_two(s)
            table.update({(block.index, linear.name): s for linear in linears})
    return table


def place_by_mul(model, blocks, table) -> None:
    """``W <- diag(s) W`` and a float ``Mul(x, 1/s)`` before each linear (``s`` per input channel)."""
    import onnx_ir as ir

    from mxonnx.passes.smoothing import scale_rows, to_o_inputs

    for block in blocks:
        for group, linears in block.groups().items():
            for linear in linears:
                s = table[block.index, linear.name]
                if group == "o" and s.shape[0] != linear.shape[0]:
                    s = to_o_inputs(s, block)
                scale_rows(model.graph, linear, s)
                inverse = ir.Value(name=f"{linear.name}.smooth_inverse",
                                   const_value=ir.tensor((1.0 / s).astype(np.float32)))
                model.graph.register_initializer(inverse)
                mul = ir.node("Mul", [linear.input, inverse], name=f"{linear.name}/SmoothMul")
                model.graph.insert_before(linear.node, mul)
                linear.node.replace_input_with(0, mul.outputs[0])


def smoothed_model(src: Path, out: Path, mode: str, config) -> None:
    """Write the SmoothQuant + RTN model of ``mode`` (formats and calibration of the ``QuantizeConfig``
    ``config``; alpha ``ALPHA``) to the new folder ``out``."""
    import onnx_ir as ir

    from mxonnx.calibrate import collect_statistics
    from mxonnx.modelio import copy_model_assets
    from mxonnx.passes.llama_structure import find_decoder_blocks
    from mxonnx.passes.mx_matmul import MxMatMulPass, RoundToNearest
    from mxonnx.passes.smoothing import SmoothingPass
    from mxonnx.passes.smoothquant import smoothquant

    config = dataclasses.replace(config, method="sq", alpha=ALPHA)
    model = ir.load(src / "model.onnx")
    blocks = find_decoder_blocks(model)
    stats = collect_statistics(model, blocks, src, config)
    if mode == "fold":
        smoothquant(model, blocks, stats, config)
    elif mode.startswith("fold"):
        table = unfolded_scales(blocks, stats, mode)
        SmoothingPass(blocks, lambda block, group: table[block.index, block.groups()[group][0].name])(model)
    else:
        place_by_mul(model, blocks, unfolded_scales(blocks, stats, mode))
    linears = [linear for block in blocks for linear in block.linears()]
    MxMatMulPass(linears, config.weights, config.acts, RoundToNearest(config.weights))(model)
    out.mkdir(parents=True)
    ir.save(model, out / "model.onnx", external_data="model.onnx_data")
    copy_model_assets(src, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="FP32 ONNX folder")
    parser.add_argument("--weights", default="mxfp4-32")
    parser.add_argument("--acts", default="mxfp4-32")
    parser.add_argument("--windows", type=int, default=10, help="first N windows of 2048 tokens")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--results", type=Path, help="also write the JSON object to this file")
    args = parser.parse_args()
    from bench.measure import git_commit
    from mxonnx.config import QuantizeConfig
    from mxonnx.eval import evaluate_perplexity

    results = {}
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="sq-placement-") as tmp:
        for mode in args.modes:
            out = Path(tmp) / mode
            smoothed_model(args.model, out, mode, QuantizeConfig(weights=args.weights, acts=args.acts, progress=False))
            results[mode] = evaluate_perplexity(out, max_windows=args.windows, progress=False)["perplexity"]
            if not args.json:
                print(f"{mode:26s} {results[mode]:.3f}", flush=True)
    report = {"weights": args.weights, "acts": args.acts, "alpha": ALPHA, "windows": args.windows,
              "date": time.strftime("%Y-%m-%d"), "machine": platform.machine(), "commit": git_commit(REPO),
              "minutes": round((time.time() - start) / 60, 1), "perplexity": results}
    if args.json:
        print(json.dumps(report))
    if args.results:
        args.results.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
