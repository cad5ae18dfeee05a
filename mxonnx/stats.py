"""Calibration statistics as plain data: what :mod:`mxonnx.calibrate` measures and the passes read.

Every decoder block has four linear inputs, one per group of linears reading the same tensor, keyed
``layers.{i}.{group}`` (:func:`group_key`): ``qkv`` (attention norm output), ``o``, ``gate_up`` (MLP norm output)
and ``down``. For each, over the calibration tokens ``x_t [K]``:

    max_abs_j = max_t |x_tj|   (SmoothQuant, paper Eq. 3)      mean_abs_j = mean_t |x_tj|   (AWQ, paper Eq. 5)
    mean_sq_j = mean_t x_tj^2  (diag H / 2: the output-aware exponent choice of RTN and AWQ, issue 19)
    xtx = sum_t x_t^T x_t  (float64; the GPTQ Hessian is H = 2/n xtx, paper Eq. 7)

plus, on request, a sample of raw input rows (AWQ's search). No ONNX, no onnxruntime: arrays only (``xtx`` is
summed by :class:`mxonnx.gptq.HessianAccumulator`).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Iterable

import numpy as np

from mxonnx.gptq import HessianAccumulator

if TYPE_CHECKING:
    from mxonnx.passes.llama_structure import DecoderBlock, Linear


@dataclasses.dataclass(frozen=True)
class ActivationStats:
    """Per-channel statistics of one linear input ``x [tokens, K]``."""

    max_abs: np.ndarray  # [K] float32
    mean_abs: np.ndarray  # [K] float32
    count: int  # tokens seen
    xtx: np.ndarray | None = None  # [K, K] float64, sum_t x_t^T x_t
    sample: np.ndarray | None = None  # [n, K] float32 rows drawn at random from the calibration tokens
    mean_sq: np.ndarray | None = None  # [K] float64, mean_t x_tj^2 (on request)

    @property
    def hessian(self) -> np.ndarray:
        """GPTQ's ``H = 2/n sum_t x_t^T x_t`` (paper Eq. 7)."""
        if self.xtx is None:
            raise ValueError("statistics were collected without hessians=True")
        return self.xtx * (2.0 / self.count)


class StatsAccumulator:
    """Running reductions of one linear input, fed one window ``x [tokens, K]`` at a time."""

    def __init__(self, k: int, hessian: bool = False, sample: bool = False, squares: bool = False):
        """``squares``: also ``mean_sq`` (only the exponent choice without GPTQ reads it)."""
        self.max_abs = np.zeros(k, np.float32)
        self.sum_abs = np.zeros(k, np.float64)
        self.sum_sq = np.zeros(k, np.float64) if squares else None
        self.count = 0
        self.gram = HessianAccumulator(k) if hessian else None
        self.rows: list[np.ndarray] | None = [] if sample else None

    def add(self, x: np.ndarray, rows: np.ndarray | None = None) -> None:
        """One window's inputs; ``rows``: indices of its tokens to keep in the sample."""
        magnitude = np.abs(x)
        np.maximum(self.max_abs, magnitude.max(axis=0), out=self.max_abs)
        self.sum_abs += magnitude.sum(axis=0, dtype=np.float64)
        if self.sum_sq is not None:
            self.sum_sq += np.einsum("tk,tk->k", x, x, dtype=np.float64)
        self.count += x.shape[0]
        if self.rows is not None and rows is not None and len(rows):
            self.rows.append(np.array(x[rows], np.float32))
        if self.gram is not None:
            self.gram.add_batch(x)

    def result(self) -> ActivationStats:
        mean_abs = (self.sum_abs / max(self.count, 1)).astype(np.float32)
        sample = None if self.rows is None else (
            np.concatenate(self.rows) if self.rows else np.zeros((0, len(self.max_abs)), np.float32))
        xtx = self.gram.xtx if self.gram is not None else None
        mean_sq = None if self.sum_sq is None else self.sum_sq / max(self.count, 1)
        return ActivationStats(self.max_abs, mean_abs, self.count, xtx, sample, mean_sq)


def group_key(block: DecoderBlock, group: str) -> str:
    """``layers.{i}.{group}``: the key of a linear group's statistics (and of its GPTQ Hessian)."""
    return f"layers.{block.index}.{group}"


def linear_groups(blocks: Iterable[DecoderBlock]) -> dict[str, list[Linear]]:
    """The linears of every decoder block grouped by shared input, keyed by ``group_key``."""
    return {group_key(b, group): linears for b in blocks for group, linears in b.groups().items()}
