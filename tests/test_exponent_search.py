"""Output-aware MX shared exponents inside GPTQ (``--exponent-search``, project issue 19): each group's exponent is
the one of E-1, E, E+1 with the least GPTQ loss. Checked against a plain float64 Eq. 8 written here, and on random
layers against the OCP rule."""

from __future__ import annotations

import numpy as np
import pytest

from mxonnx import formats
from mxonnx.config import QuantizeConfig
from mxonnx.errors import InputError
from mxonnx.gptq import (GptqWeightProvider, _MxRows, choose_exponents, gptq_quantize, round_with_exponent_choice,
                         searches_exponents_by_default)
from mxonnx.quantize import check_config
from test_gptq import correlated_layer, hessian_of, output_error


def _group_loss(w: np.ndarray, u: np.ndarray, fmt, exponent: np.ndarray) -> np.ndarray:
    """Eq. 8 over one group in float64 with fixed exponents; per output channel sum_j ((w_j - q_j) / U_jj)^2."""
    w = w.astype(np.float64).copy()
    loss = np.zeros(w.shape[1])
    elem_max = formats.parse_format(fmt).elem.max_norm
    for j in range(len(w)):
        v = np.clip(w[j] * 2.0 ** -exponent, -elem_max, elem_max)
        q = np.rint(v * 4) / 4 * 2.0 ** exponent  # MXINT4 elements are k / 4
        e = (w[j] - q) / u[j, j]
        loss += e ** 2
        w[j + 1:] -= np.outer(u[j, j + 1:], e)
    return loss


def test_choice_is_the_least_loss_candidate():
    fmt, b, n = "mxint4-16", 16, 40
    rng = np.random.default_rng(3)
    a = rng.standard_normal((64, b))
    h = a.T @ a / 64 + 0.05 * np.eye(b)
    upper = np.linalg.cholesky(np.linalg.inv(h)).T  # H^-1 = U^T U
    r_diag = 1 / np.diag(upper)
    w = (rng.standard_normal((b, n)) * np.geomspace(0.02, 0.3, n)).astype(np.float32)
    w[rng.integers(b), :] *= 4  # an outlier row: clipping it (E-1) competes with resolution
    ocp = formats.shared_exponents(w, fmt, axis=0)[0]
    chosen = choose_exponents(w, (r_diag[:, None] * upper).astype(np.float32), np.square(r_diag).astype(np.float32),
                              _MxRows(formats.parse_format(fmt), b), ocp)
    losses = np.stack([_group_loss(w, upper, fmt, ocp + o) for o in (-1, 0, 1)])
    expected = ocp + np.array([-1, 0, 1])[np.argmin(losses, axis=0)]
    close = np.sort(losses, axis=0)[1] - np.sort(losses, axis=0)[0] < 1e-6 * losses.min(axis=0)  # float32 ties
    np.testing.assert_array_equal(chosen[~close], expected[~close])
    assert (chosen != ocp).any()  # the OCP exponent is not always the best one here


@pytest.mark.parametrize("fmt", ["mxint4-32", "mxint4-128", "mxfp4-32"])
def test_search_lowers_the_output_error(fmt):
    x, w = correlated_layer(7, k=256, n=96)
    h = hessian_of(x)
    base = gptq_quantize(w, h, fmt, act_order=True)
    searched = gptq_quantize(w, h, fmt, act_order=True, exponent_search=True)
    errors = [output_error(x, w, formats.dequantize(c, s, fmt, axis=0)) for c, s in (base, searched)]
    assert errors[1] < errors[0]
    exponents = [s.astype(int) for _, s in (base, searched)]
    assert (exponents[1] != exponents[0]).mean() > 0.01  # (the two runs' weights drift apart: not only +-1)


def test_search_needs_mx_weights():
    for method in ("gptq", "rtn", "awq"):
        with pytest.raises(InputError, match="exponent-search"):
            check_config(QuantizeConfig(method=method, weights="int4", acts="none", exponent_search=True))
    check_config(QuantizeConfig(method="awq", exponent_search=True))  # without GPTQ: from the statistics


@pytest.mark.parametrize("fmt", ["mxint4-32", "mxint4-128", "mxfp4-32"])
def test_rounding_choice_is_gptq_with_a_diagonal_hessian(fmt):
    """Without GPTQ the exponents are chosen by ``sum_j h_j (w_j - q_j)^2``: bit for bit GPTQ's own choice with
    ``H = diag(2 m)`` (which carries no error between channels), and a lower weighted error than the OCP rule."""
    rng = np.random.default_rng(5)
    k, n = 256, 96
    w = (rng.standard_normal((k, n)) * rng.lognormal(0, 1, (k, 1))).astype(np.float32)
    m = rng.lognormal(0, 1.5, k)
    chosen = round_with_exponent_choice(w, m, fmt)
    reference = gptq_quantize(w, np.diag(2 * m), fmt, act_order=False, exponent_search=True)
    for c, r in zip(chosen, reference):
        np.testing.assert_array_equal(c, r)
    ocp = formats.quantize(w, fmt, axis=0)
    assert (chosen[1] != ocp[1]).mean() > 0.05

    def weighted_error(codes_scales):
        return float((np.square(w - formats.dequantize(*codes_scales, fmt, axis=0)) * m[:, None]).sum())

    assert weighted_error(chosen) < 0.97 * weighted_error(ocp)
    tie = round_with_exponent_choice(np.zeros_like(w), m, fmt)  # all candidates equal: E (the OCP rule) is kept
    for c, r in zip(tie, formats.quantize(np.zeros_like(w), fmt, axis=0)):
        np.testing.assert_array_equal(c, r)


def test_rtn_search_in_the_driver(tiny_onnx, tiny_text, tmp_path):
    """``--method rtn --exponent-search`` calibrates and stores, for every linear, the exponents of
    round_with_exponent_choice on its input's mean squares (here every block on the float model's inputs, measured
    by collect_statistics); the codes are those of the chosen exponents, so the model differs from plain RTN."""
    import onnx
    import onnx_ir as ir

    from mxonnx.calibrate import collect_statistics
    from mxonnx.passes.llama_structure import find_decoder_blocks
    from mxonnx.quantize import quantize_model
    from mxonnx.stats import group_key

    settings = dict(method="rtn", weights="mxint4-16", acts="mxint8-16", lm_head="none", calib_path=tiny_text,
                    calib_samples=3, calib_seqlen=48, sequential=False, progress=False)
    config = QuantizeConfig(exponent_search=True, **settings)
    quantize_model(tiny_onnx, tmp_path / "search", config)
    quantize_model(tiny_onnx, tmp_path / "plain", QuantizeConfig(**settings))
    model = ir.load(tiny_onnx / "model.onnx")
    blocks = find_decoder_blocks(model)
    stats = collect_statistics(model, blocks, tiny_onnx, config, squares=True)
    stored = {name: {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / name / "model.onnx")).graph.initializer}
              for name in ("search", "plain")}
    changed = 0
    for block in blocks:
        for group, linears in block.groups().items():
            for linear in linears:
                _, scales = round_with_exponent_choice(np.asarray(linear.weight_array, np.float32),
                                                       stats[group_key(block, group)].mean_sq, "mxint4-16")
                np.testing.assert_array_equal(stored["search"][f"{linear.name}.weight_exponents"], scales)
                changed += int((scales != stored["plain"][f"{linear.name}.weight_exponents"]).any())
    assert changed >= 7  # most linears move some exponent


@pytest.mark.parametrize(("fmt", "expected"), [
    ("mxint4-128", True), ("mxint4-16", True), ("mxint8-32", True),  # the measured default
    ("mxfp4-32", False), ("mxfp8e4m3-32", False),                    # MXFP: the OCP rule until measured
    ("int4", False), ("int4-g32", False), ("none", False),
])
def test_exponent_search_default_by_format(fmt, expected):
    assert searches_exponents_by_default(fmt) is expected


@pytest.mark.parametrize(("settings", "expected"), [
    (dict(method="awq+gptq"), None),  # each linear by its own format
    (dict(method="rtn"), False),      # no GPTQ: GPTQ's search is off (RTN's is rounds_with_exponent_choice)
    (dict(method="awq+gptq", exponent_search=False), False),  # --no-exponent-search
    (dict(method="gptq", weights="mxfp4-32", exponent_search=True), True),
])
def test_exponent_search_setting(settings, expected):
    assert QuantizeConfig(**settings).searches_exponents is expected


def test_provider_decides_per_linear_format():
    """With no setting, a mixed-format GPTQ run searches the MXINT linear's exponents and not the MXFP one's: the
    provider's result equals gptq_quantize with the search on for one and off for the other."""
    x, w = correlated_layer(3, k=64, n=8)
    h = hessian_of(x)
    on, off = (gptq_quantize(w, h, "mxint4-16", block_size=32, act_order=True, exponent_search=s) for s in (True, False))
    assert not np.array_equal(on[1], off[1])  # the search changes some exponent here, so the check below can fail
    fmts = {"a": "mxint4-16", "b": "mxfp4-16"}
    provider = GptqWeightProvider({"a": h, "b": h}, fmts, block_size=32, act_order=True, exponent_search=None)
    for name, search in (("a", True), ("b", False)):
        expected = gptq_quantize(w, h, fmts[name], block_size=32, act_order=True, exponent_search=search)
        got = provider(name, w)
        for e, g in zip(expected, got):
            np.testing.assert_array_equal(e, g)
