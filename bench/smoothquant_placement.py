"""Where SmoothQuant's scales go, and what that costs at W4A4 (why AMD Quark's SmoothQuant beats ours there).

SmoothQuant (paper Eq. 3, alpha 0.5) with the same calibration statistics, applied five ways, then the same
round-to-nearest MX rewrite of weights and activations, scored by ``mxonnx eval``:

- ``fold``: ``mxonnx quantize --method sq``: one scale per linear group folded into the weights that exist
  (RMSNorm weight for q/k/v and gate/up, v_proj/up_proj columns for o/down; o per KV channel), groups folded in
  ``passes.smoothing.FOLD_ORDER`` (the norm-side groups' scales see v/up as already folded);
- ``fold-unfolded-scales``: the same fold with every scale computed on the unfolded weights;
- ``mul-group-kv``: those same scales, applied by a float ``Mul`` before each linear instead of folded (v_proj and
  up_proj keep their columns);
- ``mul-group``: as ``mul-group-kv`` with o's scales per o input channel (a ``Mul`` needs no GQA constraint);
- ``mul-linear``: Quark's placement: a ``Mul`` before each linear with a scale fitted to that linear's own weight
  rows (``max|W_j|`` of that linear only).

The ``mul-*`` graphs have nodes the design of mxonnx forbids; they exist only for this comparison.

    python bench/smoothquant_placement.py [--weights mxfp4-32] [--acts mxfp4-32] [--windows 10]
        [--modes fold mul-linear ...] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODES = ("fold", "fold-unfolded-scales", "mul-group-kv", "mul-group", "mul-linear")
DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "cache" / "smollm2-135m-fp32"
ALPHA = 0.5


def smoothquant_by_mul(model, blocks, stats, mode: str) -> None:
    """Multiply each linear's weight rows by ``s`` and put a float ``Mul(x, 1/s)`` before it (``mul-*`` modes)."""
    import numpy as np
    import onnx_ir as ir

    from mxonnx.calibrate import group_key
    from mxonnx.passes.smoothing import per_kv_channel, sane_scales, scale_rows, to_o_inputs
    from mxonnx.passes.smoothquant import weight_row_max

    for block in blocks:
        for group, linears in block.groups().items():
            x_max = stats[group_key(block, group)].max_abs.astype(np.float64)
            group_w = weight_row_max(block, group).astype(np.float64)
            for linear in linears:
                if mode == "mul-linear":
                    w_max = np.abs(linear.weight_array).max(axis=1).astype(np.float64)
                else:
                    w_max = group_w
                if mode == "mul-group-kv" and group == "o":
                    kv = per_kv_channel(x_max, block) ** ALPHA / per_kv_channel(w_max, block) ** (1 - ALPHA)
                    s = to_o_inputs(sane_scales(kv), block)
                else:
                    s = sane_scales(x_max**ALPHA / w_max ** (1 - ALPHA))
                scale_rows(model.graph, linear, s)
                inverse = ir.Value(name=f"{linear.name}.smooth_inverse",
                                   const_value=ir.tensor((1.0 / s).astype(np.float32)))
                model.graph.register_initializer(inverse)
                mul = ir.node("Mul", [linear.input, inverse], name=f"{linear.name}/SmoothMul")
                model.graph.insert_before(linear.node, mul)
                linear.node.replace_input_with(0, mul.outputs[0])


def smoothed_model(src: Path, out: Path, mode: str, config) -> None:
    """Write the SmoothQuant + RTN model of ``mode`` (formats and calibration of the ``QuantizeConfig``
    ``config``; its method and alpha are ignored) to the new folder ``out``."""
    import dataclasses

    import onnx_ir as ir

    import mxonnx.passes.smoothing as smoothing
    from mxonnx.calibrate import collect_statistics
    from mxonnx.modelio import copy_model_assets
    from mxonnx.passes.llama_structure import find_decoder_blocks
    from mxonnx.passes.mx_matmul import MxMatMulPass, RoundToNearest
    from mxonnx.quantize import quantize_model

    config = dataclasses.replace(config, method="sq", alpha=ALPHA)
    if mode.startswith("fold"):
        order = smoothing.FOLD_ORDER
        if mode == "fold-unfolded-scales":  # rows before columns: every scale sees the unfolded weights
            smoothing.FOLD_ORDER = ("qkv", "gate_up", "o", "down")
        try:
            quantize_model(src, out, config)
        finally:
            smoothing.FOLD_ORDER = order
        return
    model = ir.load(src / "model.onnx")
    blocks = find_decoder_blocks(model)
    smoothquant_by_mul(model, blocks, collect_statistics(model, blocks, src, config), mode)
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
    args = parser.parse_args()
    from mxonnx.config import QuantizeConfig
    from mxonnx.eval import evaluate_perplexity

    results = {}
    with tempfile.TemporaryDirectory(prefix="sq-placement-") as tmp:
        for mode in args.modes:
            out = Path(tmp) / mode
            smoothed_model(args.model, out, mode, QuantizeConfig(weights=args.weights, acts=args.acts))
            results[mode] = evaluate_perplexity(out, max_windows=args.windows)["perplexity"]
            if not args.json:
                print(f"{mode:22s} {results[mode]:.3f}", flush=True)
    if args.json:
        print(json.dumps({"weights": args.weights, "acts": args.acts, "windows": args.windows, "alpha": ALPHA,
                          "perplexity": results}))


if __name__ == "__main__":
    main()
