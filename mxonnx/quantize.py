"""``mxonnx quantize``: an ONNX Llama folder -> an MX-quantized ONNX folder, as a sequence of stages

    check formats -> load -> [calibrate -> fold smoothing scales] -> [activation ranges] -> weight provider
    -> rewrite -> save

Round to nearest (``rtn``) needs no calibration; SmoothQuant/AWQ folding plugs in as the first bracketed stage;
static ``int8`` activations (the paper's fixed-point baseline) take their per-channel ranges from the float model
before any weight is quantized (second stage): from the smoothing calibration divided by the folded scales, or
from a calibration pass of their own without smoothing. The GPTQ methods replace "weight provider -> rewrite" by
``mxonnx.gptq_pipeline.gptq_rewrite``, which calibrates and rewrites one decoder block at a time. OUT is written
atomically (whole or absent); the input is only read.

Memory stays below twice the float model's size (SmolLM2-135M, ``awq+gptq``: 903 MB peak RSS for a 539 MB model):
the input's weights stay in its memory-mapped external data file and are unmapped after each read; folded
smoothing scales make lazy tensors (source x scales, computed when read) instead of copies; onnxruntime reads a
block's float weights from the file itself; only one set of calibration hidden states and the packed quantized
weights are held.
"""

from __future__ import annotations

import resource
import time
from pathlib import Path

import onnx_ir as ir

from mxonnx import formats
from mxonnx.calibrate import collect_statistics
from mxonnx.config import METHODS, QuantizeConfig
from mxonnx.errors import InputError
from mxonnx.gptq_pipeline import check_calibration_size, check_gptq_config, gptq_rewrite
from mxonnx.modelio import EXTERNAL_DATA_NAME, ONNX_NAME, atomic_output_dir, copy_model_assets, resolve_model
from mxonnx.passes.llama_structure import find_decoder_blocks
from mxonnx.passes.mx_matmul import (
    RoundToNearest, WeightProvider, check_activation_format, rewrite_mx_matmuls, static_activation_scales)
from mxonnx.passes.smooth import apply_smoothing, smoothing_statistics
from mxonnx.passes.smoothing import folded_row_scales

AVAILABLE_METHODS = METHODS


def check_config(config: QuantizeConfig) -> None:
    """Refuse unknown formats (the error lists the valid ones), unsupported combinations and methods early."""
    weights = formats.parse_format(config.weights)
    acts = formats.parse_format(config.acts)
    check_activation_format(acts)
    if acts.kind == "int" and config.quantize_lm_head:
        raise InputError(f"--quantize-lm-head with {acts.name} activations is not supported: only the decoder "
                         "linears' inputs are calibrated")
    if weights.kind == "none" and acts.kind == "none":
        raise InputError("weights and activations are both 'none': nothing to quantize")
    if config.method not in AVAILABLE_METHODS:
        raise InputError(f"unknown method {config.method!r}; choose one of {', '.join(AVAILABLE_METHODS)}")
    if config.uses_gptq:
        check_gptq_config(config)


def weight_provider(config: QuantizeConfig) -> WeightProvider:
    """The weight provider of ``config.method`` (round to nearest for ``rtn``)."""
    return RoundToNearest(config.weights)


def quantize_model(model: Path, out: Path, config: QuantizeConfig) -> dict:
    """Quantize the ONNX Llama at ``model`` (folder or .onnx) into the new folder ``out`` (``model.onnx`` with
    its weights in ``model.onnx_data``, plus the config/tokenizer files). Returns ``{output, method, weights, acts,
    seconds, peak_rss_mb}``."""
    start = time.perf_counter()
    check_config(config)
    paths = resolve_model(model)
    with atomic_output_dir(out, paths.folder or paths.onnx) as tmp:
        graph = ir.load(paths.onnx)
        smoothing = config.uses_smoothquant or config.uses_awq
        acts = formats.parse_format(config.acts)
        static_acts = acts.kind == "int"
        blocks = find_decoder_blocks(graph) if smoothing or static_acts or config.uses_gptq else []
        if config.uses_gptq:  # before any calibration pass: a too small set fails at once
            check_calibration_size(blocks, config)
        act_scales = None
        if smoothing:
            stats = smoothing_statistics(graph, blocks, paths.folder, config)
            apply_smoothing(graph, blocks, stats, config)
            if static_acts:  # the float model's input ranges divided by the scales folded since
                act_scales = static_activation_scales(stats, blocks, folded_row_scales(graph))
            del stats  # frees the calibration runner's hidden states before GPTQ makes its own
        elif static_acts:
            act_scales = static_activation_scales(collect_statistics(graph, blocks, paths.folder, config), blocks)
        if config.uses_gptq:
            gptq_rewrite(graph, paths.folder, config, act_scales=act_scales)
        else:
            rewrite_mx_matmuls(graph, config, weight_provider(config), act_scales)
        ir.save(graph, tmp / ONNX_NAME, external_data=EXTERNAL_DATA_NAME)
        copy_model_assets(paths.folder, tmp)
    return {
        "output": str(out),
        "method": config.method,
        "weights": formats.parse_format(config.weights).name,
        "acts": acts.name,
        "seconds": time.perf_counter() - start,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
