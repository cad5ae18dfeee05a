"""GPTQ for MX and fixed-point weight formats (Frantar et al. 2022; Sharify et al., arXiv 2405.07135, Algorithm 1).

Arrays only: no ONNX or model code. Weights are in the ONNX MatMul layout ``W [K, N]`` (K = reduction axis), so
the paper's column j of W (input channel j, all N output channels) is row ``w_j = W[j]`` here.

GPTQ minimises ``||X W - X Q||^2`` (paper Eq. 6) one input channel at a time. With the Hessian
``H = 2/n sum_t x_t x_t^T`` (Eq. 7), dampened by ``lambda = damp * mean(diag H)``, and ``U`` the upper Cholesky factor
of ``H^-1`` (``H^-1 = U^T U``), quantizing input channel ``j`` gives

    e_j = (w_j - quant(w_j)) / U_jj,        w_l -= U_jl e_j  for l > j          (Eq. 8, Cholesky form)

Channels go in blocks of ``B1`` whose error reaches the later channels lazily, ``W[i2:] -= U[i1:i2, i2:]^T E``.
Inside a block, micro-blocks of ``B2`` (a multiple of the MX block ``b``): when a micro-block is reached, the
scale of every group starting in it (MX: shared exponent per output channel and block of ``b`` input channels;
int{d}-g{b}: fp32 scale per group) is fixed from the error-updated weights of that moment, then its channels are
quantized one at a time with that scale. Per-channel int{d} fixes one scale per output channel from all of K
before any update, as reference GPTQ does. Algorithm 1 of the paper quantizes a micro-block at once; here its
channels are quantized one by one (each one's error also corrects the rest of its micro-block).
Results use ``mxonnx.formats.quantize(w, fmt, axis=0)``'s layout.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Callable, Mapping

import numpy as np

from mxonnx import formats
from mxonnx.errors import InputError

DAMP_RETRIES = 3  # after a failed Cholesky the dampening is raised 10x, at most this many times


class HessianDampingWarning(UserWarning):
    """A Hessian needed more dampening than asked for to be positive definite."""


class HessianAccumulator:
    """Running ``H = 2/n sum_t x_t x_t^T`` over the rows x_t of batches ``x [..., K]`` (paper Eq. 7), without
    keeping activations: each batch's ``x^T x`` is formed in float32 and summed in float64."""

    def __init__(self, k: int):
        self._xtx = np.zeros((k, k), np.float64)
        self.count = 0

    def add_batch(self, x: np.ndarray) -> None:
        k = self._xtx.shape[0]
        if x.shape[-1] != k:
            raise InputError(f"activation batch has {x.shape[-1]} channels, the Hessian expects {k}")
        rows = np.asarray(x, np.float32).reshape(-1, k)
        self.add_gram(rows.T @ rows, rows.shape[0])

    def add_gram(self, xtx: np.ndarray, rows: int) -> None:
        """Add a batch given as its ``x^T x [K, K]`` over ``rows`` rows (e.g. computed by onnxruntime)."""
        if xtx.shape != self._xtx.shape:
            raise InputError(f"Gram matrix of shape {xtx.shape}, the Hessian expects {self._xtx.shape}")
        self._xtx += xtx
        self.count += rows

    @property
    def xtx(self) -> np.ndarray:
        """The running sum X^T X, float64 [K, K]."""
        return self._xtx

    @property
    def hessian(self) -> np.ndarray:
        """2/n X^T X, float64 [K, K] (zeros before the first batch)."""
        return self._xtx * (2.0 / max(self.count, 1))


@dataclasses.dataclass(frozen=True)
class InverseHessianFactor:
    """What GPTQ needs from the Hessian of K input channels: ``upper``, the upper Cholesky factor of the dampened,
    column-permuted ``H^-1`` (float32); ``dead``, channels with ``H_ii = 0`` (their weights are zeroed); ``perm``,
    the quantization order; ``damp``, the dampening finally used."""

    upper: np.ndarray
    dead: np.ndarray
    perm: np.ndarray
    damp: float


def inverse_hessian_factor(hessian: np.ndarray, damp: float = 0.01, *, order_unit: int | None = None,
                           name: str = "weight") -> InverseHessianFactor:
    """Factor ``H + damp * mean(diag H) * I`` for GPTQ.

    Dead channels (``H_ii = 0``) get ``H_ii = 1``. ``order_unit`` (act-order): quantize the whole units of
    ``order_unit`` consecutive channels by decreasing sum of ``H_ii``, so MX blocks stay contiguous and aligned (a
    partial last unit stays last); None keeps the natural order. When a Cholesky fails the dampening is raised
    10x (up to ``DAMP_RETRIES`` times) with a ``HessianDampingWarning`` naming ``name``.
    """
    h = np.asarray(hessian, np.float64)
    if h.ndim != 2 or h.shape[0] != h.shape[1]:
        raise InputError(f"Hessian of {name} must be square, got shape {h.shape}")
    if not np.isfinite(h).all():
        raise InputError(f"Hessian of {name} holds NaN or Inf values")
    k = h.shape[0]
    diag = np.diagonal(h).copy()
    dead = diag == 0
    if dead.all():
        raise InputError(f"Hessian of {name} is all zero: no calibration data reached this input")
    diag[dead] = 1.0
    perm = np.arange(k) if order_unit is None else _act_order(diag, order_unit)
    h[np.arange(k), np.arange(k)] = diag
    h = h[np.ix_(perm, perm)]
    mean_diag = diag.mean()
    for attempt in range(DAMP_RETRIES + 1):
        damp_used = damp * 10.0**attempt
        upper = _inverse_cholesky_upper(h + damp_used * mean_diag * np.eye(k))
        if upper is not None:
            if attempt:
                warnings.warn(f"Hessian of {name} not positive definite; damp raised to {damp_used:g}",
                              HessianDampingWarning, stacklevel=2)
            return InverseHessianFactor(upper.astype(np.float32), dead, perm, damp_used)
    raise InputError(f"Hessian of {name} is not positive definite even with damp {damp_used:g}")


def _act_order(diag: np.ndarray, unit: int) -> np.ndarray:
    """Channel order putting whole units of ``unit`` consecutive channels with the largest sum of H_ii first; the
    channels after the last whole unit keep their place at the end."""
    whole = len(diag) // unit * unit
    units = np.argsort(-diag[:whole].reshape(-1, unit).sum(axis=1), kind="stable")
    return np.concatenate([(units[:, None] * unit + np.arange(unit)).reshape(-1), np.arange(whole, len(diag))])


def _inverse_cholesky_upper(h: np.ndarray) -> np.ndarray | None:
    """U upper triangular with ``h^-1 = U^T U``, or None when ``h`` (or its inverse) is not positive definite."""
    try:
        lower = np.linalg.cholesky(h)  # h = L L^T
        lower_inv = np.linalg.inv(lower)  # triangular like L
        return np.linalg.cholesky(lower_inv.T @ lower_inv).T  # h^-1 = L^-T L^-1 = U^T U
    except np.linalg.LinAlgError:
        return None


@dataclasses.dataclass(frozen=True)
class _Grid:
    """A format seen by GPTQ: one parameter (MX exponent or fp32 scale) per output channel and group of ``group``
    input channels; ``params(w [m, N]) -> [ceil(m / group), N]``; ``round(w_j [N], param [N])``."""

    group: int
    params: Callable[[np.ndarray], np.ndarray]
    round: Callable[[np.ndarray, np.ndarray], np.ndarray]


def _grid(fmt: formats.MXFormat, k: int) -> _Grid:
    if fmt.kind == "mx":
        return _Grid(fmt.block_size, lambda w: formats.shared_exponents(w, fmt, axis=0),
                     lambda w_j, e: formats.quantize_dequantize_with_exponent(w_j, e, fmt))
    return _Grid(fmt.block_size or k, lambda w: formats.fixed_point_scales(w, fmt, axis=0),
                 lambda w_j, s: formats.quantize_dequantize_with_scale(w_j, s, fmt))


def _gptq(w: np.ndarray, upper: np.ndarray, grid: _Grid, block: int, micro: int) -> tuple[np.ndarray, np.ndarray]:
    """Algorithm 1 on ``w [K, N]`` (float32, updated in place) with ``upper`` the Cholesky factor of H^-1.
    ``block`` (B1) is a multiple of ``micro`` (B2), a multiple of ``grid.group`` unless that spans all of K.
    Returns (Q [K, N] float32, parameters [ceil(K / group), N])."""
    k, n = w.shape
    q = np.empty_like(w)
    params = None
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1, u1 = w[i1:i2], upper[i1:i2, i1:i2]
        err1 = np.empty((i2 - i1, n), np.float32)
        for j1 in range(0, i2 - i1, micro):
            j2 = min(j1 + micro, i2 - i1)
            g1, g2 = -(-(i1 + j1) // grid.group), -(-(i1 + j2) // grid.group)  # groups starting here
            if g2 > g1:
                fresh = grid.params(w[g1 * grid.group: g2 * grid.group])
                if params is None:
                    params = np.empty((-(-k // grid.group), n), fresh.dtype)
                params[g1:g2] = fresh
            for j in range(j1, j2):
                q[i1 + j] = grid.round(w1[j], params[(i1 + j) // grid.group])
                np.divide(w1[j] - q[i1 + j], u1[j, j], out=err1[j])
                w1[j + 1:] -= u1[j, j + 1:, None] * err1[j]
        w[i2:] -= upper[i1:i2, i2:].T @ err1
    return q, params


def check_blocks(fmt: formats.MXFormat, block_size: int, micro_block: int | None) -> tuple[int, int]:
    """(B1, B2): B2 defaults to the format's block (B1 for per-channel int) and must be a multiple of it; B1 is
    rounded up to a multiple of B2."""
    if not isinstance(block_size, int) or block_size < 1:
        raise InputError(f"GPTQ block size must be a positive integer, got {block_size!r}")
    group = fmt.block_size
    micro = micro_block if micro_block is not None else group or block_size
    if not isinstance(micro, int) or micro < 1:
        raise InputError(f"GPTQ micro-block size must be a positive integer, got {micro!r}")
    if group and micro % group:
        raise InputError(f"GPTQ micro-block {micro} is not a multiple of the block size {group} of {fmt.name}")
    return -(-block_size // micro) * micro, micro


def gptq_quantize(w: np.ndarray, hessian: np.ndarray | InverseHessianFactor, fmt: str | formats.MXFormat, *,
                  block_size: int = 128, micro_block: int | None = None, damp: float = 0.01, act_order: bool = False,
                  name: str = "weight") -> tuple[np.ndarray, np.ndarray]:
    """GPTQ-quantize ``w [K, N]`` given the Hessian ``[K, K]`` of its input, or a factor of it from
    ``inverse_hessian_factor`` shared by linears that read one input (then ``damp`` and ``act_order`` were given
    there, act-order with ``order_unit`` = the format's block, 1 for per-channel int). ``block_size`` is B1,
    ``micro_block`` B2 (default the format's block). Returns ``(codes, scales)`` laid out as
    ``formats.quantize(w, fmt, axis=0)``, so ``formats.dequantize(codes, scales, fmt, axis=0)`` gives the GPTQ
    weights."""
    fmt = formats.parse_format(fmt)
    if fmt.kind == "none":
        raise InputError("GPTQ needs a quantized weight format, got 'none'")
    w = np.asarray(w, np.float32)
    if w.ndim != 2:
        raise InputError(f"{name}: GPTQ expects a 2-D weight [K, N], got shape {w.shape}")
    formats.check_finite(w, name)
    k = w.shape[0]
    block, micro = check_blocks(fmt, block_size, micro_block)
    group = fmt.block_size or k
    factor = hessian if isinstance(hessian, InverseHessianFactor) else inverse_hessian_factor(
        hessian, damp, order_unit=(fmt.block_size or 1) if act_order else None, name=name)
    if factor.upper.shape[0] != k:
        raise InputError(f"{name}: Hessian is for {factor.upper.shape[0]} input channels, the weight has {k}")
    work = w[factor.perm]  # quantization order; a copy, updated in place
    work[factor.dead[factor.perm]] = 0.0
    q_perm, params_perm = _gptq(work, factor.upper, _grid(fmt, k), block, micro)
    q = np.empty_like(q_perm)
    q[factor.perm] = q_perm
    params = np.empty_like(params_perm)
    params[factor.perm[::group] // group] = params_perm
    return _encode(q, params, fmt)


def _encode(q: np.ndarray, params: np.ndarray, fmt: formats.MXFormat) -> tuple[np.ndarray, np.ndarray]:
    """Codes and stored scales of grid values ``q [K, N]`` with per-group ``params [K / group, N]``."""
    per_element = np.repeat(params, fmt.block_size or q.shape[0], axis=0)[: q.shape[0]]
    if fmt.kind == "mx":
        codes = formats.element_codes(np.ldexp(q, -per_element), fmt.elem)
        return codes, (params + 127).astype(np.uint8)
    return np.rint(q / per_element).astype(np.int8), params.astype(np.float32)


class GptqWeightProvider:
    """Weight provider for the rewrite pass: ``provider(name, w) -> (codes, scales)`` GPTQ-quantizes the linear
    ``name`` (e.g. "layers.3.q_proj") with the Hessian of its input. ``hessians`` is keyed by linear name or by
    input group ("layers.3.qkv", "layers.3.o", "layers.3.gate_up", "layers.3.down"); linears of one group share the
    factored inverse Hessian. Dampening raised for a badly conditioned Hessian is recorded in ``raised_damp``."""

    _GROUP = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "o_proj": "o", "gate_proj": "gate_up",
              "up_proj": "gate_up", "down_proj": "down"}

    def __init__(self, hessians: Mapping[str, np.ndarray], fmt: str | formats.MXFormat, block_size: int = 128,
                 micro_block: int | None = None, damp: float = 0.01, act_order: bool = False):
        self.hessians = hessians
        self.fmt = formats.parse_format(fmt)
        self.block_size, self.micro_block, self.damp, self.act_order = block_size, micro_block, damp, act_order
        self.raised_damp: dict[str, float] = {}
        self._factors: dict[str, InverseHessianFactor] = {}

    def hessian_key(self, name: str) -> str:
        if name in self.hessians:
            return name
        prefix, _, role = name.rpartition(".")
        key = f"{prefix}.{self._GROUP.get(role, role)}"
        if key not in self.hessians:
            raise InputError(f"no calibration Hessian for linear {name!r}")
        return key

    def factor(self, name: str) -> InverseHessianFactor:
        """The factored inverse Hessian of ``name``'s input, computed once per input group."""
        key = self.hessian_key(name)
        if key not in self._factors:
            factor = inverse_hessian_factor(self.hessians[key], self.damp,
                                            order_unit=(self.fmt.block_size or 1) if self.act_order else None,
                                            name=key)
            if factor.damp != self.damp:
                self.raised_damp[key] = factor.damp
            self._factors[key] = factor
        return self._factors[key]

    def __call__(self, name: str, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return gptq_quantize(w, self.factor(name), self.fmt, block_size=self.block_size,
                             micro_block=self.micro_block, name=name)
