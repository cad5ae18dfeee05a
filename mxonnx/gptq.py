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

Computation (the same updates, summed differently; project issue 17). Let ``H = R R^T`` with R upper triangular
(the Cholesky factor of H in reversed channel order), so ``U = R^-1``, and let ``R^ = R diag(R)^-1`` (unit upper:
``H = R^ diag(R)^2 R^^T``), whose inverse ``U^ = diag(R) U`` holds the ratios ``U_jl / U_jj`` Eq. 8 applies. With
``d_j = w_j - q_j`` the deviation from the original weights, Eq. 8 gives ``D = U^T E``; as ``R U = I``, the updates
the channels ``l >= i1`` have received from the channels before a block ``[i1, i2)`` are
``-sum_{m<i1} U_ml e_m = sum_{i1<=i<=l} U^_il c_i`` with ``c = R^[:i1, i1:]^T D[:i1]``. So the factorisation is one
float32 Cholesky (K^3/3 flops, no inverse); the later channels accumulate ``c`` lazily
(``W[i2:] += R^[i1:i2, i2:]^T D_block``), and a block, when reached, becomes ``w + U^_B^T c`` with ``U^_B`` the
inverse of its diagonal block of R^ (B1 x B1). Inside a block Eq. 8 runs with ``U^_B`` as above.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
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

    def take_hessian(self) -> np.ndarray:
        """:attr:`hessian` made in place of the running sum, which is given away (the same values, no second
        [K, K] float64 array: a 7B down_proj's is 0.97 GB); the accumulator is then empty."""
        hessian, self._xtx = self._xtx, None
        hessian *= 2.0 / max(self.count, 1)
        return hessian


@dataclasses.dataclass(frozen=True)
class InverseHessianFactor:
    """What GPTQ needs from the Hessian of K input channels: ``upper``, ``R^``, unit upper triangular with
    ``H = R^ S R^^T`` (S diagonal) for the dampened, column-permuted H, float32 (``R^ = R diag(R)^-1`` for
    ``R = U^-1``, U the upper Cholesky factor of ``H^-1 = U^T U`` that Algorithm 1 starts from: module docstring);
    ``dead``, channels with ``H_ii = 0`` (their weights are zeroed); ``perm``, the quantization order; ``damp``, the
    dampening finally used."""

    upper: np.ndarray
    dead: np.ndarray
    perm: np.ndarray
    damp: float
    diagonal: np.ndarray | None = None  # diag(R) = 1 / diag(U), float32: channel j's loss weight is diagonal_j^2


def inverse_hessian_factor(hessian: np.ndarray, damp: float = 0.01, *, order_unit: int | None = None,
                           name: str = "weight") -> InverseHessianFactor:
    """Factor ``H + damp * mean(diag H) * I`` for GPTQ.

    Dead channels (``H_ii = 0``) get ``H_ii = 1``. ``order_unit`` (act-order): quantize the whole units of
    ``order_unit`` consecutive channels by decreasing sum of ``H_ii``, so MX blocks stay contiguous and aligned (a
    partial last unit stays last); None keeps the natural order. When a Cholesky fails the dampening is raised
    10x (up to ``DAMP_RETRIES`` times) with a ``HessianDampingWarning`` naming ``name``. ``hessian`` is left
    unchanged; the factorisation works in one float32 copy of it (half a float64 copy) and small temporaries.
    """
    h = np.asarray(hessian)
    if h.ndim != 2 or h.shape[0] != h.shape[1]:
        raise InputError(f"Hessian of {name} must be square, got shape {h.shape}")
    if not _all_finite(h):
        raise InputError(f"Hessian of {name} holds NaN or Inf values")
    k = h.shape[0]
    diag = np.diagonal(h).astype(np.float64)  # a copy
    dead = diag == 0
    if dead.all():
        raise InputError(f"Hessian of {name} is all zero: no calibration data reached this input")
    diag[dead] = 1.0
    perm = np.arange(k) if order_unit is None else _act_order(diag, order_unit)
    mean_diag = diag.mean()
    for attempt in range(DAMP_RETRIES + 1):
        damp_used = damp * 10.0**attempt
        factored = _inverse_cholesky_upper(_Dampened(h, perm, diag + damp_used * mean_diag))
        if factored is not None:
            if attempt:
                warnings.warn(f"Hessian of {name} not positive definite; damp raised to {damp_used:g}",
                              HessianDampingWarning, stacklevel=2)
            upper, diagonal = factored
            return InverseHessianFactor(upper, dead, perm, damp_used, diagonal)
    raise InputError(f"Hessian of {name} is not positive definite even with damp {damp_used:g}")


def _act_order(diag: np.ndarray, unit: int) -> np.ndarray:
    """Channel order putting whole units of ``unit`` consecutive channels with the largest sum of H_ii first; the
    channels after the last whole unit keep their place at the end."""
    whole = len(diag) // unit * unit
    units = np.argsort(-diag[:whole].reshape(-1, unit).sum(axis=1), kind="stable")
    return np.concatenate([(units[:, None] * unit + np.arange(unit)).reshape(-1), np.arange(whole, len(diag))])


_ROWS = 256  # rows per chunk of the whole-matrix copies and checks


def _all_finite(a: np.ndarray) -> bool:
    return all(np.isfinite(a[r: r + _ROWS]).all() for r in range(0, len(a), _ROWS))


@dataclasses.dataclass(frozen=True)
class _Dampened:
    """``A = H[perm][:, perm]`` with diagonal ``diag[perm]`` (the dampened Hessian in quantization order), not
    materialised: ``_inverse_cholesky_upper`` builds it once, in float32."""

    hessian: np.ndarray
    perm: np.ndarray
    diag: np.ndarray


def _inverse_cholesky_upper(a: _Dampened) -> tuple[np.ndarray, np.ndarray] | None:
    """``(R^, diag(R))``: ``R^ = R diag(R)^-1`` (float32, C order) for R upper triangular with ``A = R R^T``, i.e. the
    inverse of the upper Cholesky factor U of ``A^-1 = U^T U``; None when A is not positive definite (in float32, as
    the GPTQ reference factors). The name is kept: tests patch this hook.

    With J the order reversal, the Cholesky ``J A J = M M^T`` (M lower) gives ``R = J M J``. Memory: ``J A J`` in
    float32, factored, reversed and scaled in place."""
    k = len(a.perm)
    order = a.perm[::-1]
    m = np.empty((k, k), np.float32)
    for r in range(0, k, _ROWS):
        np.take(a.hessian[order[r: r + _ROWS]].astype(np.float32), order, axis=1, out=m[r: r + _ROWS])
    m[np.arange(k), np.arange(k)] = a.diag[order]
    if not _cholesky_lower_(m):
        return None
    for r in range(0, k, _ROWS):  # clear the strict upper triangle, which _cholesky_lower_ leaves as it was
        m[r: r + _ROWS, r + _ROWS:] = 0.0
        m[r: r + _ROWS, r: r + _ROWS] = np.tril(m[r: r + _ROWS, r: r + _ROWS])
    for r in range(0, (k + 1) // 2, _ROWS):  # J M J: swap rows r and k-1-r, each reversed
        top = slice(r, min(r + _ROWS, (k + 1) // 2))
        bottom = slice(k - top.stop, k - top.start)
        rows = m[top, ::-1].copy()
        m[top] = m[bottom][::-1, ::-1]
        m[bottom] = rows[::-1]
    diagonal = np.diagonal(m).copy()  # float32
    inverse_diagonal = 1 / diagonal
    for r in range(0, k, _ROWS):
        m[r: r + _ROWS] *= inverse_diagonal
    return (m, diagonal) if _all_finite(m) else None


_PANEL = 256  # columns per step of _cholesky_lower_, and rows per task of the threaded products


def _cholesky_lower_(a: np.ndarray) -> bool:
    """Cholesky ``a = L L^T`` in place (float32, C order): L replaces the lower triangle, the strict upper triangle
    is left stale. False when ``a`` is not positive definite.

    Right-looking by panels of ``_PANEL`` columns, so that nearly all K^3/3 flops are matrix products
    (``A22 -= L21 L21^T`` on the lower triangle, by tiles of rows on the thread pool):
    ``L11 = chol(A11)`` (float64), ``L21 = A21 L11^-T``."""
    n = len(a)
    for j in range(0, n, _PANEL):
        j2 = min(j + _PANEL, n)
        try:
            l11 = np.linalg.cholesky(a[j:j2, j:j2].astype(np.float64))
        except np.linalg.LinAlgError:
            return False
        a[j:j2, j:j2] = l11
        if j2 == n:
            break
        inverse_t = np.tril(np.linalg.inv(l11)).T.astype(np.float32)  # L11^-T

        def panel(r1: int, r2: int) -> None:  # rows r1:r2 of L21 = A21 L11^-T
            a[r1:r2, j:j2] = a[r1:r2, j:j2] @ inverse_t

        def schur(r1: int, r2: int) -> None:  # rows r1:r2 of the lower triangle of A22 -= L21 L21^T
            a[r1:r2, j2:r2] -= a[r1:r2, j:j2] @ a[j2:r2, j:j2].T

        _parallel(panel, j2, n)
        _parallel(schur, j2, n)
    return True


_THREADS = min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, 4)


@functools.cache
def _pool() -> ThreadPoolExecutor | None:
    return ThreadPoolExecutor(_THREADS, thread_name_prefix="mxonnx-gptq") if _THREADS > 1 else None


def _parallel(task: Callable[[int, int], None], start: int, stop: int) -> None:
    """``task(r1, r2)`` for the rows ``start:stop`` in pieces of ``_PANEL`` rows, on the thread pool (numpy's
    BLAS and ufuncs release the GIL; with OPENBLAS_NUM_THREADS=1 each piece runs on one core). The pieces do not
    depend on the number of threads, so neither do the results."""
    pieces = [(r, min(r + _PANEL, stop)) for r in range(start, stop, _PANEL)]
    pool = _pool()
    if pool is None or len(pieces) == 1:
        for r1, r2 in pieces:
            task(r1, r2)
    else:
        for done in [pool.submit(task, r1, r2) for r1, r2 in pieces]:
            done.result()


class _MxRows:
    """MX rounding of one row ``w_j [N]`` with its group's shared exponents E: ``Q_elem(w_j I_E) S_E`` (2^-E and 2^E,
    or with a pre-scale p fl(2^-E p) and fl(2^E / p): the same pre-scaled grid as the rewritten graph), the
    arithmetic of ``formats.quantize_dequantize_with_exponent`` with I_E, S_E and the clamp bounds prepared once
    per group (numpy clamps against arrays much faster than against a scalar). For MXINT the grid step is constant
    (|v| <= max_norm < 2 after the clamp, so ``_round_to_grid``'s ``max(2^floor(log2|v|), 1)`` is 1): rounding adds
    and subtracts C = 1.5 * 2^(23 - mbits)."""

    def __init__(self, fmt: formats.MXFormat, k: int):
        self.fmt, self.elem, self.group = fmt, fmt.elem, fmt.block_size
        self.rounder = np.float32(1.5 * 2.0 ** (23 - fmt.elem.mbits)) if fmt.elem.integer_codes else None

    def params(self, w: np.ndarray) -> np.ndarray:
        return formats.shared_exponents(w, self.fmt, axis=0)

    def prepare(self, exponent: np.ndarray) -> tuple[np.ndarray, ...]:
        bound = np.full(exponent.shape, self.elem.max_norm, np.float32)
        if self.fmt.prescaled:
            return (*formats.exponent_multipliers(exponent, self.fmt), -bound, bound)
        one = np.float32(1)
        return np.ldexp(one, -exponent).astype(np.float32), np.ldexp(one, exponent).astype(np.float32), -bound, bound

    def round(self, w_j: np.ndarray, prepared: tuple[np.ndarray, ...], out: np.ndarray, v: np.ndarray) -> None:
        inverse, scale, low, high = prepared
        np.multiply(w_j, inverse, out=v)
        if self.rounder is None:
            formats._round_to_grid(v, self.elem)
        else:
            np.minimum(v, high, out=v)
            np.maximum(v, low, out=v)
            v += self.rounder
            v -= self.rounder
        np.multiply(v, scale, out=out)


class _IntRows:
    """Fixed-point rounding of one row with its group's float32 scale s: ``clamp(rint(w_j / s), +-qmax) s``, the
    arithmetic of ``formats.quantize_dequantize_with_scale``."""

    def __init__(self, fmt: formats.MXFormat, k: int):
        self.fmt, self.group = fmt, fmt.block_size or k
        self.qmax = 2 ** (fmt.bits - 1) - 1

    def params(self, w: np.ndarray) -> np.ndarray:
        return formats.fixed_point_scales(w, self.fmt, axis=0)

    def prepare(self, scale: np.ndarray) -> tuple[np.ndarray, ...]:
        bound = np.full(scale.shape, self.qmax, np.float32)
        return np.ascontiguousarray(scale, np.float32), -bound, bound

    def round(self, w_j: np.ndarray, prepared: tuple[np.ndarray, ...], out: np.ndarray, v: np.ndarray) -> None:
        scale, low, high = prepared
        np.divide(w_j, scale, out=v)
        np.minimum(v, high, out=v)
        np.maximum(v, low, out=v)
        v += _INTEGER_ROUNDER
        v -= _INTEGER_ROUNDER
        np.multiply(v, scale, out=out)


_INTEGER_ROUNDER = np.float32(1.5 * 2**23)  # (y + R) - R rounds float32 |y| <= 2^22 to an integer, half to even
_LEAF_ROWS = 16  # channels quantized one by one; longer spans are halved, joined by one matrix product
_FLUSH_ROWS = 512  # the deviations of this many channels reach the far channels by one product (GEMM efficiency)


def _rows(fmt: formats.MXFormat, k: int) -> _MxRows | _IntRows:
    return _MxRows(fmt, k) if fmt.kind == "mx" else _IntRows(fmt, k)


_THREADED_PRODUCT = 1 << 24  # multiply-adds from which _add_product runs on the thread pool


def _add_product(c: np.ndarray, a: np.ndarray, b: np.ndarray, alpha: float) -> None:
    """``c += alpha * a @ b`` in place (float32, alpha +-1); a large product by pieces of rows of c on the thread
    pool (each piece's temporary is small)."""

    def piece(r1: int, r2: int) -> None:
        if alpha < 0:
            c[r1:r2] -= a[r1:r2] @ b
        else:
            c[r1:r2] += a[r1:r2] @ b

    if c.size * a.shape[1] < _THREADED_PRODUCT:
        piece(0, len(c))
    else:
        _parallel(piece, 0, len(c))


def _block_inverse(r: np.ndarray) -> np.ndarray:
    """``U^_B``, the inverse (upper triangular, float32) of a diagonal block of R^, inverted in float64."""
    return np.triu(np.linalg.inv(r.astype(np.float64))).astype(np.float32)


def searches_exponents_by_default(fmt: "str | formats.MXFormat") -> bool:
    """The default of the output-aware exponent choice for one weight format: on for MXINT, where it was measured
    best on SmolLM2 (W4A8 AWQ+GPTQ, 40 windows: MXINT4-128 27.000 against 30.558, MXINT4-32 25.086 against 25.810,
    MXINT4-16 23.715 against 24.240); off (the OCP rule) for MXFP and fixed-point formats until measured."""
    fmt = formats.parse_format(fmt)
    return fmt.kind == "mx" and fmt.elem.name.startswith("int")


EXPONENT_OFFSETS = (0, -1, 1)  # candidates around the OCP exponent E tried by the output-aware choice (E first)


def choose_exponents(w: np.ndarray, u: np.ndarray, weight: np.ndarray, rows: _MxRows, exponent: np.ndarray,
                     offsets=EXPONENT_OFFSETS) -> np.ndarray:
    """Output-aware shared exponents of one MX group (project issue 19): for each output channel, the candidate
    ``E + o`` (``o`` in ``offsets``, clamped to [-127, 127]) whose GPTQ loss over the group's ``b`` channels is least.

    ``w [b, N]``: the group's error-updated weights when Algorithm 1 reaches it; ``u [b, b]``: its block of U^
    (unit upper); ``weight [b]``: ``diag(R)^2``. Eq. 8 runs over the group with each candidate, and channel j adds
    ``(w_j - q_j)^2 / [H_F^-1]_jj = (w_j - q_j)^2 R_jj^2`` (the OBS loss of fixing it, F the channels not yet
    fixed). The candidates run side by side as ``len(offsets) * N`` columns."""
    b, n = w.shape
    c = len(offsets)
    trial = np.concatenate([np.clip(exponent.astype(np.int32) + o, -127, 127) for o in offsets]).astype(exponent.dtype)
    prepared = rows.prepare(trial)
    x = np.tile(w, (1, c))
    err = np.empty_like(x)
    q, v = np.empty(c * n, np.float32), np.empty(c * n, np.float32)
    loss = np.zeros(c * n, np.float64)
    with np.errstate(over="ignore"):
        for j in range(b):
            x_j = x[j]
            if j:
                x_j -= u[:j, j] @ err[:j]
            rows.round(x_j, prepared, q, v)
            np.subtract(x_j, q, out=err[j])
            err[j] /= u[j, j]
            loss += float(weight[j]) * np.square(err[j], dtype=np.float64)
    best = np.argmin(loss.reshape(c, n), axis=0)  # ties go to the first offset: E itself, as listed
    return trial.reshape(c, n)[best, np.arange(n)]


def _gptq(work: np.ndarray, original: Callable[[int, int], np.ndarray], root: np.ndarray, rows: _MxRows | _IntRows,
          block: int, micro: int, loss_weight: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Algorithm 1 on ``work [K, N]`` (float32, the weights in quantization order, updated in place) with ``root``
    the factor R^ of the Hessian (``InverseHessianFactor.upper``); ``original(i1, i2)`` gives rows ``i1:i2`` of the
    weights as they were. ``block`` (B1) is a multiple of ``micro`` (B2), a multiple of ``rows.group`` unless that
    spans all of K. Returns (Q [K, N] float32, parameters [ceil(K / group), N]).

    Channels ``l`` after the current block hold ``w_l + c_l`` (module docstring). When block ``[i1, i2)`` is reached
    it becomes ``w + U^_B^T c``: the weights Eq. 8 would hold there. In it, every channel j gets
    ``w_j -= sum_{i < j} (U^_B)_ij e_i`` before it is rounded, the sums grouped for BLAS: after a micro-block the rest
    of the block by one product; inside a micro-block spans are halved down to ``_LEAF_ROWS`` channels (each half's
    errors reaching the second half by one product), and in a leaf each channel pulls the errors of the leaf's
    earlier channels (one matrix-vector product). A micro-block's groups get their parameters when all earlier
    errors have reached it, as in Algorithm 1. After the block, ``W[i2:] += R^[i1:i2, i2:]^T (W_B - Q_B)``, the
    blocks' deviations gathered over ``_FLUSH_ROWS`` channels (each block first takes those still gathered).
    ``loss_weight`` (``diag(R)^2`` in quantization order, MX formats only): shared exponents are chosen by
    :func:`choose_exponents` instead of the OCP rule."""
    k, n = work.shape
    group = rows.group
    q = np.empty_like(work)
    err = np.empty((min(block, k), n), np.float32)  # e_j = (w_j - q_j) / (U^_B)_jj in the current block
    v = np.empty(n, np.float32)
    params, prepared = None, [None] * -(-k // group)

    def leaf(i1: int, a: int, b: int, u: np.ndarray) -> None:  # a, b: rows of the block
        for j in range(a, b):
            w_j = work[i1 + j]
            if j > a:
                w_j -= u[a:j, j] @ err[a:j]
            rows.round(w_j, prepared[(i1 + j) // group], q[i1 + j], v)
            e_j = err[j]
            np.subtract(w_j, q[i1 + j], out=e_j)
            e_j /= u[j, j]

    def span(i1: int, a: int, b: int, u: np.ndarray) -> None:
        if b - a <= _LEAF_ROWS:
            leaf(i1, a, b, u)
            return
        mid = a + -(-(b - a) // (2 * _LEAF_ROWS)) * _LEAF_ROWS
        span(i1, a, mid, u)
        _add_product(work[i1 + mid: i1 + b], u[a:mid, mid:b].T, err[a:mid], -1.0)
        span(i1, mid, b, u)

    flush = block * max(1, _FLUSH_ROWS // block)
    deviations = np.empty((min(flush, k), n), np.float32)  # D of the blocks [start, i1), not yet in the rows after
    start = 0
    with np.errstate(over="ignore"):  # w_j 2^-E beyond float32 saturates like any value above max_norm
        for i1 in range(0, k, block):
            i2 = min(i1 + block, k)
            u = _block_inverse(root[i1:i2, i1:i2])
            w_block, w0 = work[i1:i2], original(i1, i2)
            if start < i1:
                _add_product(w_block, root[start:i1, i1:i2].T, deviations[: i1 - start], 1.0)
            if i1:  # w_block = w0 + c  ->  w0 + U^_B^T c
                w_block -= w0
                np.add(w0, u.T @ w_block, out=w_block)
            for j1 in range(0, i2 - i1, micro):
                j2 = min(j1 + micro, i2 - i1)
                g1, g2 = -(-(i1 + j1) // group), -(-(i1 + j2) // group)  # groups starting here
                if g2 > g1:
                    fresh = rows.params(work[g1 * group: g2 * group])
                    if loss_weight is not None:
                        for g in range(g1, g2):
                            a, b = g * group - i1, min((g + 1) * group, i2) - i1
                            fresh[g - g1] = choose_exponents(work[i1 + a: i1 + b], u[a:b, a:b],
                                                             loss_weight[i1 + a: i1 + b], rows, fresh[g - g1])
                    if params is None:
                        params = np.empty((len(prepared), n), fresh.dtype)
                    params[g1:g2] = fresh
                    for g in range(g1, g2):
                        prepared[g] = rows.prepare(params[g])
                span(i1, j1, j2, u)
                if j2 < i2 - i1:
                    _add_product(w_block[j2:], u[j1:j2, j2:].T, err[j1:j2], -1.0)
            if i2 < k:
                np.subtract(w0, q[i1:i2], out=deviations[i1 - start: i2 - start])  # D_B = W_B - Q_B
                if i2 - start >= flush:
                    _add_product(work[i2:], root[start:i2, i2:].T, deviations[: i2 - start], 1.0)
                    start = i2
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
                  exponent_search: bool = False, refine_sweeps: int = 0,
                  name: str = "weight") -> tuple[np.ndarray, np.ndarray]:
    """GPTQ-quantize ``w [K, N]`` given the Hessian ``[K, K]`` of its input, or a factor of it from
    ``inverse_hessian_factor`` shared by linears that read one input (then ``damp`` and ``act_order`` were given
    there, act-order with ``order_unit`` = the format's block, 1 for per-channel int). ``block_size`` is B1,
    ``micro_block`` B2 (default the format's block). Returns ``(codes, scales)`` laid out as
    ``formats.quantize(w, fmt, axis=0)``, so ``formats.dequantize(codes, scales, fmt, axis=0)`` gives the GPTQ
    weights. ``exponent_search`` (MX formats): each group's shared exponent is the one of E-1, E, E+1 with the least
    GPTQ loss (:func:`choose_exponents`) instead of E; the stored format is the same. ``refine_sweeps``: that many
    sweeps of coordinate descent on the layer loss after Algorithm 1 (:func:`refine_by_coordinate_descent`)."""
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
    perm, dead = factor.perm, factor.dead[factor.perm]

    def original(i1: int, i2: int) -> np.ndarray:
        rows = w[perm[i1:i2]]
        rows[dead[i1:i2]] = 0.0
        return rows

    work = original(0, k)  # quantization order; a copy, updated in place
    root = np.ascontiguousarray(factor.upper, np.float32)
    search = exponent_search and fmt.kind == "mx"
    if (search or refine_sweeps) and factor.diagonal is None:
        raise ValueError("exponent search and refinement need the factor's diagonal (inverse_hessian_factor gives it)")
    loss_weight = None
    if search:
        loss_weight = np.square(factor.diagonal.astype(np.float64)).astype(np.float32)
    rows = _rows(fmt, k)
    q_perm, params_perm = _gptq(work, original, root, rows, block, micro, loss_weight)
    del work
    if refine_sweeps:
        refine_by_coordinate_descent(original(0, k), q_perm, params_perm, factor, rows, refine_sweeps)
    # permuted groups are whole groups (act-order moves units of one group), so encode in that order, then undo it
    codes_perm, scales_perm = _encode(q_perm, params_perm, fmt)
    del q_perm
    codes = np.empty_like(codes_perm)
    codes[perm] = codes_perm
    scales = np.empty_like(scales_perm)
    scales[perm[::group] // group] = scales_perm
    return codes, scales


def refine_by_coordinate_descent(w: np.ndarray, q: np.ndarray, params: np.ndarray, factor: InverseHessianFactor,
                                 rows: "_MxRows | _IntRows", sweeps: int) -> np.ndarray:
    """Lower GPTQ's layer loss ``sum_n (w_n - q_n)^T H (w_n - q_n)`` further by coordinate descent over the grid
    (after QuantEase, arXiv 2309.01885), the shared exponents / scales kept: channel by channel,
    ``q_j <- round(q_j + [H D]_j / H_jj)``, ``D = W - Q``, the exact minimiser of the loss along channel j over its
    grid (a convex quadratic in ``q_j``), so no sweep raises the loss. ``H`` is the dampened Hessian in quantization
    order, rebuilt from the factor as ``R^ diag(R)^2 R^^T``; ``w, q [K, N]`` in that order, ``params`` per group.
    ``q`` is updated in place and returned."""
    k, n = q.shape
    upper = factor.upper.astype(np.float64)
    h = (upper * np.square(factor.diagonal.astype(np.float64))) @ upper.T
    h_diag = np.diagonal(h).copy()
    h32 = h.astype(np.float32)
    del h, upper
    prepared = [rows.prepare(params[g]) for g in range(len(params))]
    new, v = np.empty(n, np.float32), np.empty(n, np.float32)
    for _ in range(sweeps):
        residual = h32 @ (w - q)  # [H D], recomputed each sweep so float32 updates do not drift
        changed = 0
        for j in range(k):
            rows.round(q[j] + residual[j] / np.float32(h_diag[j]), prepared[j // rows.group], new, v)
            delta = q[j] - new  # D_j grows by q_j - q_j'
            moved = np.flatnonzero(delta)
            if len(moved):
                changed += len(moved)
                residual[:, moved] += np.outer(h32[:, j], delta[moved])
                q[j] = new
        if not changed:
            break
    return q


_ENCODE_ELEMENTS = 1 << 20  # elements per chunk of _encode


def _encode(q: np.ndarray, params: np.ndarray, fmt: formats.MXFormat) -> tuple[np.ndarray, np.ndarray]:
    """Codes and stored scales of grid values ``q [K, N]`` with per-group ``params [K / group, N]``, group by group
    in chunks of rows (small temporaries). MX: the element value is ``q 2^-E`` (exact: a grid value); MXINT codes
    are that times 2^mbits (``formats.element_codes`` without its NaN handling: q is finite). Pre-scaled: q is the
    rounded ``elem * S_E``, so the element is ``q / S_E`` rounded back onto the element grid (exact: the grid
    spacing is far above the two roundings)."""
    k, n = q.shape
    group = fmt.block_size or k
    integer = fmt.kind == "int" or fmt.elem.integer_codes
    codes = np.empty((k, n), np.int8 if integer else np.uint8)
    step = max(1, _ENCODE_ELEMENTS // max(n, 1))
    for g in range(len(params)):
        per_group = (params[g] if fmt.kind == "int"
                     else np.ldexp(np.float32(1), -params[g]).astype(np.float32))  # scale, or 2^-E
        for r in range(g * group, min((g + 1) * group, k), step):
            chunk = q[r: min(r + step, (g + 1) * group)]
            if fmt.kind == "int":
                codes[r: r + len(chunk)] = np.rint(chunk / per_group)
            elif fmt.prescaled:
                inverse = np.float32(1) / formats.exponent_multipliers(params[g], fmt)[1]
                value = formats._round_to_grid(chunk * inverse, fmt.elem)
                codes[r: r + len(chunk)] = (value * np.float32(2**fmt.elem.mbits) if integer
                                            else formats.element_codes(value, fmt.elem))
            elif integer:
                value = chunk * per_group
                value *= np.float32(2**fmt.elem.mbits)
                codes[r: r + len(chunk)] = value
            else:
                codes[r: r + len(chunk)] = formats.element_codes(chunk * per_group, fmt.elem)
    if fmt.kind == "mx":
        return codes, (params + 127).astype(np.uint8)
    return codes, params.astype(np.float32)


def round_with_exponent_choice(w: np.ndarray, channel_weight: np.ndarray, fmt: str | formats.MXFormat, *,
                               damp: float = 0.01, offsets=EXPONENT_OFFSETS,
                               name: str = "weight") -> tuple[np.ndarray, np.ndarray]:
    """Round to nearest with output-aware shared exponents (issue 19 item 1, for RTN and AWQ): GPTQ (Algorithm 1)
    with the diagonal Hessian ``H = diag(h)``, ``h_j = m_j + damp * mean(m)``, ``m_j = mean_t x_tj^2`` from the
    calibration statistics. No error then passes between channels, so every element is rounded to nearest as RTN
    does, and each MX block's exponent is the candidate ``E + o`` (``o`` in ``offsets``, E the OCP rule, ties to E)
    of least ``sum_j h_j (w_jn - q_jn)^2``: the squared output error of the block's channels for uncorrelated
    inputs (:func:`choose_exponents` with ``U^ = I``). ``w [K, N]``; returns ``formats.quantize(w, fmt, axis=0)``'s
    layout. Formats other than MX round to nearest unchanged."""
    fmt = formats.parse_format(fmt)
    w = np.asarray(w, np.float32)
    if fmt.kind != "mx":
        return formats.quantize(w, fmt, axis=0)
    formats.check_finite(w, name)
    k = w.shape[0]
    m = np.asarray(channel_weight, np.float64)
    if m.shape != (k,):
        raise InputError(f"{name}: {m.shape[0] if m.ndim == 1 else m.shape} channel weights for {k} input channels")
    h = m + damp * float(m.mean()) if k else m
    b = fmt.block_size
    starts = np.arange(0, k, b)
    ocp = formats.shared_exponents(w, fmt, axis=0)  # [ceil(K / b), N]
    best_loss = best = best_q = None
    for o in offsets:
        trial = np.clip(ocp + o, -127, 127).astype(ocp.dtype)
        q = formats.quantize_dequantize_with_exponent(w, np.repeat(trial, b, axis=0)[:k], fmt)
        loss = np.add.reduceat(np.square(w - q, dtype=np.float64) * h[:, None], starts, axis=0)
        if best is None:
            best_loss, best, best_q = loss, trial, q
            continue
        better = loss < best_loss  # strict: ties keep the earlier candidate (E first)
        best_loss = np.where(better, loss, best_loss)
        best = np.where(better, trial, best)
        best_q = np.where(np.repeat(better, b, axis=0)[:k], q, best_q)
    return _encode(best_q, best, fmt)


def float_target_weights(weights: Mapping[str, np.ndarray], hessian: np.ndarray, cross: np.ndarray,
                         damp: float = 0.01) -> dict[str, np.ndarray]:
    """GPTQ's target when its inputs come from the quantized prefix but the output to match is the float model's
    (asymmetric calibration, after GPTAQ, arXiv 2504.02692). With ``A`` a linear's input on the quantized stream
    and ``X`` the same tokens' input in the float model, ``||X W - A Q||^2 = ||A (W* - Q)||^2 + const`` for

        W* = argmin_V ||X W - A V||^2 + lambda n/2 ||V - W||^2 = (H + lambda I)^-1 (C + lambda I) W,

    ``H = 2/n A^T A`` (Eq. 7), ``C = 2/n A^T X``, ``lambda = damp * mean(diag H)`` (a ridge toward W, scaled as
    GPTQ's dampening; the driver passes ``--float-target-damp``), so GPTQ (Algorithm 1) on ``W*`` with ``H`` minimises the error against the float model's output.
    ``weights``: ``{name: W [K, N]}`` of the linears reading that input (one solve for all); float64 inside."""
    h = np.array(hessian, np.float64)
    lam = damp * float(np.mean(np.diag(h))) if len(h) else 0.0
    if not lam > 0:  # no signal (or no dampening asked): the ridge has no scale, keep the weights
        return {name: np.asarray(w, np.float32) for name, w in weights.items()}
    names = list(weights)
    w = np.concatenate([np.asarray(weights[n], np.float64) for n in names], axis=1)
    h[np.diag_indices_from(h)] += lam
    target = np.linalg.solve(h, np.asarray(cross, np.float64) @ w + lam * w)
    del h
    widths = np.cumsum([weights[n].shape[1] for n in names])[:-1]
    return {n: part.astype(np.float32) for n, part in zip(names, np.split(target, widths, axis=1))}


class ExponentChoiceRounding:
    """The weight provider of :func:`round_with_exponent_choice`: ``fmt`` one format or one per linear name,
    ``channel_weights`` the mean squared input ``m [K]`` of each linear (by name)."""

    def __init__(self, fmt: "str | formats.MXFormat | Mapping[str, str | formats.MXFormat]",
                 channel_weights: Mapping[str, np.ndarray], damp: float = 0.01):
        self.fmt = fmt if isinstance(fmt, Mapping) else formats.parse_format(fmt)
        self.channel_weights, self.damp = channel_weights, damp

    def __call__(self, name: str, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        fmt = self.fmt[name] if isinstance(self.fmt, Mapping) else self.fmt
        return round_with_exponent_choice(w, self.channel_weights[name], fmt, damp=self.damp, name=name)


class GptqWeightProvider:
    """Weight provider for the rewrite pass: ``provider(name, w) -> (codes, scales)`` GPTQ-quantizes the linear
    ``name`` (e.g. "layers.3.q_proj") with the Hessian of its input. ``hessians`` is keyed by linear name or by
    input group ("layers.3.qkv", "layers.3.o", "layers.3.gate_up", "layers.3.down"); linears of one group share the
    factored inverse Hessian (one per act-order unit when their formats' blocks differ). ``fmt``: one format, or a
    mapping of linear name to format (``--override``). Dampening raised for a badly conditioned Hessian is
    recorded in ``raised_damp``.
    ``release``: ``hessians`` is a dict given away, asked for one group at a time (the rewrite visits q, k, v, o,
    gate, up, down in order): when a group is reached, the factors and Hessians of the groups before it are dropped,
    and its own Hessian too once every act-order unit its linears need is factored, so at most one group's Hessian
    and factor are held (a 7B down_proj's float64 Hessian alone is 0.97 GB)."""

    _GROUP = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "o_proj": "o", "gate_proj": "gate_up",
              "up_proj": "gate_up", "down_proj": "down"}

    def __init__(self, hessians: Mapping[str, np.ndarray], fmt: "str | formats.MXFormat | Mapping[str, str | formats.MXFormat]",
                 block_size: int = 128, micro_block: int | None = None, damp: float = 0.01, act_order: bool = False,
                 exponent_search: bool | None = False, refine_sweeps: int = 0, release: bool = False):
        """``exponent_search``: True/False for every linear, None: each linear by its own format
        (:func:`searches_exponents_by_default`); ``refine_sweeps``: :func:`refine_by_coordinate_descent`."""
        self.hessians, self.release = hessians, release
        self.fmt = fmt if isinstance(fmt, Mapping) else formats.parse_format(fmt)
        self.block_size, self.micro_block, self.damp, self.act_order = block_size, micro_block, damp, act_order
        self.exponent_search, self.refine_sweeps = exponent_search, refine_sweeps
        self.raised_damp: dict[str, float] = {}
        self._factors: dict[tuple[str, int | None], InverseHessianFactor] = {}
        self._released: set[str] = set()

    def format_of(self, name: str) -> formats.MXFormat:
        return formats.parse_format(self.fmt[name] if isinstance(self.fmt, Mapping) else self.fmt)

    def hessian_key(self, name: str) -> str:
        """``name`` when the Hessians are keyed by linear, else its input group's key."""
        for key in (name, self._group_key(name)):
            if key in self.hessians or key in self._released:
                return key
        raise InputError(f"no calibration Hessian for linear {name!r}")

    def _group_key(self, name: str) -> str:
        """``layers.3.q_proj`` -> ``layers.3.qkv``."""
        prefix, _, role = name.rpartition(".")
        return f"{prefix}.{self._GROUP.get(role, role)}"

    def _unit(self, name: str) -> int | None:
        return (self.format_of(name).block_size or 1) if self.act_order else None

    def _units_needed(self, key: str) -> set[int | None]:
        """The act-order units of the linears of group ``key`` (every format of the mapping that falls in it)."""
        if not isinstance(self.fmt, Mapping):
            return {self._unit(key)}
        return {self._unit(n) for n in self.fmt
                if key in (n, self._group_key(n)) and self.format_of(n).kind != "none"}

    def factor(self, name: str) -> InverseHessianFactor:
        """The factored inverse Hessian of ``name``'s input, computed once per input group and act-order unit."""
        key = self.hessian_key(name)
        unit = self._unit(name)
        if (key, unit) not in self._factors:
            if key in self._released:
                raise RuntimeError(f"GPTQ provider: the Hessian of {key} was released before {name} asked for it")
            if self.release:
                for old in [k for k in self._factors if k[0] != key]:
                    del self._factors[old]
            factor = inverse_hessian_factor(self.hessians[key], self.damp, order_unit=unit, name=key)
            if factor.damp != self.damp:
                self.raised_damp[key] = factor.damp
            self._factors[(key, unit)] = factor
            if self.release and self._units_needed(key) <= {u for k, u in self._factors if k == key}:
                del self.hessians[key]
                self._released.add(key)
        return self._factors[(key, unit)]

    def __call__(self, name: str, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        fmt = self.format_of(name)
        search = searches_exponents_by_default(fmt) if self.exponent_search is None else self.exponent_search
        return gptq_quantize(w, self.factor(name), fmt, block_size=self.block_size,
                             micro_block=self.micro_block, exponent_search=search,
                             refine_sweeps=self.refine_sweeps, name=name)
