"""``mxonnx lower``: the inline, qdq and matmulnbits graphs compute what the MX graph computes, with no
``com.mxonnx`` op left, on stock onnxruntime (no native library)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from mxonnx.cli import main
from mxonnx.config import QuantizeConfig
from mxonnx.lower import lower_model
from mxonnx.quantize import quantize_model
from mxonnx.session import create_session


def _logits(folder, ids):
    sess = create_session(folder / "model.onnx", use_native=False)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(ids.shape[1])[None]}
    return sess.run(["logits"], {k: v for k, v in feeds.items() if k in {i.name for i in sess.get_inputs()}})[0]


@pytest.fixture(scope="module")
def mx_model(tiny_onnx_nopast, tmp_path_factory):
    out = tmp_path_factory.mktemp("lower") / "w4a8"
    quantize_model(tiny_onnx_nopast, out, QuantizeConfig(weights="mxint4-32", acts="mxint8-32", method="rtn", progress=False))
    return out


@pytest.mark.parametrize("target,tolerance", [("inline", 0.0), ("qdq", 0.0), ("matmulnbits", 1e-5)])
def test_lowered_graph_matches(mx_model, tmp_path, target, tolerance):
    out = tmp_path / target
    result = lower_model(mx_model, out, target)
    model = onnx.load(out / "model.onnx", load_external_data=False)
    assert result["custom_ops_left"] == 0
    assert not any(n.domain == "com.mxonnx" for n in model.graph.node)
    assert not model.functions
    op_types = {n.op_type for n in model.graph.node}
    # 14 decoder linears and lm_head (W8A8 MXINT8-32 by default)
    if target == "qdq":
        assert result["dequantize_linear"] == 15 and "DequantizeLinear" in op_types
    if target == "matmulnbits":
        assert result["matmulnbits"] == 15 and "MatMulNBits" in op_types
        # lm_head's MatMul gave the graph output: its MatMulNBits now does, under the same name
        assert [n.op_type for n in model.graph.node if "logits" in n.output] == ["MatMulNBits"]
    ids = np.random.default_rng(0).integers(3, 90, size=(1, 24)).astype(np.int64)
    reference, lowered = _logits(mx_model, ids), _logits(out, ids)
    scale = float(np.abs(reference).max())
    np.testing.assert_allclose(lowered, reference, rtol=0, atol=tolerance * scale)


def test_matmulnbits_refuses_mxfp(tiny_onnx_nopast, tmp_path, capsys):
    mx = tmp_path / "fp4"
    quantize_model(tiny_onnx_nopast, mx, QuantizeConfig(weights="mxfp4-32", acts="none", method="rtn", progress=False))
    assert main(["lower", str(mx), "-o", str(tmp_path / "out"), "--target", "matmulnbits"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mxfp4-32" in err[0] and "MatMulNBits" in err[0]
    assert not (tmp_path / "out").exists()


def test_float_model_is_refused(tiny_onnx_nopast, tmp_path, capsys):
    assert main(["lower", str(tiny_onnx_nopast), "-o", str(tmp_path / "out"), "--target", "inline"]) == 2
    assert "quantize it with MX formats first" in capsys.readouterr().err


def test_lowered_weights_are_made_when_saved(mx_model):
    """Lowering holds no weight data: the new initializers are computed one at a time while the model is saved."""
    import onnx_ir as ir

    from mxonnx.passes.lower import lower

    for target in ("qdq", "matmulnbits"):
        model, _ = lower(ir.load(mx_model / "model.onnx"), target)
        made = [v for v in model.graph.initializers.values()
                if v.name.endswith(("_qdq_scale", "_nbits", "_nbits_scales"))]
        assert len(made) == {"qdq": 15, "matmulnbits": 30}[target]  # lm_head's too
        assert all(isinstance(v.const_value, ir.LazyTensor) for v in made)
