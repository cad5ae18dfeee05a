"""The GPTQ stage of ``mxonnx quantize`` (methods ``gptq``, ``sq+gptq``, ``awq+gptq``; project issue 7).

It runs on the model as it is when the stage starts (after any SmoothQuant/AWQ folding), one decoder block at a
time through :class:`mxonnx.blockwise.BlockwiseRunner`, and rewrites every block's linears with GPTQ weights
(paper Algorithm 1, :mod:`mxonnx.gptq`) and quantized activations (``MxMatMulPass``). For block ``i``:

1. capture the inputs ``x [tokens, K]`` of its four linear groups (``qkv``, ``o``, ``gate_up``, ``down``) and
   accumulate ``H = 2/n sum_t a_t^T a_t`` (paper Eq. 7) on the activations as the quantized MatMul will see them,
   ``a = quantize_dequantize(x, acts, axis=-1)`` (``a = x`` for ``--acts none``; for static ``int8`` acts, the
   per-channel scales of the float model's inputs as folded, the same the rewritten graph holds); q/k/v share
   one Hessian, as do gate/up;
2. GPTQ-quantize its seven weights and rewrite the block.

*Sequential* (the default, as in the GPTQ reference's ``llama_sequential``): block ``i``'s inputs come from blocks
``0..i-1`` already rewritten (weights and activations quantized), so each block's GPTQ also corrects the error
that reaches it. *Non-sequential*: every block's inputs come from the float blocks before it (the runner advances
through block ``i`` before it is rewritten). Both keep only one block's Hessians in memory.

Calibration windows are :func:`mxonnx.calibrate.calibration_windows` of ``config`` (the tokens SmoothQuant and AWQ
calibrate on). At least as many tokens as the largest linear input width ``K`` are required: with fewer, ``X^T X``
has rank below ``K`` and GPTQ would fit its corrections to fewer directions than the weight has.

lm_head, when ``config.quantize_lm_head`` asks for it, is rounded to nearest (the runner stops at the residual
stream entering the final norm, so there is no Hessian for it).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from mxonnx import formats
from mxonnx.blockwise import BlockwiseRunner
from mxonnx.calibrate import calibration_windows, group_key, load_tokenizer
from mxonnx.config import QuantizeConfig, default_calib_text
from mxonnx.errors import InputError
from mxonnx.gptq import GptqWeightProvider, HessianAccumulator, check_blocks
from mxonnx.passes.llama_structure import DecoderBlock, find_decoder_blocks, find_lm_head
from mxonnx.passes.mx_matmul import MxMatMulPass, RoundToNearest, require_static_scales


def check_gptq_config(config: QuantizeConfig) -> None:
    """Refuse GPTQ settings that cannot work, before anything is loaded: weights ``none``, a micro-block that is not
    a multiple of the weight format's block, a bad block size or dampening."""
    weights = formats.parse_format(config.weights)
    if weights.kind == "none":
        raise InputError(f"method {config.method} quantizes weights with GPTQ; --weights none leaves nothing to do")
    check_blocks(weights, config.gptq_block, config.gptq_micro_block)
    if not (math.isfinite(config.damp) and config.damp >= 0):
        raise InputError(f"GPTQ dampening must be a finite number >= 0, got {config.damp}")


def min_calibration_tokens(blocks: Sequence[DecoderBlock]) -> int:
    """The fewest calibration tokens GPTQ accepts: the largest input width K of the blocks' linears."""
    return max(linear.shape[0] for block in blocks for linear in block.linears())


def check_calibration_size(blocks: Sequence[DecoderBlock], config: QuantizeConfig) -> None:
    """Refuse ``calib_samples x calib_seqlen`` below :func:`min_calibration_tokens` (a rank-deficient Hessian)."""
    tokens, needed = config.calib_samples * config.calib_seqlen, min_calibration_tokens(blocks)
    if tokens < needed:
        raise InputError(f"GPTQ needs at least {needed} calibration tokens (the widest linear input), got "
                         f"{config.calib_samples} x {config.calib_seqlen} = {tokens}; raise --calib-samples or --calib-seqlen")


def block_hessians(runner: BlockwiseRunner, block: DecoderBlock, acts: formats.MXFormat,
                   advance: bool = False, act_scales: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """``{group_key: 2/n A^T A}`` for the four linear groups of ``block``, over every calibration window, with
    ``A`` the group's input quantize-dequantized to ``acts`` (the activations the rewritten MatMul reads; both
    ``A`` and ``A^T A`` computed in onnxruntime, summed here in float64); ``advance``: the same run moves the runner
    past the block (:meth:`BlockwiseRunner.capture`); ``act_scales``: static int8 scales by linear name."""
    groups = block.groups()
    accumulators = {group: HessianAccumulator(linears[0].shape[0]) for group, linears in groups.items()}
    group_scales = ({group: act_scales[linears[0].name] for group, linears in groups.items()}
                    if acts.kind == "int" else None)
    runner.capture_grams(block.index, acts, lambda group, xtx, rows: accumulators[group].add_gram(xtx, rows),
                         advance=advance, group_scales=group_scales)
    return {group_key(block, group): acc.hessian for group, acc in accumulators.items()}


def gptq_rewrite(model: ir.Model, tokenizer_folder: str | os.PathLike | None, config: QuantizeConfig,
                 threads: int | None = None, act_scales: Mapping[str, np.ndarray] | None = None) -> ir.Model:
    """Rewrite every decoder block of ``model`` (in place; also returned) with GPTQ weights in ``config.weights``
    and activations in ``config.acts``, calibrated on ``config``'s windows (tokenized with the tokenizer of
    ``tokenizer_folder``), sequentially or not as ``config.sequential`` says. ``threads``: onnxruntime threads;
    ``act_scales``: for static ``int8`` activations, their scales by linear name (:func:`static_activation_scales`).
    Hessians that needed more dampening are reported by :class:`mxonnx.gptq.HessianDampingWarning` (one per group)."""
    from tqdm.auto import tqdm

    check_gptq_config(config)
    weights, acts = formats.parse_format(config.weights), formats.parse_format(config.acts)
    blocks = find_decoder_blocks(model)
    require_static_scales(acts, [linear for block in blocks for linear in block.linears()], act_scales)
    check_calibration_size(blocks, config)
    lm_head = find_lm_head(model, blocks) if config.quantize_lm_head else None
    windows = calibration_windows(config.calib_path or default_calib_text(), load_tokenizer(tokenizer_folder),
                                  config.calib_samples, config.calib_seqlen, config.seed)
    runner = BlockwiseRunner(model, blocks, windows, progress=config.progress, threads=threads)
    for block in tqdm(blocks, desc="gptq", unit="block", disable=not config.progress, leave=False):
        last = block.index == len(blocks) - 1
        # non-sequential: the same run gives the next block's inputs from this block in float
        hessians = block_hessians(runner, block, acts, advance=not config.sequential and not last,
                                  act_scales=act_scales)
        provider = GptqWeightProvider(hessians, weights, block_size=config.gptq_block,
                                      micro_block=config.gptq_micro_block, damp=config.damp,
                                      act_order=config.act_order)
        MxMatMulPass(block.linears(), weights, acts, provider, act_scales)(model)
        if config.sequential and not last:
            runner.advance(block.index)  # the next block's inputs from this block quantized
    if lm_head is not None:
        MxMatMulPass([lm_head], weights, acts, RoundToNearest(weights))(model)
    return model
