"""The smoothing step of ``mxonnx quantize``: calibrate, then fold SmoothQuant (``sq``, ``sq+gptq``) or AWQ
(``awq``, ``awq+gptq``) scales into the weights. Other methods leave the model as it is."""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import onnx_ir as ir

from mxonnx.calibrate import ActivationStats, StreamedStatistics
from mxonnx.config import QuantizeConfig
from mxonnx.passes.awq import SAMPLE_TOKENS, awq
from mxonnx.passes.llama_structure import DecoderBlock
from mxonnx.passes.smoothquant import smoothquant


def smoothing_statistics(model: ir.Model, blocks: list[DecoderBlock], tokenizer_folder: str | os.PathLike | None,
                         config: QuantizeConfig, threads: int | None = None) -> StreamedStatistics:
    """The calibration statistics the method needs (AWQ's search also needs sampled inputs), computed block by
    block as :func:`apply_smoothing` reaches each block (one block's samples in memory at a time)."""
    search = config.uses_awq and config.alpha is None
    return StreamedStatistics(model, blocks, tokenizer_folder, config, sample_tokens=SAMPLE_TOKENS if search else 0,
                              keep_samples=False, threads=threads)


def apply_smoothing(model: ir.Model, blocks: Sequence[DecoderBlock], stats: Mapping[str, ActivationStats],
                    config: QuantizeConfig) -> ir.Model:
    """Fold the scales of ``config.method`` into ``model`` (in place; also returned)."""
    if config.uses_smoothquant:
        return smoothquant(model, blocks, stats, config)
    if config.uses_awq:
        return awq(model, blocks, stats, config)
    return model
