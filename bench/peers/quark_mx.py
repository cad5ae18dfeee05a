"""AMD Quark's ONNX quantizer (amd-quark 0.13) with its MX configurations; runs in ``bench/.venvs/quark``.

Scope as our W8A8 rows (shared/peers.md): only MatMuls with a constant B, lm_head excluded, MatMul outputs left
in float; weights and inputs of those MatMuls go through Quark's ``MXQuantizeDequantize`` (element type from
``--element``, block 32 along K, round half to even), optionally after Quark's SmoothQuant (alpha 0.5).
Prints one JSON object: the output path and the custom-op library the model needs at run time.

    python bench/peers/quark_mx.py SRC_FOLDER OUT_FOLDER --element int8|fp4_e2m1 --calib TOKENS.npz [--smoothquant]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import onnx

from feeds import WindowReader

LM_HEAD = "/lm_head/MatMul"
CONFIG_NAMES = {"int8": "MXINT8", "fp4_e2m1": "MXFP4E2M1"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--element", choices=sorted(CONFIG_NAMES), required=True)
    parser.add_argument("--calib", type=Path, required=True)
    parser.add_argument("--smoothquant", action="store_true")
    args = parser.parse_args()

    import torch  # noqa: F401  (loads libtorch, which Quark's op library links against)
    from quark.onnx import ModelQuantizer
    from quark.onnx.operators.custom_ops import get_library_path
    from quark.onnx.quantization.config.config import Config
    from quark.onnx.quantization.config.custom_config import get_default_config

    src = args.src / "model.onnx"
    inputs = [i.name for i in onnx.load(str(src), load_external_data=False).graph.input]
    config = get_default_config(CONFIG_NAMES[args.element])
    config.op_types_to_quantize = ["MatMul"]
    config.nodes_to_exclude = [LM_HEAD]
    config.include_cle = False
    config.include_sq = args.smoothquant
    config.use_external_data_format = True
    config.extra_options.update(MatMulConstBOnly=True, OpTypesToExcludeOutputQuantization=["MatMul"])
    if args.smoothquant:
        config.extra_options["SmoothAlpha"] = 0.5
    args.out.mkdir(parents=True, exist_ok=True)
    ModelQuantizer(Config(global_quant_config=config)).quantize_model(
        str(src), str(args.out / "model.onnx"), WindowReader(args.calib, args.src, inputs))
    print(json.dumps({"output": str(args.out), "custom_ops_library": get_library_path("CPU")}))


if __name__ == "__main__":
    main()
