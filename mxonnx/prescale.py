"""Per-tensor choice of the MX element pre-scale p (``mxonnx.formats``; the 3/4 of arXiv 2601.09555).

Elements are taken from ``p * x / 2^E`` with the OCP exponent E, and the values are divided by p again, so
p < 1 trades a coarser grid for no clipping of the block maximum (MXFP4: ``x / 2^E`` in [4, 8) clips at 6 unless
p <= 3/4). ``mxonnx quantize --weights-prescale P`` / ``--acts-prescale P`` fix p for every MX weight / activation
quantizer; ``search`` chooses p per tensor among ``--prescale-candidates`` by the error that reaches the output:

- weights ``W [K, N]`` (round to nearest, the GPTQ proxy): ``tr(E^T H E)``, ``E = W - Q_p(W)``, with the Hessian
  ``H`` of the linear's input when the method has one (GPTQ, paper Eq. 7), else ``||E||^2``;
- activations, one p per quantized input (the linears reading it share their quantizer): from the calibration
  sample of the input rows ``X [n, K]`` (``mxonnx.stats``, after the smoothing scales folded into it),
  ``sum_l ||(X - Q_p(X)) W_l||^2`` over the float weights ``W_l`` of the linears reading it.

Ties go to the candidate listed first. Arrays only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from mxonnx import formats
from mxonnx.config import PRESCALE_SEARCH as SEARCH
from mxonnx.errors import InputError


def check_prescale(value: float | str | None, option: str) -> None:
    """A pre-scale setting: None, a number in (0.5, 1] or ``search``."""
    if value is None or value == SEARCH:
        return
    if isinstance(value, str):
        raise InputError(f"{option} {value!r} is neither a number in (0.5, 1] nor {SEARCH!r}")
    formats.with_prescale("mxfp4-32", value)  # the range check


def check_candidates(candidates: Sequence[float]) -> None:
    if not candidates:
        raise InputError("--prescale-candidates is empty")
    for p in candidates:
        formats.with_prescale("mxfp4-32", p)


def prescaled(fmt: formats.MXFormat, p: float) -> formats.MXFormat:
    """``fmt`` with pre-scale ``p`` when it is an MX format (others stay as they are)."""
    return formats.with_prescale(fmt, p) if fmt.kind == "mx" else fmt


def weight_error(w: np.ndarray, fmt: formats.MXFormat, hessian: np.ndarray | None) -> float:
    """``tr(E^T H E)`` (``||E||^2`` without ``H``) of round to nearest, ``E = W - Q(W)`` along axis 0."""
    e = w - formats.quantize_dequantize(w, fmt, axis=0)
    if hessian is None:
        return float(np.sum(np.square(e, dtype=np.float64)))
    return float(np.sum((hessian @ e) * e, dtype=np.float64))


def choose_weight_prescale(w: np.ndarray, fmt: formats.MXFormat, candidates: Sequence[float],
                           hessian: np.ndarray | None = None) -> float:
    """The candidate p of least :func:`weight_error` for the weight ``w [K, N]``."""
    h = None if hessian is None else np.asarray(hessian, np.float32)
    w = np.asarray(w, np.float32)
    errors = [weight_error(w, formats.with_prescale(fmt, p), h) for p in candidates]
    return float(np.float32(candidates[int(np.argmin(errors))]))


def activation_error(x: np.ndarray, fmt: formats.MXFormat, weights: Sequence[np.ndarray]) -> float:
    """``sum_l ||(X - Q(X)) W_l||^2``, X quantized along its last axis."""
    e = x - formats.quantize_dequantize(x, fmt, axis=-1)
    return float(sum(np.sum(np.square(e @ w, dtype=np.float64)) for w in weights))


def choose_act_prescale(x: np.ndarray, fmt: formats.MXFormat, candidates: Sequence[float],
                        weights: Sequence[np.ndarray]) -> float:
    """The candidate p of least :func:`activation_error` on the sample rows ``x [n, K]``."""
    if len(x) == 0:
        raise InputError("the activation pre-scale search has no calibration rows")
    x = np.asarray(x, np.float32)
    errors = [activation_error(x, formats.with_prescale(fmt, p), weights) for p in candidates]
    return float(np.float32(candidates[int(np.argmin(errors))]))


def apply_prescales(fmts: Mapping[str, formats.MXFormat], chosen: Mapping[str, float]) -> dict[str, formats.MXFormat]:
    """``fmts`` with the pre-scale ``chosen[name]`` on the MX formats it names."""
    return {name: prescaled(fmt, chosen[name]) if name in chosen else fmt for name, fmt in fmts.items()}
