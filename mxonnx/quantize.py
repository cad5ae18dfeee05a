"""``mxonnx quantize``: an ONNX Llama folder -> an MX-quantized ONNX folder, one decoder block at a time.

The driver, for every method, in the spirit of the GPTQ reference's sequential loop. For block ``i``:

1. **statistics** (``sq``, ``awq`` and their ``+gptq``, static ``int8`` acts): one run of block ``i`` over the
   calibration windows on its inputs, the outputs of blocks ``0..i-1`` as already quantized
   (:func:`mxonnx.calibrate.block_statistics`);
2. **smoothing**: SmoothQuant (Eq. 3) or AWQ (Eq. 5, alpha searched) scales chosen as plain data and folded into
   block ``i``'s RMSNorm weights and v_proj/up_proj columns (:mod:`mxonnx.passes.smoothing`);
3. **activation ranges** for static ``int8``: the statistics' peaks divided by the row scales just folded;
4. **weights**: GPTQ (``*gptq``; Hessians from a second run of block ``i``, now folded, with its activations
   quantized as the rewritten graph will: :func:`mxonnx.calibrate.block_hessians`; paper Algorithm 1) or round
   to nearest. With ``--gptq-float-target`` GPTQ aims at the float model's output instead of the block's own on
   the quantized prefix: a second stream of hidden states runs the float model beside it, the cross-grams
   ``A^T X`` of its inputs (:func:`mxonnx.calibrate.block_cross_grams`) give the weights GPTQ approaches
   (:func:`mxonnx.gptq.float_target_weights`);
5. **rewrite** block ``i``'s seven MatMuls (``MxMatMulPass``), then **persist** its new tensors to the work folder
   (:mod:`mxonnx.workdir`): they leave memory, and the block counts as finished;
6. **advance** the calibration hidden states through the quantized block.

``--kv FORMAT`` quantizes the keys and values entering the KV cache (:mod:`mxonnx.passes.kv_cache`). In a sequential
run its quantizers go into the graph before the first block is calibrated, so every block's statistics and Hessians
(o_proj reads the attention of quantized keys and values; later blocks the hidden states they give) are those of
the model as it will run; ``--no-sequential`` (and ``kv_in_calibration=False``) adds them after the linears.

Formats are per linear (:class:`BlockPlan`): ``--weights``/``--acts`` for all, then the ``--override`` globs
(:mod:`mxonnx.layer_formats`), then, with ``--target-bits``, the allocation (:mod:`mxonnx.allocate`) chosen
before step 1 of block 0 from one pass over the float model's blocks (stored in the work folder, so a resumed
run keeps it). Every step takes each linear's own formats.

``--float-statistics`` takes step 1 on the float model's inputs (a second stream of hidden states, moved through
each block before it changes) while GPTQ's Hessians stay on the quantized prefix's.
``--no-sequential`` takes every block's statistics and Hessians on the float model's inputs instead (the runner
advances through block ``i`` before it is rewritten). Round to nearest with MX or no activations needs no
calibration. lm_head, when quantized (``--lm-head``), is rounded to nearest at the end. Memory holds one block's
float weights, statistics and Hessians, one set of hidden states (``calib_samples x calib_seqlen x hidden``
float32; two with ``--gptq-float-target`` or ``--float-statistics``) and the model's graph, whatever the depth.
OUT is written whole or not at all; a killed run continues with ``--resume`` from its last finished block and gives
the same bytes; the input is only read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import resource
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir

from mxonnx import formats
from mxonnx.allocate import Allocation, choose_formats, measure_losses, stored_bits
from mxonnx.blockwise import BlockwiseRunner
from mxonnx.calibrate import block_cross_grams, block_hessians, block_statistics, config_windows, sample_rows
from mxonnx.config import (LM_HEAD_AUTO, LM_HEAD_DECODER, METHODS, PRESCALE_SEARCH, QuantizeConfig,
                           default_calib_text)
from mxonnx.errors import InputError
from mxonnx.gptq import ExponentChoiceRounding, GptqWeightProvider, check_blocks, float_target_weights
from mxonnx.genai_config import GenaiUnsupportedError, write_mx_genai_config
from mxonnx.layer_formats import LinearFormat, matches, parse_override, resolve_formats
from mxonnx.modelio import EXTERNAL_DATA_NAME, ONNX_NAME, ModelPaths, copy_model_assets, resolve_model
from mxonnx.passes.awq import SAMPLE_TOKENS, awq_block_scales, record_alphas
from mxonnx.passes.kv_cache import KvCachePass, check_kv_format
from mxonnx.passes.llama_structure import DecoderBlock, Linear, find_decoder_blocks, find_lm_head
from mxonnx.passes.mx_matmul import (
    MxMatMulPass, RoundToNearest, check_activation_format, static_activation_scales)
from mxonnx.passes.rotation import ROTATION_METADATA, block_rotation, rotation_block
from mxonnx.passes.smoothing import BlockScales, fold_smoothing_scales, folded_rows
from mxonnx.passes.smoothquant import smoothquant_scales
from mxonnx.prescale import (
    apply_prescales, check_candidates, check_prescale, choose_act_prescale, choose_weight_prescale)
from mxonnx.sensitivity import context_divergences, linear_divergences, probe_windows, scaled_losses
from mxonnx.stats import ActivationStats, group_key
from mxonnx.workdir import WorkFolder, resumable_output_dir

AVAILABLE_METHODS = METHODS


def check_gptq_config(config: QuantizeConfig) -> None:
    """Refuse GPTQ settings that cannot work, before anything is loaded: weights ``none`` (with no override or
    target that quantizes some), a micro-block that is not a multiple of a weight format's block, a bad block size
    or dampening."""
    weights = formats.parse_format(config.weights)
    if weights.kind == "none" and not config.overrides and config.target_bits is None:
        raise InputError(f"method {config.method} quantizes weights with GPTQ; --weights none leaves nothing to do")
    for fmt in weight_formats_named(config):
        if fmt.kind != "none":
            check_blocks(fmt, config.gptq_block, config.gptq_micro_block)
    if not (math.isfinite(config.damp) and config.damp >= 0):
        raise InputError(f"GPTQ dampening must be a finite number >= 0, got {config.damp}")


def weight_formats_named(config: QuantizeConfig) -> list[formats.MXFormat]:
    """Every weight format the settings name: ``--weights``, the overrides' and (with ``--target-bits``) the
    candidates."""
    named = [config.weights, *(o.weights for o in map(parse_override, config.overrides))]
    if config.target_bits is not None:
        named += list(config.candidates)
    return list(dict.fromkeys(formats.parse_format(f) for f in named))


def check_target_bits(config: QuantizeConfig) -> None:
    """``--target-bits`` must be a positive number and the candidates quantized weight formats."""
    if config.target_bits is None:
        return
    if not (math.isfinite(config.target_bits) and config.target_bits > 0):
        raise InputError(f"--target-bits must be a positive number of bits per weight, got {config.target_bits}")
    if not config.candidates:
        raise InputError("--candidates is empty: --target-bits needs at least one weight format to choose from")
    for name in config.candidates:
        if formats.parse_format(name).kind == "none":
            raise InputError("--candidates must be quantized weight formats, not 'none'")


def check_config(config: QuantizeConfig) -> None:
    """Refuse unknown formats (the error lists the valid ones), bad overrides, unsupported combinations and
    methods early (the overrides' patterns are matched once the model's linears are known:
    :func:`check_linear_formats`)."""
    weights = formats.parse_format(config.weights)
    acts = formats.parse_format(config.acts)
    check_activation_format(acts)
    kv = check_kv_format(config.kv)
    check_lm_head_setting(config)
    overrides = [parse_override(text) for text in config.linear_overrides]
    for override in overrides:
        if override.acts is not None:
            check_activation_format(override.acts)
    if acts.kind == "int" and config.lm_head_override == "" and not config.overrides:
        raise InputError(f"--lm-head weights (--quantize-lm-head) with {acts.name} activations is not supported: "
                         "only the decoder linears' inputs are calibrated")
    if (weights.kind == "none" and acts.kind == "none" and kv.kind == "none" and not overrides
            and config.target_bits is None and not config.rotate):
        raise InputError("weights, activations and KV cache are all 'none': nothing to quantize")
    if config.rotate_block is not None and not config.rotate:
        raise InputError("--rotate-block is the block of --rotate; add --rotate")
    if config.rotate:
        rotation_block(config)
    if config.exponent_search and not (weights.kind == "mx" or overrides or config.target_bits is not None):
        raise InputError("--exponent-search chooses the shared exponents of MX weights: use an MX weight format")
    if config.method not in AVAILABLE_METHODS:
        raise InputError(f"unknown method {config.method!r}; choose one of {', '.join(AVAILABLE_METHODS)}")
    check_prescale_config(config, weights, acts)
    check_target_bits(config)
    if config.uses_gptq:
        check_gptq_config(config)
    if config.true_sequential and not (config.uses_gptq and config.sequential):
        raise InputError("--true-sequential orders GPTQ's groups inside a block: use a GPTQ method without "
                         "--no-sequential")
    if config.float_statistics:
        if not (config.uses_smoothquant or config.uses_awq):
            raise InputError("--float-statistics takes SmoothQuant/AWQ's statistics on the float model: use sq, awq, "
                             "sq+gptq or awq+gptq")
        if not config.sequential:
            raise InputError("--float-statistics and --no-sequential: --no-sequential already takes every statistic "
                             "on the float model")
    if config.gptq_refine and not config.uses_gptq:
        raise InputError("--gptq-refine refines GPTQ's weights: use a GPTQ method (gptq, sq+gptq, awq+gptq)")
    if config.awq_search == "gptq" and not (config.uses_awq and config.uses_gptq):
        raise InputError("--awq-search gptq scores AWQ's alphas by GPTQ's error: use --method awq+gptq")
    if config.sensitivity == "context" and config.target_bits is None:
        raise InputError("--sensitivity is the loss of --target-bits' allocation; add --target-bits")
    if not (math.isfinite(config.float_target_damp) and config.float_target_damp > 0):
        raise InputError(f"--float-target-damp must be a finite number > 0, got {config.float_target_damp}")
    if config.gptq_float_target:
        if not config.uses_gptq:
            raise InputError("--gptq-float-target changes GPTQ's target: use a GPTQ method (gptq, sq+gptq, awq+gptq)")
        if not config.sequential:
            raise InputError("--gptq-float-target needs the sequential GPTQ (inputs from the quantized prefix), "
                             "not --no-sequential")
        if acts.kind == "int" or any(o.acts is not None and o.acts.kind == "int" for o in overrides):
            raise InputError("--gptq-float-target supports MX or float activations, not int8")
        if config.true_sequential:  # its float stream would run a block whose first groups are already rewritten
            raise InputError("--gptq-float-target and --true-sequential cannot be combined: the float model's stream "
                             "needs the block before any group of it is quantized")


def check_lm_head_setting(config: QuantizeConfig) -> None:
    """``--lm-head``: auto, none, weights, or a format (WEIGHTS/ACTS) as ``--override`` takes one."""
    if config.lm_head.strip().lower() in (LM_HEAD_AUTO, LM_HEAD_DECODER, "none"):
        return
    try:
        for name in config.lm_head.split("/", 1):
            formats.parse_format(name.strip())
    except InputError as error:
        raise InputError(f"--lm-head {config.lm_head!r}: {error}") from None


def check_prescale_config(config: QuantizeConfig, weights: formats.MXFormat, acts: formats.MXFormat) -> None:
    """``--weights-prescale`` / ``--acts-prescale``: valid values, and some MX format on their side."""
    check_prescale(config.weights_prescale, "--weights-prescale")
    check_prescale(config.acts_prescale, "--acts-prescale")
    if PRESCALE_SEARCH in (config.weights_prescale, config.acts_prescale):
        check_candidates(config.prescale_candidates)
    if config.weights_prescale is not None and not (weights.kind == "mx" or config.overrides
                                                    or config.target_bits is not None):
        raise InputError(f"--weights-prescale applies to MX weight formats; --weights {weights.name} is not one")
    if config.acts_prescale is not None and not (acts.kind == "mx" or config.overrides):
        raise InputError(f"--acts-prescale applies to MX activation formats; --acts {acts.name} is not one")


def check_linear_formats(linear_formats: Mapping[str, LinearFormat], config: QuantizeConfig) -> None:
    """What the resolved per-linear formats must satisfy: something is quantized, GPTQ has a weight to work on,
    lm_head's input is not static int8 (it is not calibrated)."""
    if (not any(f.quantized for f in linear_formats.values()) and formats.parse_format(config.kv).kind == "none"
            and not config.rotate):
        raise InputError("every linear is left in float ('none' weights and activations): nothing to quantize")
    if config.uses_gptq and all(f.weights.kind == "none" for f in linear_formats.values()):
        raise InputError(f"method {config.method} quantizes weights with GPTQ; every linear's weights are 'none'")
    head = linear_formats.get("lm_head")
    if head is not None and head.acts.kind == "int":
        raise InputError(f"lm_head with {head.acts.name} activations is not supported: only the decoder linears' "
                         "inputs are calibrated")


def min_calibration_tokens(blocks: Sequence[DecoderBlock]) -> int:
    """The fewest calibration tokens GPTQ accepts: the largest input width K of the blocks' linears (with fewer,
    ``X^T X`` has rank below K and GPTQ would fit its corrections to fewer directions than the weight has)."""
    return max(linear.shape[0] for block in blocks for linear in block.linears())


def check_calibration_size(blocks: Sequence[DecoderBlock], config: QuantizeConfig) -> None:
    """Refuse ``calib_samples x calib_seqlen`` below :func:`min_calibration_tokens` (a rank-deficient Hessian)."""
    tokens, needed = config.calib_samples * config.calib_seqlen, min_calibration_tokens(blocks)
    if tokens < needed:
        raise InputError(f"GPTQ needs at least {needed} calibration tokens (the widest linear input), got "
                         f"{config.calib_samples} x {config.calib_seqlen} = {tokens}; raise --calib-samples or --calib-seqlen")


@dataclasses.dataclass(frozen=True)
class BlockPlan:
    """What the driver does to every block under ``config``: ``linear_formats`` gives each linear (decoder
    linears, and lm_head when quantized) its weight and activation formats (``--weights``/``--acts``, then
    ``--override``s and the ``--target-bits`` allocation); ``weights``/``acts`` are the run's defaults."""

    config: QuantizeConfig
    weights: formats.MXFormat
    acts: formats.MXFormat
    linear_formats: Mapping[str, LinearFormat]

    @classmethod
    def of(cls, config: QuantizeConfig, linear_formats: Mapping[str, LinearFormat] | None = None,
           names: Sequence[str] = ()) -> BlockPlan:
        """The plan of ``config``; ``linear_formats`` default: ``config``'s formats and overrides on ``names``."""
        if linear_formats is None:
            linear_formats = resolve_formats(names, config.weights, config.acts, config.linear_overrides)
        return cls(config, formats.parse_format(config.weights), formats.parse_format(config.acts),
                   dict(linear_formats))

    def weights_of(self, linears: Sequence[Linear]) -> dict[str, formats.MXFormat]:
        return {linear.name: self.linear_formats[linear.name].weights for linear in linears}

    def acts_of(self, linears: Sequence[Linear]) -> dict[str, formats.MXFormat]:
        return {linear.name: self.linear_formats[linear.name].acts for linear in linears}

    def pairs_of(self, block: DecoderBlock) -> dict[str, tuple[formats.MXFormat, formats.MXFormat]]:
        return {l.name: (self.linear_formats[l.name].weights, self.linear_formats[l.name].acts)
                for l in block.linears()}

    @property
    def static_acts(self) -> bool:
        return any(f.acts.kind == "int" for f in self.linear_formats.values())

    @property
    def smoothing(self) -> bool:
        return self.config.uses_smoothquant or self.config.uses_awq

    @property
    def needs_statistics(self) -> bool:
        return (self.smoothing or self.static_acts or self.config.searches_act_prescale
                or self.config.rounds_with_exponent_choice)

    @property
    def samples_rows(self) -> bool:
        """The statistics keep a sample of input rows: AWQ's search, the activation pre-scale search."""
        return self.awq_search or self.config.searches_act_prescale

    @property
    def calibrates(self) -> bool:
        return self.needs_statistics or self.config.uses_gptq or self.config.target_bits is not None

    @property
    def awq_search(self) -> bool:
        return self.config.uses_awq and self.config.alpha is None


@dataclasses.dataclass
class BlockResult:
    """What quantizing one block decided, as plain data: the smoothing scales folded, AWQ's alphas."""

    scales: BlockScales
    alphas: dict[str, float] | None = None
    prescales: dict[str, dict[str, float]] | None = None  # {"weights"|"acts": {linear name: p}}

    def record(self) -> dict | None:
        """The plain data the work folder keeps beside the block's tensors."""
        extra = {"alphas": self.alphas} if self.alphas else {}
        if self.prescales:
            extra["prescales"] = self.prescales
        return extra or None


def smoothing_scales(plan: BlockPlan, block: DecoderBlock, stats: Mapping[str, ActivationStats],
                     hessians: Mapping[str, np.ndarray] | None = None) -> tuple[BlockScales, dict[str, float] | None]:
    """The block's SmoothQuant or AWQ scales (and AWQ's alphas), or none; ``hessians`` (``--awq-search gptq``):
    the float Hessians of the groups' inputs AWQ's search runs GPTQ with."""
    if plan.config.uses_smoothquant:
        return smoothquant_scales(block, stats, plan.config), None
    if plan.config.uses_awq:
        return awq_block_scales(block, stats, plan.config, linear_formats=plan.pairs_of(block), hessians=hessians)
    return {}, None


def act_prescales(config: QuantizeConfig, block: DecoderBlock, acts: Mapping[str, formats.MXFormat],
                  stats: Mapping[str, ActivationStats] | None, folded: Mapping[str, np.ndarray]) -> dict[str, float]:
    """The activation pre-scale of each of the block's linears with MX activations: ``--acts-prescale P``, or with
    ``search`` one p per (input, format) from the input's calibration sample (divided by the row scales folded
    into it) and the float weights of the linears reading it (``mxonnx.prescale``)."""
    if config.acts_prescale is None:
        return {}
    if config.acts_prescale != PRESCALE_SEARCH:
        return {l.name: float(config.acts_prescale) for l in block.linears() if acts[l.name].kind == "mx"}
    chosen = {}
    for group, linears in block.groups().items():
        key = group_key(block, group)
        for name in dict.fromkeys(acts[l.name].name for l in linears if acts[l.name].kind == "mx"):
            readers = [l for l in linears if acts[l.name].name == name]
            x = stats[key].sample
            if key in folded:
                x = (x / folded[key]).astype(np.float32)
            p = choose_act_prescale(x, acts[readers[0].name], config.prescale_candidates,
                                    [np.asarray(l.weight_array, np.float32) for l in readers])
            chosen.update({l.name: p for l in readers})
    return chosen


def weight_prescales(config: QuantizeConfig, linears: Sequence[Linear], weights: Mapping[str, formats.MXFormat],
                     hessian_of=None) -> dict[str, float]:
    """The weight pre-scale of each linear with MX weights: ``--weights-prescale P``, or with ``search`` the
    candidate of least RTN error weighted by ``hessian_of(linear)`` (the GPTQ Hessian; None: plain error)."""
    if config.weights_prescale is None:
        return {}
    mx = [l for l in linears if weights[l.name].kind == "mx"]
    if config.weights_prescale != PRESCALE_SEARCH:
        return {l.name: float(config.weights_prescale) for l in mx}
    return {l.name: choose_weight_prescale(np.asarray(l.weight_array, np.float32), weights[l.name],
                                           config.prescale_candidates, hessian_of(l) if hessian_of else None)
            for l in mx}


def input_second_moments(block: DecoderBlock, stats: Mapping[str, ActivationStats],
                         folded: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per linear of ``block``, ``mean_t x_tj^2`` of its input as the rewritten graph feeds it (``x / r`` with ``r``
    the row scales folded into its group)."""
    moments = {}
    for group, linears in block.groups().items():
        key = group_key(block, group)
        m = stats[key].mean_sq
        if key in folded:
            m = m / np.square(np.asarray(folded[key], np.float64))
        moments.update({l.name: m for l in linears})
    return moments


def _hessian_key(block: DecoderBlock, hessians: Mapping[str, np.ndarray]):
    """linear -> the key of its Hessian in ``block_hessians``' result (its name, else its input group's key)."""
    group_of = {l.name: group for group, linears in block.groups().items() for l in linears}
    return lambda linear: linear.name if linear.name in hessians else group_key(block, group_of[linear.name])


def _hessian_lookup(block: DecoderBlock, hessians: Mapping[str, np.ndarray]):
    """linear -> its Hessian in ``block_hessians``' result (keyed by linear name or by input group)."""
    key = _hessian_key(block, hessians)
    return lambda linear: hessians.get(key(linear))


def float_targets(block: DecoderBlock, weights: Mapping[str, formats.MXFormat], hessians: Mapping[str, np.ndarray],
                  crosses: Mapping[str, np.ndarray], damp: float) -> dict[str, np.ndarray]:
    """``--gptq-float-target``: per quantized linear of ``block`` named in ``weights``, the weights GPTQ approaches
    so that its output matches the float model's (:func:`mxonnx.gptq.float_target_weights`), one solve per Hessian."""
    key = _hessian_key(block, hessians)
    by_key: dict[str, list[Linear]] = {}
    for linear in block.linears():
        if linear.name in weights and weights[linear.name].kind != "none":
            by_key.setdefault(key(linear), []).append(linear)
    targets = {}
    for key, linears in by_key.items():
        targets.update(float_target_weights({l.name: l.weight_array for l in linears}, hessians[key], crosses[key],
                                            damp))
    return targets


class TargetWeights:
    """A weight provider handing ``provider`` the weights ``targets[name]`` instead of the graph's (once each)."""

    def __init__(self, provider, targets: dict[str, np.ndarray]):
        self.provider, self.targets = provider, targets

    def __call__(self, name: str, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.provider(name, self.targets.pop(name, w))


def quantize_block(model: ir.Model, block: DecoderBlock, runner: BlockwiseRunner | None, plan: BlockPlan,
                   rows: list[np.ndarray] | None, last: bool,
                   float_states: list[np.ndarray] | None = None) -> BlockResult:
    """Steps 1-4 and the rewrite of the module docstring for one block (in place). Leaves the runner at the next
    block's inputs unless ``last``; ``float_states`` (``--gptq-float-target``: the block's inputs in the float
    model) are moved past the block in float."""
    config = plan.config
    advance_float = not config.sequential and not last  # non-sequential: the next inputs come from this block in float
    stats = None
    if plan.needs_statistics and config.float_statistics:  # on the float model's stream, moved past the block
        stats = block_statistics(runner, block, rows=rows, squares=config.rounds_with_exponent_choice,
                                 states=float_states, advance=not config.gptq_float_target)  # (or by the cross-grams)
    elif plan.needs_statistics:
        stats = block_statistics(runner, block, rows=rows, advance=advance_float and not config.uses_gptq,
                                 squares=config.rounds_with_exponent_choice)
    search_hessians = None
    if plan.smoothing and config.uses_awq and config.awq_search == "gptq" and config.alpha is None:
        search_hessians = block_hessians(runner, block, formats.parse_format("none"))  # one more run of the block
    scales, alphas = smoothing_scales(plan, block, stats, search_hessians) if plan.smoothing else ({}, None)
    del search_hessians
    if scales:
        fold_smoothing_scales(model, [block], {block.index: scales})
    folded = folded_rows(block, scales)
    act_scales = static_activation_scales(stats, [block], folded) if plan.static_acts else None
    weights, acts = plan.weights_of(block.linears()), plan.acts_of(block.linears())
    chosen = {"acts": act_prescales(config, block, acts, stats, folded)}
    acts = apply_prescales(acts, chosen["acts"])
    channel_weights = input_second_moments(block, stats, folded) if config.rounds_with_exponent_choice else None
    del stats
    if config.uses_gptq and any(f.kind != "none" for f in weights.values()):
        # one stage for the block, or (--true-sequential) one per linear group in graph order, each group's Hessians
        # taken with the groups before it already quantized
        stages = list(block.groups().values()) if config.true_sequential else [block.linears()]
        chosen["weights"] = {}
        for number, linears in enumerate(stages):
            final = number == len(stages) - 1
            crosses = block_cross_grams(runner, block, acts, float_states) if config.gptq_float_target else None
            hessians = block_hessians(runner, block, acts, advance=advance_float and final, act_scales=act_scales)
            key = _hessian_key(block, hessians)
            hessians = {key(linear): hessians[key(linear)] for linear in linears}  # this stage's only
            lookup = _hessian_lookup(block, hessians)
            targets = (float_targets(block, {l.name: weights[l.name] for l in linears}, hessians, crosses,
                                     config.float_target_damp) if crosses is not None else None)
            del crosses
            stage_prescales = weight_prescales(config, linears, weights, lookup)
            chosen["weights"].update(stage_prescales)
            stage_weights = apply_prescales({l.name: weights[l.name] for l in linears}, stage_prescales)
            provider = GptqWeightProvider(hessians, stage_weights, block_size=config.gptq_block,
                                          micro_block=config.gptq_micro_block, damp=config.damp,
                                          act_order=config.act_order, exponent_search=config.searches_exponents,
                                          refine_sweeps=config.gptq_refine, release=True)
            if targets is not None:
                provider = TargetWeights(provider, targets)
            del hessians, lookup  # the provider drops each one once factored
            MxMatMulPass(linears, stage_weights, {l.name: acts[l.name] for l in linears}, provider, act_scales)(model)
            del provider
    else:
        if float_states is not None and config.gptq_float_target:  # (--float-statistics moved it with its statistics)
            runner.advance_states(block.index, float_states)
        if advance_float and config.uses_gptq:  # GPTQ had no weight here: the Hessian run would have advanced
            runner.advance(block.index)
        chosen["weights"] = weight_prescales(config, block.linears(), weights)
        weights = apply_prescales(weights, chosen["weights"])
        provider = (RoundToNearest(weights) if channel_weights is None
                    else ExponentChoiceRounding(weights, channel_weights, damp=config.damp))
        MxMatMulPass(block.linears(), weights, acts, provider, act_scales)(model)
    if runner is not None and config.sequential and not last:
        runner.advance(block.index)  # the next block's inputs from this block quantized
    return BlockResult(scales, alphas, {side: p for side, p in chosen.items() if p} or None)


class PlaceholderWeights:
    """A weight provider giving all-zero codes of the right layout: replaying a finished block's rewrite only needs
    the graph it makes, its tensors are then read from the work folder."""

    def __init__(self, fmt: Mapping[str, formats.MXFormat]):
        self.fmt = fmt

    def __call__(self, name: str, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return formats.quantize(np.zeros_like(w), self.fmt[name], axis=0)


def replay_block(model: ir.Model, block: DecoderBlock, plan: BlockPlan, work: WorkFolder,
                 persisted: dict[int, object]) -> BlockResult:
    """Rebuild a block finished by an interrupted run: fold its stored scales, rewrite it with placeholder tensors
    and read its stored tensors in their place (the same graph and bytes as when it was quantized)."""
    record = work.records[block.index]
    scales = work.block_scales(block.index)
    if scales:
        fold_smoothing_scales(model, [block], {block.index: scales})
    act_scales = ({linear.name: np.ones(linear.shape[0], np.float32) for linear in block.linears()}
                  if plan.static_acts else None)
    prescales = record.get("prescales") or {}
    weights = apply_prescales(plan.weights_of(block.linears()), prescales.get("weights", {}))
    acts = apply_prescales(plan.acts_of(block.linears()), prescales.get("acts", {}))
    MxMatMulPass(block.linears(), weights, acts, PlaceholderWeights(weights), act_scales)(model)
    work.adopt_block(model, block.index, persisted)
    return BlockResult(scales, record.get("alphas"), prescales or None)


def run_fingerprint(paths: ModelPaths, config: QuantizeConfig) -> str:
    """What a resumed run must share with the interrupted one: every setting but progress bars, the input graph's
    bytes and the size and modification time of its folder's files and of the calibration text."""
    digest = hashlib.sha256()
    settings = {k: str(v) for k, v in dataclasses.asdict(config).items() if k != "progress"}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    digest.update(paths.onnx.read_bytes())
    files = sorted(p for p in paths.onnx.parent.iterdir() if p.is_file())
    calib = Path(config.calib_path or default_calib_text())
    for path in [*files, *([calib] if calib.is_file() else [])]:
        st = path.stat()
        digest.update(f"{path.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return digest.hexdigest()


def prescale_report(setting: float | str, chosen: Sequence[Mapping[str, Mapping[str, float]]], side: str):
    """``quantize``'s report of a pre-scale: the fixed p, or for ``search`` the chosen p per linear."""
    if setting != PRESCALE_SEARCH:
        return float(setting)
    return {name: p for block in chosen for name, p in block.get(side, {}).items()}


def override_targets(names: Sequence[str], config: QuantizeConfig) -> set[str]:
    """The linears some ``--override`` names (pinned: ``--target-bits`` leaves them as they are). A pattern that
    matches only an lm_head not being quantized gets its own error."""
    pinned: set[str] = set()
    for override in map(parse_override, config.overrides):
        hit = {name for name in names if matches(override.pattern, name)}
        if not hit and "lm_head" not in names and matches(override.pattern, "lm_head"):
            raise InputError(f"--override {override.text!r}: lm_head stays float in this run (--lm-head none, or "
                             "formats the default does not quantize it with): give it a format with --lm-head")
        pinned |= hit
    return pinned


@dataclasses.dataclass(frozen=True)
class BudgetProblem:
    """The linears ``--target-bits`` allocates (``shapes``) and the quantized weights it does not choose for
    (pinned by ``--override``, lm_head): their stored bits and weight count."""

    shapes: dict[str, tuple[int, int]]
    fixed_bits: int
    fixed_weights: int

    @classmethod
    def of(cls, linears: Sequence[Linear], linear_formats: Mapping[str, LinearFormat], pinned: set[str]) -> BudgetProblem:
        free = [l for l in linears if l.role != "lm_head" and l.name not in pinned]
        # lm_head is outside the budget, like the bits per weight the tables give (decoder linears)
        fixed = [l for l in linears if l not in free and l.role != "lm_head"
                 and linear_formats[l.name].weights.kind != "none"]
        if not free:
            raise InputError("--target-bits has no linear to choose a format for: --override fixes them all")
        return cls({l.name: l.shape for l in free},
                   sum(stored_bits(linear_formats[l.name].weights, *l.shape) for l in fixed),
                   sum(l.shape[0] * l.shape[1] for l in fixed))

    def check(self, config: QuantizeConfig) -> None:
        """Refuse a target below the cheapest candidate everywhere (before any calibration)."""
        choose_formats(config.target_bits, config.candidates, self.shapes,
                       {name: [0.0] * len(config.candidates) for name in self.shapes}, self.fixed_bits,
                       self.fixed_weights)


def context_base(config: QuantizeConfig, linear_formats: Mapping[str, LinearFormat],
                 problem: BudgetProblem) -> dict[str, formats.MXFormat]:
    """The point ``--sensitivity context`` measures around: every free linear in the candidate of most bits per
    weight within the target (the cheapest when none is), the others in their own weight formats."""
    cands = [formats.parse_format(c) for c in config.candidates]
    within = [c for c in cands if c.bits_per_weight <= config.target_bits * (1 + 1e-12)]
    centre = (max(within, key=lambda c: c.bits_per_weight) if within
              else min(cands, key=lambda c: c.bits_per_weight))
    return {name: centre if name in problem.shapes else lf.weights for name, lf in linear_formats.items()}


def allocate_formats(onnx_model: ir.Model, blocks: Sequence[DecoderBlock], windows: np.ndarray,
                     problem: BudgetProblem, config: QuantizeConfig,
                     linear_formats: Mapping[str, LinearFormat]) -> Allocation:
    """``--target-bits``: the allocation meeting the budget, of the least summed loss. ``--sensitivity share``: the
    Hessian-weighted RTN losses of every free linear under every candidate, measured in one pass over the float
    model's blocks (before any is changed), scaled per linear by the KL divergence of the model's output with it in
    the cheapest candidate (:func:`mxonnx.sensitivity.linear_divergences`). ``context``: each linear's KL per
    candidate with the others rounded at :func:`context_base` (:func:`mxonnx.sensitivity.context_divergences`)."""
    if config.sensitivity == "context":
        base = context_base(config, linear_formats, problem)
        losses = context_divergences(onnx_model, blocks, probe_windows(windows), base, config.candidates,
                                     list(problem.shapes), seed=config.seed, progress=config.progress)
        return choose_formats(config.target_bits, config.candidates, problem.shapes, losses, problem.fixed_bits,
                              problem.fixed_weights)
    runner = BlockwiseRunner(onnx_model, blocks, windows, progress=config.progress)
    losses = measure_losses(runner, blocks, list(problem.shapes), config.candidates, progress=config.progress)
    del runner
    probe = min(range(len(config.candidates)), key=lambda c: formats.bits_per_weight(config.candidates[c]))
    divergences = linear_divergences(onnx_model, blocks, probe_windows(windows), config.candidates[probe],
                                     list(problem.shapes), seed=config.seed, progress=config.progress)
    losses = scaled_losses(losses, divergences, probe)
    return choose_formats(config.target_bits, config.candidates, problem.shapes, losses, problem.fixed_bits,
                          problem.fixed_weights)


def quantize_model(model: Path, out: Path, config: QuantizeConfig, resume: bool = False) -> dict:
    """Quantize the ONNX Llama at ``model`` (folder or .onnx) into the new folder ``out`` (``model.onnx`` with
    its weights in ``model.onnx_data``, plus the config/tokenizer files); ``resume`` continues an interrupted run
    of the same settings. Returns ``{output, method, weights, acts, kv, seconds, peak_rss_mb, resumed_blocks}`` and,
    with ``--target-bits``, ``allocation`` (format per linear, achieved bits per weight)."""
    from tqdm.auto import tqdm

    start = time.perf_counter()
    check_config(config)
    paths = resolve_model(model)
    onnx_model = ir.load(paths.onnx)
    if config.rotate:  # before anything reads the weights: every later step sees the rotated float model
        onnx_model = block_rotation(onnx_model, config)
    blocks = find_decoder_blocks(onnx_model)
    kv_cache = KvCachePass(blocks, config.kv)  # refuses a block size not dividing head_dim before any work
    kv_first = config.sequential and config.kv_in_calibration
    lm_head = find_lm_head(onnx_model, blocks) if config.quantizes_lm_head else None
    linears = [linear for block in blocks for linear in block.linears()] + ([lm_head] if lm_head is not None else [])
    names = [linear.name for linear in linears]
    pinned = override_targets(names, config)
    linear_formats = resolve_formats(names, config.weights, config.acts, config.linear_overrides)
    problem = BudgetProblem.of(linears, linear_formats, pinned) if config.target_bits is not None else None
    if problem is not None:
        problem.check(config)
        first = formats.parse_format(config.candidates[0])  # any candidate: the checks do not depend on which
        check_linear_formats({**linear_formats, **{name: LinearFormat(first, linear_formats[name].acts)
                                                   for name in problem.shapes}}, config)
    else:
        check_linear_formats(linear_formats, config)
    if config.uses_gptq:  # before any calibration pass: a too small set fails at once
        check_calibration_size(blocks, config)
    plan = BlockPlan.of(config, linear_formats)
    if plan.calibrates and (paths.folder is None or not paths.folder.is_dir()):
        raise InputError("calibration needs the model folder with its tokenizer, not a bare .onnx file")
    with resumable_output_dir(out, run_fingerprint(paths, config), resume, paths.folder or paths.onnx) as work:
        persisted = {id(v.const_value): v.const_value for v in onnx_model.graph.initializers.values()}
        if kv_first:
            kv_cache(onnx_model)
        resumed = work.finished
        windows = config_windows(paths.folder, config) if plan.calibrates else None
        allocation = None
        if problem is not None:
            stored = work.plan()
            allocation = (Allocation.from_dict(stored) if stored is not None
                          else allocate_formats(onnx_model, blocks, windows, problem, config, linear_formats))
            if stored is None:
                work.save_plan(allocation.as_dict())
            linear_formats = {**linear_formats, **{name: LinearFormat(formats.parse_format(fmt), linear_formats[name].acts)
                                                   for name, fmt in allocation.formats.items()}}
            check_linear_formats(linear_formats, config)
            plan = BlockPlan.of(config, linear_formats)
        runner = rows = None
        if plan.calibrates and resumed < len(blocks):  # on the float graph: the runner reads every block's shapes
            rows = sample_rows(*windows.shape, SAMPLE_TOKENS, config.seed) if plan.samples_rows else None
            runner = BlockwiseRunner(onnx_model, blocks, windows, progress=config.progress)
        results = [replay_block(onnx_model, block, plan, work, persisted) for block in blocks[:resumed]]
        # --gptq-float-target, --float-statistics: the float model's stream beside the quantized prefix's, persisted
        # after it
        float_states = (list(runner.hidden_states) if runner is not None
                        and (config.gptq_float_target or config.float_statistics) else None)
        if runner is not None and resumed:
            hidden = work.hidden_states()
            if hidden is None:
                raise InputError(f"{work.path} holds no calibration hidden states to resume from; remove it and "
                                 "start again")
            if float_states is not None:
                float_states = [np.array(h) for h in hidden[len(hidden) // 2:]]
                hidden = hidden[: len(hidden) // 2]
            runner.restore(resumed, hidden)
            del hidden
        for block in tqdm(blocks[resumed:], desc=config.method, unit="block", disable=not config.progress,
                          leave=False, initial=resumed, total=len(blocks)):
            last = block.index == len(blocks) - 1
            result = quantize_block(onnx_model, block, runner, plan, rows, last, float_states)
            hidden = runner.hidden_states if runner is not None and not last else None
            if hidden is not None and float_states is not None:
                hidden = [*hidden, *float_states]
            work.persist_block(onnx_model, block.index, persisted, result.scales, result.record(), hidden)
            results.append(result)
        del runner, windows
        if not kv_first:
            kv_cache(onnx_model)
        if config.uses_awq:
            record_alphas(onnx_model, [r.alphas or {} for r in results])
        if lm_head is not None:
            head = plan.linear_formats[lm_head.name]
            head_weights, head_acts = {lm_head.name: head.weights}, {lm_head.name: head.acts}
            if config.lm_head.strip().lower() != LM_HEAD_AUTO:  # the default 8-bit lm_head takes no pre-scale
                head_weights = apply_prescales(head_weights, weight_prescales(config, [lm_head], head_weights))
                if config.acts_prescale not in (None, PRESCALE_SEARCH):  # not calibrated: a searched p stays 1
                    head_acts = apply_prescales(head_acts, {lm_head.name: float(config.acts_prescale)})
            MxMatMulPass([lm_head], head_weights, head_acts, RoundToNearest(head_weights))(onnx_model)
        ir.save(onnx_model, work.path / ONNX_NAME, external_data=EXTERNAL_DATA_NAME)
        copy_model_assets(paths.folder, work.path)
        try:
            write_mx_genai_config(work.path, ONNX_NAME)
        except GenaiUnsupportedError:  # no KV cache or no config.json: not a folder onnxruntime-genai runs
            pass
    result = {
        "output": str(out),
        "method": config.method,
        "weights": plan.weights.name,
        "acts": plan.acts.name,
        "kv": kv_cache.fmt.name,
        "lm_head": (f"{plan.linear_formats[lm_head.name].weights.name}/{plan.linear_formats[lm_head.name].acts.name}"
                    if lm_head is not None else "none"),
        "seconds": time.perf_counter() - start,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "resumed_blocks": resumed,
    }
    if config.rotate:
        result["rotation"] = json.loads(onnx_model.metadata_props[ROTATION_METADATA])
    for side, setting in (("weights", config.weights_prescale), ("acts", config.acts_prescale)):
        if setting is not None:
            result[f"{side}_prescale"] = prescale_report(setting, [r.prescales or {} for r in results], side)
    if config.overrides:
        result["overrides"] = list(config.overrides)
    if allocation is not None:
        result["allocation"] = allocation.as_dict()
    return result
