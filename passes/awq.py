"""AWQ (Lin et al. 2023) made MX-aware, with the scales folded into the model's weights (paper section 3).

Per linear group, with ``mean|X_j|`` from calibration (o_proj: averaged over the query heads sharing a KV head):

    s = mean|X|^alpha, normalised s <- s / sqrt(max(s) min(s))        (paper Eq. 5)

and alpha chosen on a grid in [0, 1] to minimise the group's output error on a sample of calibration inputs
``X`` with both weights and activations quantized in the run's formats (``Q_w`` along W's input axis 0,
``Q_a`` as the graph quantizes the activations: MX blocks along the last axis, or, for static ``int8``, the
per-channel scales the graph will hold, ``max_t |X_tj| / s_j / 127`` over the whole calibration set):

    err(alpha) = sum_{W in group} || Q_a(X diag(s)^-1) Q_w(diag(s) W) - X W ||^2

A fixed ``config.alpha`` skips the search. alpha = 0 gives s = 1 exactly, i.e. plain round-to-nearest.
"""

from __future__ import annotations

import json
from typing import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from mxonnx.config import QuantizeConfig
from mxonnx.errors import InputError
from mxonnx.formats import parse_format, quantize_dequantize, quantize_dequantize_with_scale
from mxonnx.passes.llama_structure import DecoderBlock
from mxonnx.passes.mx_matmul import static_int8_scales
from mxonnx.passes.smoothing import BlockScales, choose_block_scales, fold_smoothing_scales, per_kv_channel, row_scales
from mxonnx.stats import ActivationStats, group_key

GRID_POINTS = 20
SAMPLE_TOKENS = 512  # calibration input rows kept per group for the search
MEAN_FLOOR = 1e-5  # mean|X| is floored at this fraction of its largest channel before the power
ALPHA_METADATA = "mxonnx.awq_alpha"


def default_grid() -> np.ndarray:
    return np.linspace(0.0, 1.0, GRID_POINTS)


def awq_scales(mean_abs: np.ndarray, alpha: float) -> np.ndarray:
    """Eq. 5 with AWQ's normalisation: ``s = m^alpha / sqrt(max(m^alpha) min(m^alpha))``."""
    m = np.asarray(mean_abs, np.float64)
    s = np.maximum(m, MEAN_FLOOR * m.max()) ** alpha if m.max() > 0 else np.ones_like(m)
    return s / np.sqrt(s.max() * s.min())


def quantized_inputs(x: np.ndarray, rows: np.ndarray, acts_fmt, peak: np.ndarray | None = None) -> np.ndarray:
    """``Q_a(X / s)`` as the rewritten graph computes it: MX (or ``none``) along the last axis; static ``int8`` with
    the per-channel scales :func:`static_int8_scales` of the folded calibration peak ``peak / s`` (``peak``:
    ``max_t |X_tj|`` over the calibration set, required for ``int8``)."""
    xs, acts_fmt = (x / rows).astype(np.float32), parse_format(acts_fmt)
    if acts_fmt.kind != "int":
        return quantize_dequantize(xs, acts_fmt, axis=-1)
    if peak is None:
        raise ValueError("static int8 activations need the calibrated per-channel peak")
    return quantize_dequantize_with_scale(xs, static_int8_scales(np.asarray(peak, np.float64) / rows), acts_fmt)


def _per_weight(fmt, count: int) -> list:
    """One format per weight of a group: ``fmt`` repeated, or ``fmt`` itself when it is already a list of them."""
    return list(fmt) if isinstance(fmt, (list, tuple)) else [fmt] * count


def group_error(x: np.ndarray, weights: Sequence[np.ndarray], rows: np.ndarray, weights_fmt, acts_fmt,
                references: Sequence[np.ndarray] | None = None, peak: np.ndarray | None = None) -> float:
    """``sum_W ||Q_a(X / s) Q_w(s W) - X W||^2`` for row scales ``s`` (``Q_a``: :func:`quantized_inputs`, ``peak``
    its calibrated per-channel peak); ``references``: the float outputs ``X W`` when already computed (they do not
    depend on ``s``). ``weights_fmt``/``acts_fmt``: one format, or a list with one per weight (per-linear formats:
    each W with its own ``Q_w`` and ``Q_a``)."""
    weights_fmts, acts_fmts = _per_weight(weights_fmt, len(weights)), _per_weight(acts_fmt, len(weights))
    inputs = {parse_format(a): None for a in acts_fmts}
    for a in inputs:
        inputs[a] = quantized_inputs(x, rows, a, peak)
    if references is None:
        references = [x @ w for w in weights]
    error = 0.0
    for w, reference, w_fmt, a_fmt in zip(weights, references, weights_fmts, acts_fmts):
        wq = quantize_dequantize((w * rows[:, None]).astype(np.float32), w_fmt, axis=0)
        error += float(np.square(inputs[parse_format(a_fmt)] @ wq - reference, dtype=np.float64).sum())
    return error


def gptq_group_error(weights: Sequence[np.ndarray], rows: np.ndarray, hessian: np.ndarray, weights_fmt,
                     gptq: Mapping) -> float:
    """``sum_W tr(E^T H_s E)``, ``E = s W - GPTQ(s W; H_s)``, ``H_s = diag(s)^-1 H diag(s)^-1``: the output error
    (on the calibration inputs ``X``, ``H = 2/n X^T X``, float activations) of the group's weights scaled by the row
    scales ``s`` and then quantized by GPTQ (Algorithm 1) as the block's rewrite will, instead of rounded to nearest.
    ``gptq``: :func:`mxonnx.gptq.gptq_quantize`'s options (``damp``, ``act_order``, ``block_size``,
    ``micro_block``, ``exponent_search``: None for each format's default)."""
    from mxonnx.formats import dequantize
    from mxonnx.gptq import gptq_quantize, inverse_hessian_factor, searches_exponents_by_default

    r = np.asarray(rows, np.float64)
    h = np.asarray(hessian, np.float64) / np.outer(r, r)
    fmts = [parse_format(f) for f in _per_weight(weights_fmt, len(weights))]
    factors = {}
    error = 0.0
    for w, fmt in zip(weights, fmts):
        if fmt.kind == "none":
            continue
        unit = (fmt.block_size or 1) if gptq.get("act_order") else None
        if unit not in factors:
            factors[unit] = inverse_hessian_factor(h, gptq.get("damp", 0.01), order_unit=unit)
        scaled = (np.asarray(w, np.float64) * r[:, None]).astype(np.float32)
        search = gptq.get("exponent_search")
        codes, scales = gptq_quantize(scaled, factors[unit], fmt, block_size=gptq.get("block_size", 128),
                                      micro_block=gptq.get("micro_block"),
                                      exponent_search=searches_exponents_by_default(fmt) if search is None else search)
        e = scaled.astype(np.float64) - dequantize(codes, scales, fmt, axis=0)
        error += float(np.einsum("kn,kn->", h @ e, e))
    return error


def search_group(block: DecoderBlock, group: str, stats: ActivationStats, alphas: Sequence[float],
                 weights_fmt, acts_fmt, weights: Sequence[np.ndarray] | None = None,
                 hessian: np.ndarray | None = None, gptq: Mapping | None = None) -> tuple[np.ndarray, float]:
    """(scales, alpha) minimising ``group_error`` over ``alphas`` (o_proj: scales per KV channel), on ``weights``
    (default: the group's current weights); with the group input's float Hessian ``hessian`` and GPTQ's options
    ``gptq``, minimising :func:`gptq_group_error` instead (``--awq-search gptq``)."""
    mean_abs = per_kv_channel(stats.mean_abs, block, np.mean) if group == "o" else stats.mean_abs
    if len(alphas) == 1:
        return awq_scales(mean_abs, alphas[0]), float(alphas[0])
    if hessian is not None:
        if weights is None:
            weights = [linear.weight_array for linear in block.groups()[group]]
        errors = [gptq_group_error(weights, row_scales(group, awq_scales(mean_abs, a), block), hessian, weights_fmt,
                                   gptq or {}) for a in alphas]
        best = float(alphas[int(np.argmin(errors))])
        return awq_scales(mean_abs, best), best
    if stats.sample is None or not len(stats.sample):
        raise InputError("the AWQ search needs sampled calibration inputs (block_statistics(rows=...))")
    if weights is None:
        weights = [linear.weight_array for linear in block.groups()[group]]
    weights = [np.asarray(w, np.float32) for w in weights]
    x = stats.sample.astype(np.float32)
    references = [x @ w for w in weights]
    errors = [group_error(x, weights, row_scales(group, awq_scales(mean_abs, a), block), weights_fmt, acts_fmt,
                          references, stats.max_abs) for a in alphas]
    best = float(alphas[int(np.argmin(errors))])
    return awq_scales(mean_abs, best), best


def alpha_grid(config: QuantizeConfig, alphas: Sequence[float] | None = None) -> list[float]:
    """``[config.alpha]`` when fixed, else ``alphas`` (default: ``GRID_POINTS`` points from 0 to 1)."""
    return [config.alpha] if config.alpha is not None else list(default_grid() if alphas is None else alphas)


def awq_block_scales(block: DecoderBlock, stats: Mapping[str, ActivationStats], config: QuantizeConfig,
                     alphas: Sequence[float] | None = None,
                     linear_formats: Mapping[str, tuple] | None = None,
                     hessians: Mapping[str, np.ndarray] | None = None) -> tuple[BlockScales, dict[str, float]]:
    """AWQ's scales of every group of ``block`` and the alpha chosen for each (:func:`alpha_grid`), each searched
    on the weights the group has once the groups before it in ``FOLD_ORDER`` are folded; plain data, the model
    is not changed. ``linear_formats``: ``{linear name: (weights, acts)}`` when formats differ per linear
    (``--override``, ``--target-bits``), else ``config.weights``/``config.acts`` for all. ``hessians``: the float
    Hessians of the groups' inputs by group key (``--awq-search gptq``: alpha by :func:`gptq_group_error`)."""
    grid = alpha_grid(config, alphas)
    chosen: dict[str, float] = {}

    def formats_of(group: str) -> tuple[list, list]:
        linears = block.groups()[group]
        if linear_formats is None:
            return [parse_format(config.weights)] * len(linears), [parse_format(config.acts)] * len(linears)
        return ([parse_format(linear_formats[l.name][0]) for l in linears],
                [parse_format(linear_formats[l.name][1]) for l in linears])

    def choose(group: str, weights) -> np.ndarray:
        weights_fmt, acts_fmt = formats_of(group)
        key = group_key(block, group)
        gptq = dict(damp=config.damp, act_order=config.act_order, block_size=config.gptq_block,
                    micro_block=config.gptq_micro_block, exponent_search=config.searches_exponents)
        s, alpha = search_group(block, group, stats[key], grid, weights_fmt, acts_fmt, weights(group),
                                hessians.get(key) if hessians is not None else None, gptq)
        chosen[group] = round(alpha, 4)
        return s

    return choose_block_scales(block, choose), chosen


def record_alphas(model: ir.Model, alphas: Sequence[Mapping[str, float]]) -> None:
    """The alphas chosen per block (``[{group: alpha}, ...]``) as the model metadata ``mxonnx.awq_alpha`` (JSON)."""
    model.metadata_props[ALPHA_METADATA] = json.dumps([dict(a) for a in alphas])


def awq(model: ir.Model, blocks: Sequence[DecoderBlock], stats: Mapping[str, ActivationStats],
        config: QuantizeConfig, alphas: Sequence[float] | None = None) -> ir.Model:
    """The pass: fold :func:`awq_block_scales` into the norms and weights of ``blocks`` and record the chosen
    alphas (:func:`record_alphas`)."""
    found = {block.index: awq_block_scales(block, stats, config, alphas) for block in blocks}
    fold_smoothing_scales(model, blocks, {index: scales for index, (scales, _) in found.items()})
    record_alphas(model, [found[block.index][1] for block in blocks])
    return model
