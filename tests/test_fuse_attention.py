"""The attention fusion of ``create_session(fuse=True)`` (passes/fuse_attention.py, passes/fuse_inference.py).

Both sessions really run: the unfused one the graph as saved, the fused one RotaryEmbedding + GroupQueryAttention
(``attention="gqa"``, a session without the native library) or + the native com.mxonnx.GroupAttention
(``attention="native"``). They compute the same operations in another order, so their logits agree within float32 reassociation:
``|fused - unfused| <= BOUND * max |unfused logits|`` at every real (not padded) position, in prefill and in decode
steps fed with each session's own cache (SmolLM2-135M measures 2^-18.6 at 64 tokens).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from conftest import _export, make_tiny_llama
from mxonnx import formats
from mxonnx.passes.fuse_inference import fuse_for_inference, model_config
from mxonnx.ops import schema
from mxonnx.session import create_session, native_library

BOUND = 2.0**-14
LAYERS = 2
KV_FORMAT = "mxint4-8"  # coarse, so a cache value off the grid would show


@pytest.fixture(scope="module")
def mha_untied(tmp_path_factory):
    """Multi-head attention (kv heads = heads) and an untied lm_head, with past."""
    folder = tmp_path_factory.mktemp("mha")
    hf = make_tiny_llama(folder / "hf", seed=1, kv_heads=4, tie_word_embeddings=False)
    return _export(hf, folder / "onnx", past=True)


@pytest.fixture(scope="module")
def kv_quantized(tiny_onnx, tmp_path_factory):
    from mxonnx.config import QuantizeConfig
    from mxonnx.quantize import quantize_model

    out = tmp_path_factory.mktemp("fuse_kv") / "kv"
    quantize_model(tiny_onnx, out, QuantizeConfig(weights="none", acts="none", kv=KV_FORMAT, method="rtn",
                                                  progress=False))
    return out


def _op_counts(model: ir.Model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def _padded_batch(vocab: int, length: int = 9, pad: int = 3):
    """Two rows of ids; row 1 left-padded by ``pad`` (mask 0, positions as optimum computes them)."""
    ids = np.random.default_rng(0).integers(3, vocab, size=(2, length))
    mask = np.ones((2, length), dtype=np.int64)
    mask[1, :pad] = 0
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    return ids, mask, positions


def _run_steps(session, config, ids, mask, positions, steps: int = 3):
    """Prefill, then ``steps`` greedy decode steps on the session's own cache: the logits and caches of each run."""
    names = [o.name for o in session.get_outputs()]
    past = [i.name for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    feed = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
    feed.update({n: np.zeros((ids.shape[0], config["num_key_value_heads"], 0, head_dim), np.float32) for n in past})
    runs = [dict(zip(names, session.run(names, feed)))]
    for _ in range(steps if past else 0):
        out = runs[-1]
        mask = np.concatenate([mask, np.ones((ids.shape[0], 1), dtype=np.int64)], axis=1)
        positions = positions[:, -1:] + 1
        step = {"input_ids": out["logits"][:, -1].argmax(-1)[:, None].astype(np.int64), "attention_mask": mask,
                "position_ids": positions}
        step.update({n: out[n.replace("past_key_values.", "present.")] for n in past})
        runs.append(dict(zip(names, session.run(names, step))))
    return runs


def _assert_within_bound(fused, unfused, real: np.ndarray | None = None):
    scale = np.abs(unfused).max()
    diff = np.abs(fused - unfused)
    if real is not None:
        diff = diff[real]
    assert diff.max() <= BOUND * scale, f"off by {diff.max():.3g}, bound {BOUND * scale:.3g}"


@pytest.fixture(params=["gqa_tied", "nopast", "mha_untied"])
def folder(request, tiny_onnx, tiny_onnx_nopast, mha_untied):
    return {"gqa_tied": tiny_onnx, "nopast": tiny_onnx_nopast, "mha_untied": mha_untied}[request.param]


@pytest.fixture(params=["gqa", "native"])
def native(request) -> bool:
    """Whether the fused sessions have the native library (GroupAttention) or not (GroupQueryAttention)."""
    if request.param == "native" and native_library() is None:
        pytest.skip("native library not built")
    return request.param == "native"


def test_every_attention_fuses_and_the_interface_stays(folder, native):
    model = ir.load(folder / "model.onnx")
    inputs, outputs = [v.name for v in model.graph.inputs], [v.name for v in model.graph.outputs]
    before = _op_counts(model)
    counts = fuse_for_inference(model, model_config(folder / "model.onnx"), native=native)
    after = _op_counts(model)
    assert counts == {"mx_matmuls": 0, "attentions": LAYERS}
    op, absent = (schema.GROUP_ATTENTION, "GroupQueryAttention") if native else ("GroupQueryAttention", schema.GROUP_ATTENTION)
    assert after[op] == LAYERS and absent not in after and after["RotaryEmbedding"] == 2 * LAYERS
    assert (schema.DOMAIN, schema.GROUP_ATTENTION, "") in model.functions if native else not model.functions
    assert before["Softmax"] == LAYERS and "Softmax" not in after
    assert sum(after.values()) < sum(before.values()) / 2
    assert [v.name for v in model.graph.inputs] == inputs and [v.name for v in model.graph.outputs] == outputs


def test_without_config_nothing_fuses(tiny_onnx):
    model = ir.load(tiny_onnx / "model.onnx")
    assert fuse_for_inference(model, None) == {"mx_matmuls": 0, "attentions": 0}
    assert "GroupQueryAttention" not in _op_counts(model)


def test_logits_and_caches_fused_vs_unfused(folder, native):
    config = model_config(folder / "model.onnx")
    ids, mask, positions = _padded_batch(config["vocab_size"])
    unfused = _run_steps(create_session(folder / "model.onnx"), config, ids, mask, positions)
    fused_session = create_session(folder / "model.onnx", fuse=True, use_native=native)
    fused = _run_steps(fused_session, config, ids, mask, positions)
    assert len(fused) == len(unfused) == (1 if "nopast" in str(folder) else 4)
    for step, (f, u) in enumerate(zip(fused, unfused)):
        assert f.keys() == u.keys()
        real = mask.astype(bool) if step == 0 else None  # padded positions' outputs mean nothing
        _assert_within_bound(f["logits"], u["logits"], real)
        for name in (n for n in u if n.startswith("present.")):
            assert f[name].shape == u[name].shape
            _assert_within_bound(f[name], u[name])


def test_kv_quantized_cache_stays_on_the_grid(kv_quantized, native):
    model = ir.load(kv_quantized / "model.onnx")
    quantizers = _op_counts(model)["MXQuantizeDequantize"]
    assert fuse_for_inference(model, model_config(kv_quantized / "model.onnx"), native=native)["attentions"] == LAYERS
    assert _op_counts(model)["MXQuantizeDequantize"] == quantizers == 2 * LAYERS
    config = model_config(kv_quantized / "model.onnx")
    ids, mask, positions = _padded_batch(config["vocab_size"])
    unfused = _run_steps(create_session(kv_quantized / "model.onnx"), config, ids, mask, positions)
    fused = _run_steps(create_session(kv_quantized / "model.onnx", fuse=True, use_native=native), config, ids, mask,
                       positions)
    for step, (f, u) in enumerate(zip(fused, unfused)):
        _assert_within_bound(f["logits"], u["logits"], mask.astype(bool) if step == 0 else None)
        for name in (n for n in f if n.startswith("present.")):
            cache = f[name]
            np.testing.assert_array_equal(formats.quantize_dequantize(cache, KV_FORMAT, -1), cache)
            # the same grid as the unfused cache: values differ at most where a float tie broke the other way
            assert np.mean(cache == u[name]) > 0.99


def test_generation_through_optimum_with_the_fused_session(tiny_onnx):
    from mxonnx.generate import generate

    fused = generate(tiny_onnx, "w1 w2 w3 w4", max_new_tokens=12, raw=True, fuse=True)
    unfused = generate(tiny_onnx, "w1 w2 w3 w4", max_new_tokens=12, raw=True)
    assert fused["tokens"] == 12 and fused["token_ids"] == unfused["token_ids"]


def test_positions_beyond_the_rotary_caches_fail_the_run(tiny_onnx):
    """The caches hold ``max_position_embeddings`` positions; a later one is an error, never a wrong number."""
    config = model_config(tiny_onnx / "model.onnx")
    session = create_session(tiny_onnx / "model.onnx", fuse=True)
    ids, mask, _ = _padded_batch(config["vocab_size"], pad=0)
    late = np.arange(ids.shape[1])[None].repeat(2, 0) + config["max_position_embeddings"]
    with pytest.raises(Exception, match="out of range"):
        _run_steps(session, config, ids, mask, late, steps=0)
    assert _run_steps(session, config, ids, mask, late - ids.shape[1], steps=0)[0]["logits"].shape[:2] == ids.shape
