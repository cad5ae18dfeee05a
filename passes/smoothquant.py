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

from mxonnx.calibrate import ActivationStats, group_key
from mxonnx.config import QuantizeConfig
from mxonnx.passes.llama_structure import DecoderBlock
from mxonnx.passes.smoothing import SmoothingPass, per_kv_channel, sane_scales

DEFAULT_ALPHA = 0.5


def weight_row_max(block: DecoderBlock, group: str) -> np.ndarray:
    """``max|W_j|`` over the rows j of every weight of the group ([K])."""
    return np.max([np.abs(linear.weight_array).max(axis=1) for linear in block.groups()[group]], axis=0)


def smoothquant_scale(block: DecoderBlock, group: str, stats: ActivationStats, alpha: float) -> np.ndarray:
    """Eq. 3 for one group of the block, on its current weights (o_proj: one scale per KV channel)."""
    x_max = stats.max_abs.astype(np.float64)
    w_max = weight_row_max(block, group).astype(np.float64)
    if group == "o":
        x_max, w_max = per_kv_channel(x_max, block), per_kv_channel(w_max, block)
    with np.errstate(divide="ignore", invalid="ignore"):
        return sane_scales(x_max**alpha / w_max ** (1.0 - alpha))


def smoothquant(model: ir.Model, blocks: Sequence[DecoderBlock], stats: Mapping[str, ActivationStats],
                config: QuantizeConfig) -> ir.Model:
    """Fold SmoothQuant scales (alpha ``config.alpha``, default 0.5) into the norms and weights of ``blocks``."""
    alpha = DEFAULT_ALPHA if config.alpha is None else config.alpha

    def scale(block: DecoderBlock, group: str) -> np.ndarray:
        return smoothquant_scale(block, group, stats[group_key(block, group)], alpha)

    SmoothingPass(blocks, scale)(model)
    return model
