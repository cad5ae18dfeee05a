"""GPTQ for MX formats (mxonnx.gptq, paper Algorithm 1) on random layers: quality against RTN, validity of the
codes, agreement with a plain unblocked reference and with a plain blocked one (the implementation before the
speed-up of project issue 17), the factor, singular Hessians, dampening and the weight provider."""

from __future__ import annotations

import functools
import warnings

import numpy as np
import pytest

from mxonnx import formats
from mxonnx.errors import InputError
from mxonnx.gptq import (GptqWeightProvider, HessianAccumulator, HessianDampingWarning, gptq_quantize,
                         inverse_hessian_factor)

FORMATS = ["mxint4-32", "mxint4-128", "mxint8-128", "mxfp4-32", "mxfp6e2m3-32", "mxfp8e4m3-32", "int4", "int4-g128"]


def correlated_layer(seed: int, k: int = 256, n: int = 64, tokens: int = 1024):
    """(X [tokens, k], W [k, n]): inputs X = Z A + Z with a few outlier channels, small Gaussian weights."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((tokens, k))
    x = z @ rng.standard_normal((k, k)) / np.sqrt(k) + 0.3 * z
    x[:, rng.choice(k, 4, replace=False)] *= 20.0
    w = rng.standard_normal((k, n)) * 0.05
    return x.astype(np.float32), w.astype(np.float32)


def hessian_of(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return 2.0 / len(x) * x.T @ x


def output_error(x, w, q) -> float:
    return float(np.sum((x.astype(np.float64) @ (w.astype(np.float64) - q)) ** 2))


def gptq_weights(w, h, fmt, **kw) -> np.ndarray:
    return formats.dequantize(*gptq_quantize(w, h, fmt, **kw), fmt, axis=0)


@functools.lru_cache(maxsize=None)
def cached_layer(seed: int):
    """(X, W, H) of ``correlated_layer(seed)``, shared by the format cases (read only)."""
    x, w = correlated_layer(seed)
    return x, w, hessian_of(x)


@pytest.mark.parametrize("fmt", FORMATS)
def test_gptq_beats_rtn_on_correlated_inputs(fmt):
    wins = 0
    for seed in range(10):
        x, w, h = cached_layer(seed)
        rtn = formats.quantize_dequantize(w, fmt, axis=0)
        wins += output_error(x, w, gptq_weights(w, h, fmt)) < output_error(x, w, rtn)
    assert wins >= 9


def assert_valid_encoding(codes, scales, fmt_name, w):
    """Same layout as formats.quantize, codes in the element range, and every value on its block's grid."""
    fmt = formats.parse_format(fmt_name)
    ref_codes, ref_scales = formats.quantize(w, fmt, axis=0)
    assert codes.shape == ref_codes.shape and codes.dtype == ref_codes.dtype
    assert scales.shape == ref_scales.shape and scales.dtype == ref_scales.dtype
    q = formats.dequantize(codes, scales, fmt, axis=0)
    assert np.isfinite(q).all()
    size = fmt.block_size or w.shape[0]
    if fmt.kind == "mx":
        exponents = scales.astype(np.int32) - 127
        assert exponents.max() <= 127  # 255 (E = 128) would be a NaN block
        if fmt.elem.integer_codes:
            assert np.abs(codes.astype(np.int32)).max() <= 2 ** (fmt.bits - 1) - 1
        else:
            assert codes.max() < 2**fmt.bits and np.isfinite(formats.element_values(fmt)[codes]).all()
        per_element = np.repeat(exponents, size, axis=0)[: w.shape[0]]
        np.testing.assert_array_equal(formats.quantize_dequantize_with_exponent(q, per_element, fmt), q)
        # E was fixed before later columns of the block moved, so it may exceed the exponent of the final values
        # but never fall below it (values saturate at max_norm * 2^E)
        assert (formats.shared_exponents(q, fmt, axis=0) <= exponents).all()
    else:
        assert np.abs(codes.astype(np.int32)).max() <= 2 ** (fmt.bits - 1) - 1
        assert (scales > 0).all() and np.isfinite(scales).all()
        per_element = np.repeat(scales, size, axis=0)[: w.shape[0]]
        np.testing.assert_array_equal(formats.quantize_dequantize_with_scale(q, per_element, fmt), q)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("k", [576, 200])  # 576 = 4.5 blocks of 128; 200 = 6.25 blocks of 32
def test_codes_are_valid_with_partial_blocks(fmt, k):
    x, w = correlated_layer(1, k=k, n=24, tokens=2 * k)
    codes, scales = gptq_quantize(w, hessian_of(x), fmt)
    assert_valid_encoding(codes, scales, fmt, w)


@pytest.mark.parametrize("fmt", FORMATS)
def test_identity_hessian_gives_rtn(fmt):
    # With H = I the dampened H^-1 = I / (1 + damp) is diagonal, so its Cholesky factor U is diagonal:
    # U[j, j+1:] = 0 and no error is propagated. Each block's exponent (or scale) is then chosen from the
    # untouched weights and every column is rounded to nearest: exactly RTN.
    _, w = correlated_layer(2, k=200, n=32)
    codes, scales = gptq_quantize(w, np.eye(200), fmt, micro_block=128)
    ref_codes, ref_scales = formats.quantize(w, fmt, axis=0)
    np.testing.assert_array_equal(codes, ref_codes)
    np.testing.assert_array_equal(scales, ref_scales)


def reference_gptq(w, h, fmt_name, micro_block, damp=0.01):
    """Unblocked GPTQ in float64 (Eq. 8 with an explicit inverse Hessian, downdated after every column); each
    group's exponent/scale is fixed when its micro-block starts."""
    fmt = formats.parse_format(fmt_name)
    rows = w.T.astype(np.float64)
    n, k = rows.shape
    hinv = np.linalg.inv(h + damp * np.mean(np.diag(h)) * np.eye(k))
    q = np.zeros_like(rows)
    size = fmt.block_size
    params = None
    for j in range(k):
        if j % micro_block == 0:
            block = rows[:, j:j + micro_block].astype(np.float32)
            params = (formats.shared_exponents(block, fmt, axis=1) if fmt.kind == "mx"
                      else formats.fixed_point_scales(block, fmt, axis=1))
        p = params[:, (j % micro_block) // size]
        col = rows[:, j].astype(np.float32)
        q[:, j] = (formats.quantize_dequantize_with_exponent(col, p, fmt) if fmt.kind == "mx"
                   else formats.quantize_dequantize_with_scale(col, p, fmt))
        err = (rows[:, j] - q[:, j]) / hinv[j, j]
        rows[:, j + 1:] -= np.outer(err, hinv[j, j + 1:])
        hinv -= np.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]
    return q.T


@pytest.mark.parametrize("fmt, micro", [("mxint4-16", 16), ("mxfp4-16", 32), ("int4-g16", 16)])
def test_lazy_blocked_updates_match_unblocked_reference(fmt, micro):
    x, w = correlated_layer(3, k=96, n=16, tokens=512)
    h = hessian_of(x)
    ours = gptq_weights(w, h, fmt, block_size=32, micro_block=micro)
    ref = reference_gptq(w, h, fmt, micro)
    # float32 vs float64: int scales differ in the last bits, and a rare rounding tie may flip
    assert np.mean(np.isclose(ours, ref, rtol=1e-4, atol=0)) > 0.98
    assert output_error(x, w, ours) == pytest.approx(output_error(x, w, ref), rel=0.02)


def test_micro_block_must_be_a_multiple_of_the_format_block():
    _, w = correlated_layer(0, k=64, n=8)
    with pytest.raises(InputError, match="multiple"):
        gptq_quantize(w, np.eye(64), "mxint4-32", micro_block=48)
    with pytest.raises(InputError, match="multiple"):
        gptq_quantize(w, np.eye(64), "int4-g32", micro_block=16)
    codes, scales = gptq_quantize(w, np.eye(64), "mxint4-32", micro_block=64, block_size=48)  # B1 rounds up
    assert_valid_encoding(codes, scales, "mxint4-32", w)


def test_bad_inputs():
    _, w = correlated_layer(0, k=64, n=8)
    with pytest.raises(InputError, match="input channels"):
        gptq_quantize(w, np.eye(32), "mxint4-32")
    with pytest.raises(InputError, match="none"):
        gptq_quantize(w, np.eye(64), "none")
    with pytest.raises(InputError, match="NaN"):
        gptq_quantize(np.full_like(w, np.nan), np.eye(64), "mxint4-32")
    with pytest.raises(InputError, match="NaN"):
        gptq_quantize(w, np.full((64, 64), np.inf), "mxint4-32")
    with pytest.raises(InputError, match="all zero"):
        gptq_quantize(w, np.zeros((64, 64)), "mxint4-32")


@pytest.mark.parametrize("fmt", ["mxint4-32", "mxfp4-32", "int4"])
def test_singular_hessian_dead_columns_and_rank_deficiency(fmt):
    x, w = correlated_layer(4, k=128, n=16, tokens=64)  # 64 tokens < 128 channels: rank deficient
    x[:, [5, 77]] = 0.0  # dead channels: H_ii = 0
    h = hessian_of(x)
    codes, scales = gptq_quantize(w, h, fmt)
    assert_valid_encoding(codes, scales, fmt, w)
    q = formats.dequantize(codes, scales, fmt, axis=0)
    assert not q[[5, 77]].any()  # weights of dead channels are zeroed
    assert output_error(x, w, q) < output_error(x, w, formats.quantize_dequantize(w, fmt, axis=0))


def indefinite_hessian(k: int = 32) -> np.ndarray:
    """A symmetric matrix with eigenvalues 1 and one -0.05: positive definite only for damp >= ~0.06."""
    basis, _ = np.linalg.qr(np.random.default_rng(5).standard_normal((k, k)))
    eig = np.ones(k)
    eig[0] = -0.05
    return basis * eig @ basis.T


def test_dampening_is_raised_with_a_warning():
    message = r"Hessian of layers.0.qkv not positive definite; damp raised to 0.1"
    with pytest.warns(HessianDampingWarning, match=message):
        factor = inverse_hessian_factor(indefinite_hessian(), 0.01, name="layers.0.qkv")
    assert factor.damp == pytest.approx(0.1)
    with pytest.raises(InputError, match="not positive definite"):
        inverse_hessian_factor(-np.eye(8), 0.01)


def test_act_order_keeps_blocks_whole():
    x, w = correlated_layer(6, k=200, n=24)
    h = hessian_of(x)
    factor = inverse_hessian_factor(h, order_unit=32)  # 6 whole blocks of 32, then 8 channels
    blocks = factor.perm[:192].reshape(-1, 32)
    assert (blocks % 32 == np.arange(32)).all() and sorted(blocks[:, 0]) == list(range(0, 192, 32))
    assert (factor.perm[192:] == np.arange(192, 200)).all()
    assert (np.diff(np.diagonal(h)[blocks].sum(axis=1)) <= 0).all()  # most important block first
    for fmt in ("mxint4-32", "int4", "int4-g128"):
        codes, scales = gptq_quantize(w, h, fmt, act_order=True)
        assert_valid_encoding(codes, scales, fmt, w)
        q = formats.dequantize(codes, scales, fmt, axis=0)
        assert output_error(x, w, q) < output_error(x, w, formats.quantize_dequantize(w, fmt, axis=0))


def test_hessian_accumulator_is_a_running_mean():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 50, 16)).astype(np.float32)
    acc = HessianAccumulator(16)
    for batch in x:
        acc.add_batch(batch[None])
    assert acc.count == 150
    np.testing.assert_allclose(acc.hessian, hessian_of(x.reshape(-1, 16)), rtol=1e-5, atol=1e-6)
    with pytest.raises(InputError):
        acc.add_batch(np.zeros((4, 15), np.float32))


def test_provider_shares_one_factor_per_input_group():
    x, _ = correlated_layer(8, k=64, n=8)
    h = hessian_of(x)
    provider = GptqWeightProvider({"layers.0.qkv": h, "layers.0.o_proj": h}, "mxint4-32", block_size=32)
    rng = np.random.default_rng(9)
    for role, n in (("q_proj", 16), ("k_proj", 8), ("v_proj", 8), ("o_proj", 16)):
        w = (rng.standard_normal((64, n)) * 0.05).astype(np.float32)
        codes, scales = provider(f"layers.0.{role}", w)
        direct = gptq_quantize(w, h, "mxint4-32", block_size=32)
        np.testing.assert_array_equal(codes, direct[0])
        np.testing.assert_array_equal(scales, direct[1])
    assert provider.factor("layers.0.q_proj") is provider.factor("layers.0.v_proj")
    assert provider.factor("layers.0.o_proj") is not provider.factor("layers.0.q_proj")
    assert not provider.raised_damp
    with pytest.raises(InputError, match="layers.1.q_proj"):
        provider("layers.1.q_proj", w)


def test_provider_records_raised_dampening():
    provider = GptqWeightProvider({"layers.0.down": indefinite_hessian()}, "mxint4-32")
    w = (np.random.default_rng(10).standard_normal((32, 8)) * 0.05).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HessianDampingWarning)
        provider("layers.0.down_proj", w)
    assert provider.raised_damp == {"layers.0.down": pytest.approx(0.1)}


# ---------------------------------------------------------------- the fast implementation against a plain one

def plain_blocked_gptq(w, h, fmt_name, block=128, micro=None, damp=0.01, act_order=False):
    """Algorithm 1 as ``mxonnx.gptq`` implemented it before its speed-up (project issue 17): float64
    ``U = cholesky(inv(H_d))^T`` through an explicit inverse, then a per-channel loop in float32 with rank-1 updates
    of the rest of the B1 block and the lazy update after each block; each micro-block's new groups get their
    exponent/scale when it starts. Returns (codes, scales) in ``formats.quantize``'s layout."""
    fmt = formats.parse_format(fmt_name)
    k, n = w.shape
    group = fmt.block_size or k
    micro = micro or fmt.block_size or block
    block = -(-block // micro) * micro
    diag = np.diagonal(h).copy()
    dead = diag == 0
    diag[dead] = 1.0
    perm = np.arange(k)
    if act_order:
        unit = fmt.block_size or 1
        whole = k // unit * unit
        units = np.argsort(-diag[:whole].reshape(-1, unit).sum(axis=1), kind="stable")
        perm = np.concatenate([(units[:, None] * unit + np.arange(unit)).ravel(), np.arange(whole, k)])
    hd = h.astype(np.float64).copy()
    hd[np.arange(k), np.arange(k)] = diag
    hd = hd[np.ix_(perm, perm)] + damp * diag.mean() * np.eye(k)
    upper = np.linalg.cholesky(np.linalg.inv(hd)).T.astype(np.float32)
    rows = w[perm].astype(np.float32)
    rows[dead[perm]] = 0.0
    q = np.zeros_like(rows)
    params = [None] * -(-k // group)

    def param(x):
        return (formats.shared_exponents(x, fmt, axis=0) if fmt.kind == "mx"
                else formats.fixed_point_scales(x, fmt, axis=0))

    def rnd(x, p):
        return (formats.quantize_dequantize_with_exponent(x, p, fmt) if fmt.kind == "mx"
                else formats.quantize_dequantize_with_scale(x, p, fmt))

    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        err = np.zeros((i2 - i1, n), np.float32)
        for j in range(i1, i2):
            if (j - i1) % micro == 0:  # a micro-block starts: fix the groups starting in it
                for g in range(-(-j // group), -(-min(j + micro, i2) // group)):
                    params[g] = param(rows[g * group: (g + 1) * group])[0]
            q[j] = rnd(rows[j], params[j // group])
            err[j - i1] = (rows[j] - q[j]) / upper[j, j]
            rows[j + 1: i2] -= upper[j, j + 1: i2, None] * err[j - i1]
        rows[i2:] -= upper[i1:i2, i2:].T @ err
    params = np.array(params)
    per_element = params[np.arange(k) // group]
    if fmt.kind == "mx":
        codes, scales = formats.element_codes(np.ldexp(q, -per_element), fmt.elem), (params + 127).astype(np.uint8)
    else:
        codes, scales = np.rint(q / per_element).astype(np.int8), params.astype(np.float32)
    out_codes, out_scales = np.empty_like(codes), np.empty_like(scales)
    out_codes[perm], out_scales[perm[::group] // group] = codes, scales
    return out_codes, out_scales


def grid_steps(codes, fmt_name):
    """Index of each code's value in the sorted element grid (MX) or the integer code itself (int): codes one grid
    step apart differ by 1."""
    fmt = formats.parse_format(fmt_name)
    if fmt.kind == "int" or fmt.elem.integer_codes:
        return codes.astype(np.int32)
    values = formats.element_values(fmt)
    grid = np.unique(values[np.isfinite(values)])
    return np.searchsorted(grid, values[codes]).astype(np.int32)


@pytest.mark.parametrize("fmt, block, micro, act_order, k", [
    ("mxint4-128", 128, None, True, 576),  # the defaults of mxonnx quantize; 4.5 MX blocks
    ("mxint4-32", 128, 64, True, 200),  # B1 > B2 > b, partial last block
    ("mxfp4-32", 64, None, False, 256),
    ("mxint8-128", 256, 128, True, 384),
    ("int4", 128, None, True, 256),  # per-channel scale, act-order by channel
    ("int4-g128", 128, None, False, 320),
])
def test_fast_gptq_matches_the_plain_algorithm(fmt, block, micro, act_order, k):
    # The factor is computed in float32 (the plain one in float64) and the updates are summed in another order, so
    # a channel's weight may land on the other side of a rounding boundary: its code differs by one grid step and
    # the rest of that output channel follows another, equally good path (where a later code may differ too, by
    # a step or, rarely, two). Such flips stay rare (none in most of these cases), the exponents/scales almost all
    # agree, and the GPTQ objective is no worse than the plain one's within 1e-3.
    x, w = correlated_layer(11, k=k, n=96, tokens=2 * k)
    x[:, 7] = 0.0  # one dead channel
    h = hessian_of(x)
    codes, scales = gptq_quantize(w, h, fmt, block_size=block, micro_block=micro, act_order=act_order)
    ref_codes, ref_scales = plain_blocked_gptq(w, h, fmt, block, micro, act_order=act_order)
    assert codes.dtype == ref_codes.dtype and scales.dtype == ref_scales.dtype
    steps = np.abs(grid_steps(codes, fmt) - grid_steps(ref_codes, fmt))
    assert np.mean(steps > 0) <= 2e-3
    # int{d}-g{b}: a later group's float32 scale is max|w| / qmax of weights the float rounding moved
    same = scales == ref_scales if scales.dtype == np.uint8 else np.isclose(scales, ref_scales, rtol=1e-5, atol=0)
    assert np.mean(~same) <= 2e-3
    same_scale = np.repeat(same, formats.parse_format(fmt).block_size or k, axis=0)[:k]
    assert steps[same_scale].max(initial=0) <= 2 and np.mean(steps > 1) <= 2e-4
    ours = output_error(x, w, formats.dequantize(codes, scales, fmt, axis=0))
    plain = output_error(x, w, formats.dequantize(ref_codes, ref_scales, fmt, axis=0))
    assert ours <= plain * (1 + 1e-3)


@pytest.mark.parametrize("fmt", FORMATS + ["mxfp8e5m2-32", "mxfp6e3m2-32", "int8"])
def test_row_rounding_is_the_formats_arithmetic(fmt):
    """The per-row rounding of the column loop, with its per-group factors prepared once, gives exactly
    formats.quantize_dequantize_with_exponent / _with_scale (including saturation, zeros and tiny values)."""
    from mxonnx.gptq import _rows

    parsed = formats.parse_format(fmt)
    rng = np.random.default_rng(12)
    w = (rng.standard_normal((64, 200)) * np.exp2(rng.integers(-30, 30, (64, 1)))).astype(np.float32)
    w[3] = 0.0
    w[5, :10] = 1e-40  # float32 subnormals
    params = (formats.shared_exponents(w, parsed, axis=0) if parsed.kind == "mx"
              else formats.fixed_point_scales(w, parsed, axis=0))
    params = params[:1] + (np.arange(200) % 3 - 1 if parsed.kind == "mx" else 0)  # later rows saturate or shrink
    rows = _rows(parsed, 64)
    prepared, out, v = rows.prepare(params[0]), np.empty(200, np.float32), np.empty(200, np.float32)
    for w_j in w:
        with np.errstate(over="ignore"):
            rows.round(w_j, prepared, out, v)
        expected = (formats.quantize_dequantize_with_exponent(w_j, params[0], parsed) if parsed.kind == "mx"
                    else formats.quantize_dequantize_with_scale(w_j, params[0], parsed))
        np.testing.assert_array_equal(out.view(np.int32), expected.view(np.int32))


@pytest.mark.parametrize("order_unit, k", [(None, 200), (32, 200), (128, 700)])  # 700: several Cholesky panels
def test_factor_is_the_inverse_of_the_cholesky_factor_of_the_inverse(order_unit, k):
    # factor.upper is R^ = R diag(R)^-1 for R upper triangular with H_d = R R^T, so that R^-1 is U, the upper
    # Cholesky factor of H_d^-1 = U^T U that Algorithm 1 starts from (H_d: dampened, dead channels at 1, in
    # quantization order): R^^-1 = diag(R) U, the rows of U over their diagonal entries
    x, _ = correlated_layer(13, k=k, n=8, tokens=2 * k)
    x[:, [3, 150]] = 0.0
    h = hessian_of(x)
    before = h.copy()
    factor = inverse_hessian_factor(h, 0.01, order_unit=order_unit)
    np.testing.assert_array_equal(h, before)  # the caller's Hessian is left alone
    r_hat = factor.upper
    assert r_hat.dtype == np.float32 and r_hat.flags.c_contiguous
    assert not np.tril(r_hat, -1).any()
    np.testing.assert_allclose(np.diagonal(r_hat), 1, rtol=1e-6)
    diag = np.diagonal(h).copy()
    diag[factor.dead] = 1.0
    hd = h.copy()
    hd[np.arange(k), np.arange(k)] = diag + 0.01 * diag.mean()
    hd = hd[np.ix_(factor.perm, factor.perm)]
    u = np.linalg.cholesky(np.linalg.inv(hd)).T
    u_hat = np.linalg.inv(r_hat.astype(np.float64))
    np.testing.assert_allclose(u_hat, u / np.diagonal(u)[:, None], rtol=0, atol=1e-4 * np.abs(u_hat).max())
    r = r_hat.astype(np.float64) / np.diagonal(u)  # R = R^ diag(R), diag(R) = 1 / diag(U)
    np.testing.assert_allclose(r @ r.T, hd, rtol=0, atol=1e-5 * np.abs(hd).max())
    position = np.argsort(factor.perm)[[3, 150]]  # dead channels stay exactly decoupled
    assert not np.delete(r_hat[position], position, axis=1).any()
    assert not np.delete(r_hat[:, position], position, axis=0).any()


def test_a_cholesky_failing_in_a_later_panel_raises_the_dampening():
    # positive definite but for one direction spread over the first channels, which come last in the reversed
    # order the Cholesky factors: it fails after its first panels have succeeded
    k = 600
    rng = np.random.default_rng(14)
    basis, _ = np.linalg.qr(rng.standard_normal((k, k)))
    eig = np.ones(k)
    eig[0] = -0.05
    direction = np.zeros(k)
    direction[:40] = rng.standard_normal(40)
    direction /= np.linalg.norm(direction)
    basis[:, 0] = direction
    basis, _ = np.linalg.qr(basis)
    h = basis * eig @ basis.T
    with pytest.warns(HessianDampingWarning, match="damp raised to 0.1"):
        factor = inverse_hessian_factor(h, 0.01)
    hd = h + 0.1 * np.mean(np.diag(h)) * np.eye(k)
    u = np.linalg.cholesky(np.linalg.inv(hd)).T
    np.testing.assert_allclose(np.linalg.inv(factor.upper.astype(np.float64)), u / np.diagonal(u)[:, None], atol=1e-4)


@pytest.mark.parametrize("scale", [3e-7, 3e5])
def test_hessian_scale_does_not_matter(scale):
    # GPTQ depends on H only up to a factor (the dampening is relative): activations of any magnitude give the
    # same codes, up to the float rounding of the scaled factor
    x, w = correlated_layer(15, k=384, n=64, tokens=768)
    h = hessian_of(x)
    codes, scales = gptq_quantize(w, h, "mxint4-128", act_order=True)
    scaled_codes, scaled_scales = gptq_quantize(w, h * scale, "mxint4-128", act_order=True)
    assert np.mean(codes != scaled_codes) <= 1e-3 and np.mean(scales != scaled_scales) <= 1e-3
