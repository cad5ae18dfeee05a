"""Intel Neural Compressor for ONNX (``onnx-neural-compressor`` 1.0) weight-only int4: RTN, AWQ or GPTQ, symmetric,
one fp32 scale per group of 32 along K, written as ``MatMulNBits``; lm_head left in float (``quant_last_matmul``
off). Runs in ``bench/.venvs/inc`` (it requires numpy<2).

    python bench/peers/inc_weight_only.py SRC_FOLDER OUT_FOLDER --algo rtn|awq|gptq --calib TOKENS.npz
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import onnx

from feeds import WindowReader

GROUP = 32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--algo", choices=["rtn", "awq", "gptq"], required=True)
    parser.add_argument("--calib", type=Path, required=True)
    args = parser.parse_args()

    from onnx_neural_compressor.quantization import algorithm_entry, config

    src = str(args.src / "model.onnx")
    common = {"weight_bits": 4, "weight_group_size": GROUP, "weight_sym": True, "quant_last_matmul": False}
    if args.algo == "rtn":
        model = algorithm_entry.rtn_quantize_entry(src, config.RTNConfig(**common))
    else:
        inputs = [i.name for i in onnx.load(src, load_external_data=False).graph.input]
        reader = WindowReader(args.calib, args.src, inputs)
        entry, cfg = {"awq": (algorithm_entry.awq_quantize_entry, config.AWQConfig),
                      "gptq": (algorithm_entry.gptq_quantize_entry, config.GPTQConfig)}[args.algo]
        model = entry(src, cfg(**common), reader)
    args.out.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(args.out / "model.onnx"), save_as_external_data=True, location="model.onnx_data")
    print(json.dumps({"output": str(args.out)}))


if __name__ == "__main__":
    main()
