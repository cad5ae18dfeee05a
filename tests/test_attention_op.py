"""com.mxonnx.GroupAttention: the native kernel (every ISA), the ONNX function body and onnxruntime's
GroupQueryAttention against a float64 reference, on tiny shapes.

Bound, per output element (u = 2^-24; rows with finite weights): with each score computed to within
``delta = (D + 2) u (|c| sum_d |q_d k_jd| + |s_j|)``, exp to within ``EXP_ERROR`` relative, and the sums over T keys
rounded ``T u`` each,

    |O - O_ref| <= (2 delta_max + 2 EXP_ERROR + (2 T + 8) u) sum_j w_j |v_j|

(a score off by ``e_j`` moves ``w_j`` by at most ``2 max|e|`` relative). Rows whose keys are all masked give exactly 0.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from mxonnx.ops import attention, schema
from mxonnx.session import create_session, native_library

U = 2.0**-24
EXP_ERROR = 2.0**-21  # the vector exp's relative error (native/mx_attention.h); std::exp and onnxruntime's are tighter
ISAS = ["portable", "avx2", "avx512vnni"]  # MXONNX_NATIVE_ISA caps (each the vector path where the CPU has it)
needs_native = pytest.mark.skipif(native_library() is None, reason="native library not built")


def _model(b, s, p, heads, kv, d, scale, op="native", bias_batch=None, opset=schema.STANDARD_OPSET,
           dynamic: bool = False) -> bytes:
    """One-node model; ``dynamic``: inputs declared with unknown dimensions."""
    t = p + s
    inputs = [helper.make_tensor_value_info("q", TensorProto.FLOAT, [b, s, heads * d]),
              helper.make_tensor_value_info("k", TensorProto.FLOAT, [b, s, kv * d]),
              helper.make_tensor_value_info("v", TensorProto.FLOAT, [b, s, kv * d]),
              helper.make_tensor_value_info("past_key", TensorProto.FLOAT, [b, kv, p, d]),
              helper.make_tensor_value_info("past_value", TensorProto.FLOAT, [b, kv, p, d]),
              helper.make_tensor_value_info("bias", TensorProto.FLOAT, [bias_batch or b, 1, s, t])]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n, shape in
               (("O", [b, s, heads * d]), ("present_key", [b, kv, t, d]), ("present_value", [b, kv, t, d]))]
    if dynamic:
        for value in inputs:
            for dim in value.type.tensor_type.shape.dim:
                dim.Clear()
    functions = []
    if op == "gqa":
        inputs += [helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [b]),
                   helper.make_tensor_value_info("total", TensorProto.INT32, [])]
        node = helper.make_node("GroupQueryAttention", ["q", "k", "v", "past_key", "past_value", "seqlens_k", "total",
                                                        "", "", "", "bias"], [o.name for o in outputs],
                                domain="com.microsoft", num_heads=heads, kv_num_heads=kv, scale=scale)
    else:
        node = helper.make_node(schema.GROUP_ATTENTION, ["q", "k", "v", "past_key", "past_value", "bias"],
                                [o.name for o in outputs], domain=schema.DOMAIN, num_heads=heads, kv_num_heads=kv,
                                scale=scale)
        functions = [attention.function_proto(opset)]
    model = helper.make_model(helper.make_graph([node], "attention", inputs, outputs), functions=functions,
                              opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(schema.DOMAIN, 1),
                                             helper.make_opsetid("com.microsoft", 1)], ir_version=schema.IR_VERSION)
    if op != "gqa":
        onnx.checker.check_model(model)
    return model.SerializeToString()


def _mask(b, s, p, pad: int, window: int | None = None, holes: bool = False) -> np.ndarray:
    """Causal additive mask [b, 1, s, p + s]; batch entry 1 left-padded by ``pad`` (its padded query rows have every
    key masked, as the export's mask does); ``window``: keys older than that are masked; ``holes``: some random keys
    inside the range masked too."""
    t = p + s
    i, j = np.arange(s)[:, None] + p, np.arange(t)[None, :]
    allowed = np.broadcast_to(j <= i, (b, s, t)).copy()
    if window is not None:
        allowed &= j > i - window
    if b > 1 and pad:
        allowed[1, :, :pad] = False
        allowed[1, : max(0, pad - p), :] = False
    if holes:
        allowed &= np.random.default_rng(7).random((b, s, t)) > 0.2
    return np.where(allowed, 0.0, -np.inf).astype(np.float32)[:, None]


def _feeds(b, s, p, heads, kv, d, bias, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    f = {"q": rng.normal(size=(b, s, heads * d)) * 2, "k": rng.normal(size=(b, s, kv * d)),
         "v": rng.normal(size=(b, s, kv * d)), "past_key": rng.normal(size=(b, kv, p, d)),
         "past_value": rng.normal(size=(b, kv, p, d)), "bias": bias}
    f = {k: np.asarray(v, np.float32) for k, v in f.items()}
    f["bias"] = np.where(np.isinf(bias), bias, bias + rng.normal(size=bias.shape).astype(np.float32) * 0.5)
    return f


def reference(f: dict, heads: int, kv: int, scale: float):
    """float64 attention of the module docstring: (O, present_key, present_value, bound factor, sum_j w_j |v_j|)."""
    b, s, _ = f["q"].shape
    d = f["q"].shape[-1] // heads
    g = heads // kv
    key = np.concatenate([f["past_key"], f["k"].reshape(b, s, kv, d).transpose(0, 2, 1, 3)], axis=2)
    value = np.concatenate([f["past_value"], f["v"].reshape(b, s, kv, d).transpose(0, 2, 1, 3)], axis=2)
    q = f["q"].reshape(b, s, heads, d).transpose(0, 2, 1, 3).astype(np.float64)
    k64, v64 = np.repeat(key, g, axis=1).astype(np.float64), np.repeat(value, g, axis=1).astype(np.float64)
    scores = scale * q @ k64.transpose(0, 1, 3, 2) + f["bias"].astype(np.float64)
    magnitude = abs(scale) * np.abs(q) @ np.abs(k64).transpose(0, 1, 3, 2)
    with np.errstate(invalid="ignore"):
        w = np.exp(scores - scores.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
    w = np.where(np.isnan(w), 0.0, w)
    t = key.shape[2]
    finite = np.isfinite(scores)
    delta = np.where(finite, (d + 2) * U * (magnitude + np.abs(np.where(finite, scores, 0))), 0).max(-1, keepdims=True)
    factor = 2 * delta + 2 * EXP_ERROR + (2 * t + 8) * U
    out = (w @ v64).transpose(0, 2, 1, 3).reshape(b, s, heads * d)
    spread = (w @ np.abs(v64) * factor).transpose(0, 2, 1, 3).reshape(b, s, heads * d)
    return out, key, value, spread


def _run(model: bytes, feeds: dict, use_native: bool = True):
    return create_session(model, threads=1, use_native=use_native).run(None, feeds)


CASES = {  # b, s, p, heads, kv, head_dim, pad, window, holes
    "decode": (2, 1, 9, 4, 2, 64, 3, None, False),
    "prefill": (2, 11, 0, 6, 2, 64, 4, None, False),
    "prefill_past": (2, 7, 5, 6, 3, 32, 6, None, True),
    "mha_window": (1, 13, 3, 2, 2, 16, 0, 5, False),
    "odd_head_dim": (2, 5, 2, 3, 1, 12, 2, None, False),  # head_dim not a multiple of 8: the portable loops
}


@pytest.mark.parametrize("case", list(CASES))
def test_native_body_and_gqa_within_the_bound(case, monkeypatch):
    b, s, p, heads, kv, d, pad, window, holes = CASES[case]
    scale = 1 / np.sqrt(d)
    feeds = _feeds(b, s, p, heads, kv, d, _mask(b, s, p, pad, window, holes))
    expected, key, value, spread = reference(feeds, heads, kv, scale)
    masked = np.isneginf(feeds["bias"]).all(-1)[:, 0]  # [b, s]: query rows without a key (padded prompt positions)
    assert masked.any() == (pad > p)
    results = {"body": _run(_model(b, s, p, heads, kv, d, scale), feeds, use_native=False)}
    if b == 1 or s == 1 or p == 0:  # GroupQueryAttention takes a past with a prompt only for batch 1
        gqa_feeds = dict(feeds, seqlens_k=np.full(b, p + s - 1, np.int32), total=np.array(p + s, np.int32))
        gqa = _run(_model(b, s, p, heads, kv, d, scale, op="gqa"), gqa_feeds, use_native=False)
        results["gqa"] = [np.where(np.isnan(gqa[0]), 0, gqa[0]), *gqa[1:]]  # the fusion's guard on O
    if native_library() is not None:
        for isa in ISAS:
            monkeypatch.setenv("MXONNX_NATIVE_ISA", isa)  # read when the session creates its kernels
            results[isa] = _run(_model(b, s, p, heads, kv, d, scale), feeds)
    for name, (out, present_key, present_value) in results.items():
        np.testing.assert_array_equal(present_key, key, err_msg=name)
        np.testing.assert_array_equal(present_value, value, err_msg=name)
        error = np.abs(out - expected)
        assert (error <= spread).all(), f"{name}: off by {(error / np.maximum(spread, 1e-30)).max():.2f} x the bound"
        if name != "gqa":
            assert not np.any(out[masked]), name  # exactly 0
    if native_library() is None:
        pytest.skip("native library not built: function body and GroupQueryAttention only")


@needs_native
def test_bias_broadcast_over_the_batch():
    b, s, p, heads, kv, d = 2, 4, 3, 4, 2, 16
    feeds = _feeds(b, s, p, heads, kv, d, _mask(1, s, p, 0))
    model = _model(b, s, p, heads, kv, d, 0.25, bias_batch=1)
    native, body = _run(model, feeds)[0], _run(model, feeds, use_native=False)[0]
    expected, _, _, spread = reference(feeds, heads, kv, 0.25)
    assert (np.abs(native - expected) <= spread).all() and (np.abs(body - expected) <= spread).all()


@needs_native
@pytest.mark.parametrize("isa", ISAS)
def test_softmax_exp_error(isa, monkeypatch):
    """One query row (q = e_0, scale 1, bias 0) against keys k_j = x_j e_0, so the scores are exactly x_j (max 0),
    and one-hot values v_j = e_j, so O_j = exp(x_j) / sum: O_j / O_max = exp(x_j) to within EXP_ERROR (+ the one
    product by 1 / sum, u) where O_j is a normal float (x_j >= -80); below -87.3 (exp < 2^-126) the weight is at most
    2^-126 (the vector path gives 0)."""
    monkeypatch.setenv("MXONNX_NATIVE_ISA", isa)
    t = d = 64
    x = np.concatenate([[0.0, -np.inf, -88.0, -87.5], -np.geomspace(1e-6, 87.2, t - 4)]).astype(np.float32)
    keys = np.zeros((1, 1, t, d), np.float32)
    keys[0, 0, :, 0] = x
    keys[0, 0, 1, 0] = 0.0  # a masked key (bias -inf): score -inf
    values = np.eye(t, d, dtype=np.float32)[None, None]
    q = np.zeros((1, 1, d), np.float32)
    q[0, 0, 0] = 1
    bias = np.zeros((1, 1, 1, t), np.float32)
    bias[..., 1] = -np.inf
    feeds = {"q": q, "k": keys[0, 0, -1:][None], "v": values[0, 0, -1:][None], "past_key": keys[:, :, :-1],
             "past_value": values[:, :, :-1], "bias": bias}
    out = _run(_model(1, 1, t - 1, 1, 1, d, 1.0), feeds)[0][0, 0]
    ratio = out / out[0]
    exact = np.exp(x.astype(np.float64))
    normal = x >= -80
    assert ratio[1] == 0 and normal.sum() > t / 2
    np.testing.assert_array_less(np.abs(ratio[normal] - exact[normal]), (EXP_ERROR + U) * exact[normal])
    assert (ratio[(x < -87.3) & (x > -np.inf)] <= 2.0**-126).all()


@needs_native
def test_native_kernel_runs_and_checks_shapes():
    model = _model(1, 2, 3, 4, 2, 8, 0.5, dynamic=True)
    feeds = _feeds(1, 2, 3, 4, 2, 8, _mask(1, 2, 3, 0))
    session = create_session(model, threads=1)
    with pytest.raises(Exception, match="GroupAttention: attention_bias must be"):  # the kernel's message: it runs
        session.run(None, dict(feeds, bias=feeds["bias"][..., :-1]))
    bad = onnx.load_from_string(_model(1, 2, 3, 4, 2, 8, 0.5))
    next(a for a in bad.graph.node[0].attribute if a.name == "kv_num_heads").i = 3
    with pytest.raises(Exception, match="num_heads a multiple of kv_num_heads"):
        create_session(bad.SerializeToString(), threads=1).run(None, feeds)


def test_body_for_an_older_opset_and_refusal():
    b, s, p, heads, kv, d = 1, 3, 2, 2, 1, 8
    feeds = _feeds(b, s, p, heads, kv, d, _mask(b, s, p, 0))
    out = _run(_model(b, s, p, heads, kv, d, 0.5, opset=14), feeds, use_native=False)[0]
    expected, _, _, spread = reference(feeds, heads, kv, 0.5)
    assert (np.abs(out - expected) <= spread).all()
    with pytest.raises(ValueError, match="opset >= 13"):
        attention.function_proto(12)
