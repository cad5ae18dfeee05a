"""onnxruntime's ``matmul_nbits_quantizer``: 4-bit weight-only ``MatMulNBits`` with one fp32 scale per block of
``--block`` weights along K, symmetric; RTN (its default quantizer) or its GPTQ with a calibration reader.
Runs in our own environment (onnxruntime 1.32). lm_head stays a float MatMul (its B is not an initializer).

    python bench/peers/ort_nbits.py SRC_FOLDER OUT_FOLDER --block 32|128 [--algo rtn|gptq --calib TOKENS.npz]
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import onnx
from onnxruntime.quantization.matmul_nbits_quantizer import (
    DefaultWeightOnlyQuantConfig,
    GPTQWeightOnlyQuantConfig,
    MatMulNBitsQuantizer,
)

from feeds import WindowReader


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--block", type=int, required=True)
    parser.add_argument("--algo", choices=["rtn", "gptq"], default="rtn")
    parser.add_argument("--calib", type=Path, help="token windows (.npz) for GPTQ")
    args = parser.parse_args()
    logging.disable(logging.INFO)  # one INFO line per node otherwise

    model = onnx.load(str(args.src / "model.onnx"))
    if args.algo == "gptq":
        if args.calib is None:
            parser.error("--algo gptq needs --calib")
        reader = WindowReader(args.calib, args.src, [i.name for i in model.graph.input])
        algo = GPTQWeightOnlyQuantConfig(calibration_data_reader=reader, block_size=128, percdamp=0.01)
    else:
        algo = DefaultWeightOnlyQuantConfig(block_size=args.block, is_symmetric=True, accuracy_level=0)
    quantizer = MatMulNBitsQuantizer(model, block_size=args.block, is_symmetric=True, accuracy_level=0,
                                     algo_config=algo)
    quantizer.process()
    args.out.mkdir(parents=True, exist_ok=True)
    quantizer.model.save_model_to_file(str(args.out / "model.onnx"), use_external_data_format=True)
    print(json.dumps({"output": str(args.out)}))


if __name__ == "__main__":
    main()
