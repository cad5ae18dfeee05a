"""SmoothQuant (Xiao et al. 2023) with the scales folded into the model's weights (paper section 2).

Per linear group, with ``max|X_j|`` from calibration and ``max|W_j|`` the largest magnitude in row j (input
channel j) over all the group's weights:

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)        (paper Eq. 3, alpha = 0.5 by default)

For o_proj both maxima are first taken over the query heads that share a KV head, so the scale is one per KV
channel (see ``passes.smoothing``). Channels with a zero maximum keep scale 1. Groups are folded in
``FOLD_ORDER``, so after folding every group's smoothed input and weight maxima are balanced as Eq. 3 intends.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from mxonnx.config import QuantizeConfig
from mxonnx.passes.llama_structure import DecoderBlock
from mxonnx.passes.smoothing import BlockScales, choose_block_scales, fold_smoothing_scales, per_kv_channel, sane_scales
from mxonnx.stats import ActivationStats, group_key

DEFAULT_ALPHA = 0.5


def weight_row_max(weights: Sequence[np.ndarray]) -> np.ndarray:
    """``max|W_j|`` over the rows j of every weight of a group ([K])."""
    return np.max([np.abs(w).max(axis=1) for w in weights], axis=0)


def smoothquant_scale(block: DecoderBlock, group: str, stats: ActivationStats, alpha: float,
                      weights: Sequence[np.ndarray] | None = None) -> np.ndarray:
    """Eq. 3 for one group of the block (o_proj: one scale per KV channel), on ``weights`` (default: the group's
    current weights)."""
    if weights is None:
        weights = [linear.weight_array for linear in block.groups()[group]]
    x_max = stats.max_abs.astype(np.float64)
    w_max = weight_row_max(weights).astype(np.float64)
    if group == "o":
        x_max, w_max = per_kv_channel(x_max, block), per_kv_channel(w_max, block)
    with np.errstate(divide="ignore", invalid="ignore"):
        return sane_scales(x_max**alpha / w_max ** (1.0 - alpha))


def smoothquant_scales(block: DecoderBlock, stats: Mapping[str, ActivationStats], config: QuantizeConfig) -> BlockScales:
    """Eq. 3 for every group of ``block`` (alpha ``config.alpha``, default 0.5), each on the weights it has once the
    groups before it in ``FOLD_ORDER`` are folded; plain data, the model is not changed."""
    alpha = DEFAULT_ALPHA if config.alpha is None else config.alpha
    return choose_block_scales(block, lambda group, weights: smoothquant_scale(
        block, group, stats[group_key(block, group)], alpha, weights(group)))


def smoothquant(model: ir.Model, blocks: Sequence[DecoderBlock], stats: Mapping[str, ActivationStats],
                config: QuantizeConfig) -> ir.Model:
    """The pass: fold :func:`smoothquant_scales` into the norms and weights of ``blocks`` (in place; returned)."""
    return fold_smoothing_scales(model, blocks, {b.index: smoothquant_scales(b, stats, config) for b in blocks})
