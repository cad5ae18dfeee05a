"""``mxonnx quantize --kv``: keys (after rope) and values MX-quantized along head_dim where they enter the KV cache
(``passes/kv_cache.py``), on the tiny Llama (2 layers, 4/2 heads, head_dim 16)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from mxonnx import formats
from mxonnx.cli import main
from mxonnx.config import LM_HEAD_DEFAULT, QuantizeConfig
from mxonnx.errors import InputError
from mxonnx.inspect import inspect_model
from mxonnx.lower import lower_model
from mxonnx.ops import schema
from mxonnx.passes.kv_cache import KvCachePass, quantize_kv_cache
from mxonnx.passes.llama_structure import find_decoder_blocks
from mxonnx.quantize import quantize_model
from mxonnx.session import create_session, native_library
from conftest import in_memory_proto
from test_ops import qdq_model, run_qdq

HEAD_DIM, KV_HEADS, LAYERS = 16, 2, 2
KV = "mxint4-8"  # coarse: what the cache holds differs clearly from float
W4A8 = {"weights": "mxint4-16", "acts": "mxint8-16", "method": "rtn", "progress": False}


def _quantized(src, out, kv=KV, **overrides):
    quantize_model(src, out, QuantizeConfig(**{**W4A8, "kv": kv, **overrides}))
    return out


@pytest.fixture(scope="module")
def kv_model(tiny_onnx, tmp_path_factory):
    return _quantized(tiny_onnx, tmp_path_factory.mktemp("kv") / "w4a8kv4")


@pytest.fixture(scope="module")
def float_kv_model(tiny_onnx, tmp_path_factory):
    return _quantized(tiny_onnx, tmp_path_factory.mktemp("kv") / "w4a8", kv="none")


def _kv_quantizers(model: ir.Model, fmt: str = KV) -> list[ir.Node]:
    return [n for n in model.graph if n.op_type == schema.QUANTIZE_DEQUANTIZE and n.domain == schema.DOMAIN
            and n.attributes[schema.FORMAT_ATTR].as_string() == fmt]


def _empty_past(session) -> dict[str, np.ndarray]:
    return {i.name: np.zeros((1, KV_HEADS, 0, HEAD_DIM), np.float32) for i in session.get_inputs()
            if i.name.startswith("past_key_values.")}


def _run(session, ids: np.ndarray, start: int = 0, past: dict | None = None) -> dict[str, np.ndarray]:
    """All outputs for tokens ``ids [1, T]`` at positions ``start..``, after ``past`` (default: an empty cache)."""
    names = {i.name for i in session.get_inputs()}
    feed = {"input_ids": ids, "attention_mask": np.ones((1, start + ids.shape[1]), np.int64),
            "position_ids": np.arange(start, start + ids.shape[1], dtype=np.int64)[None]}
    feed = {k: v for k, v in feed.items() if k in names}
    feed.update(past if past is not None else _empty_past(session))
    outputs = [o.name for o in session.get_outputs()]
    return dict(zip(outputs, session.run(outputs, feed)))


def _greedy_with_cache(session, prompt: np.ndarray, steps: int) -> tuple[list[int], list[np.ndarray]]:
    """Greedy decode with the KV cache: prefill, then one token per step feeding ``present.*`` back as past."""
    out = _run(session, prompt)
    tokens, logits, length = [], [], prompt.shape[1]
    for _ in range(steps):
        logits.append(out["logits"][0, -1])
        tokens.append(int(logits[-1].argmax()))
        past = {name.replace("present.", "past_key_values."): v for name, v in out.items() if name.startswith("present.")}
        out = _run(session, np.array([[tokens[-1]]], np.int64), start=length, past=past)
        length += 1
    return tokens, logits


def _greedy_recomputed(session, prompt: np.ndarray, steps: int) -> tuple[list[int], list[np.ndarray]]:
    """Greedy decode recomputing the whole sequence from an empty cache at every step."""
    ids, tokens, logits = prompt, [], []
    for _ in range(steps):
        logits.append(_run(session, ids)["logits"][0, -1])
        tokens.append(int(logits[-1].argmax()))
        ids = np.concatenate([ids, [[tokens[-1]]]], axis=1)
    return tokens, logits


PROMPT = np.random.default_rng(1).integers(3, 96, size=(1, 7)).astype(np.int64)


def test_structure_finds_where_keys_and_values_enter_the_cache(tiny_onnx, tiny_onnx_nopast):
    past, nopast = find_decoder_blocks(ir.load(tiny_onnx / "model.onnx")), find_decoder_blocks(ir.load(tiny_onnx_nopast / "model.onnx"))
    for block, twin in zip(past, nopast):
        for kind, entry, other in (("key", block.key, twin.key), ("value", block.value, twin.value)):
            concat = entry.concat
            assert concat.op_type == "Concat" and concat.outputs[0].name == f"present.{block.index}.{kind}"
            assert concat.inputs[0].name == f"past_key_values.{block.index}.{kind}" and concat.inputs[1] is entry.tensor
            # without past: the same tensor of the same export (optimum names nodes alike in both graphs)
            assert other.concat is None and other.tensor.name == entry.tensor.name
        assert block.key.tensor.producer().op_type == "Add"  # the rotary embedding: k cos + rotate_half(k) sin
        assert block.value.tensor.producer().op_type == "Transpose"


@pytest.mark.parametrize("fixture", ["tiny_onnx", "tiny_onnx_nopast"])
def test_pass_inserts_two_quantizers_per_layer_before_the_cache(fixture, request):
    model = ir.load(request.getfixturevalue(fixture) / "model.onnx")
    blocks = find_decoder_blocks(model)
    entries = {id(e.tensor): e for b in blocks for e in (b.key, b.value)}
    readers = {id(e.tensor): list(e.tensor.uses()) for e in entries.values()}
    quantize_kv_cache(model, QuantizeConfig(kv=KV), blocks)
    quantizers = _kv_quantizers(model)
    assert len(quantizers) == 2 * LAYERS
    for node in quantizers:
        assert node.attributes[schema.AXIS_ATTR].as_int() == -1
        entry = entries[id(node.inputs[0])]
        # every former reader now reads the quantized tensor; the quantizer is the tensor's only reader
        assert [(n, i) for n, i in node.inputs[0].uses()] == [(node, 0)]
        assert sorted((n.name, i) for n, i in node.outputs[0].uses()) == sorted((n.name, i) for n, i in readers[id(entry.tensor)])
        if entry.concat is not None:
            assert entry.concat.inputs[1] is node.outputs[0]
    assert any(f.name == schema.QUANTIZE_DEQUANTIZE and f.overload == KV for f in model.functions.values())
    onnx.checker.check_model(in_memory_proto(model))


@pytest.mark.parametrize("fmt", ["mxint8-16", "mxfp8e4m3-16", "mxint4-8", "mxfp4-16"])
def test_cache_holds_mx_representable_values(fmt, tiny_onnx, tmp_path):
    session = create_session(_quantized(tiny_onnx, tmp_path / "q", kv=fmt) / "model.onnx")
    out = _run(session, PROMPT)
    decoded = _run(session, PROMPT[:, :1], start=PROMPT.shape[1],
                   past={k.replace("present.", "past_key_values."): v for k, v in out.items() if k.startswith("present.")})
    parsed = formats.parse_format(fmt)
    for outputs in (out, decoded):
        presents = {k: v for k, v in outputs.items() if k.startswith("present.")}
        assert len(presents) == 2 * LAYERS
        for name, cache in presents.items():
            assert cache.shape[-1] == HEAD_DIM and np.any(cache != 0)
            np.testing.assert_array_equal(formats.quantize_dequantize(cache, parsed), cache, err_msg=name)


def test_cache_of_float_kv_is_not_representable(float_kv_model):
    """The check above can fail: without --kv the cache holds floats that a 4-bit MX format does not represent."""
    out = _run(create_session(float_kv_model / "model.onnx"), PROMPT)
    cache = out["present.0.key"]
    assert not np.array_equal(formats.quantize_dequantize(cache, formats.parse_format(KV)), cache)


@pytest.mark.parametrize("family", list(formats.MX_ELEMENTS))
def test_quantize_dequantize_is_idempotent(family):
    """Q(Q(x)) == Q(x) bit for bit for every element format, in numpy and in the ONNX function body (stock
    onnxruntime), on values spanning the exponent range, zeros, tiny (E = -127) and saturating blocks."""
    fmt = formats.parse_format(f"{family}-16")
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((64, 48)) * np.exp2(rng.integers(-30, 30, size=(64, 1)))).astype(np.float32)
    x[1] = 0
    x[2] = rng.standard_normal(48).astype(np.float32) * np.float32(2.0**-135)  # float32 subnormals
    x[3, :16] = np.float32(fmt.elem.max_norm * 1.9)  # a block at the largest element
    once = formats.quantize_dequantize(x, fmt)
    assert not np.array_equal(once, x)
    np.testing.assert_array_equal(formats.quantize_dequantize(once, fmt), once)
    np.testing.assert_array_equal(run_qdq(once, fmt.name, -1), once)
    np.testing.assert_array_equal(run_qdq(x, fmt.name, -1), once)
    if native_library() is not None:  # the native kernel too
        native = create_session(qdq_model(fmt.name, -1, 2).SerializeToString(), threads=1)
        np.testing.assert_array_equal(native.run(None, {"x": once})[0], once)


def test_decode_with_cache_equals_recomputation(kv_model, float_kv_model):
    session = create_session(kv_model / "model.onnx")
    cached_tokens, cached_logits = _greedy_with_cache(session, PROMPT, 12)
    recomputed_tokens, recomputed_logits = _greedy_recomputed(session, PROMPT, 12)
    assert cached_tokens == recomputed_tokens
    np.testing.assert_allclose(np.array(cached_logits), np.array(recomputed_logits), rtol=0, atol=1e-4)
    # the KV quantizers matter: the same weights with a float cache give other logits
    float_logits = _greedy_recomputed(create_session(float_kv_model / "model.onnx"), PROMPT, 1)[1][0]
    assert np.abs(float_logits - recomputed_logits[0]).max() > 1e-2


def test_quantizing_only_what_is_stored_is_inconsistent(tiny_onnx, tmp_path):
    """The check above can fail: quantizing ``present.*`` where it leaves the graph (the prefill's attention reads
    float keys, the decode steps quantized ones) makes cached decode differ from recomputation."""
    model = ir.load(tiny_onnx / "model.onnx")
    fmt = formats.parse_format(KV)
    from mxonnx.passes.mx_matmul import add_mx_functions

    for index, value in enumerate(list(model.graph.outputs)):
        if value.name.startswith("present."):
            node = ir.node(schema.QUANTIZE_DEQUANTIZE, [value], domain=schema.DOMAIN, overload=schema.overload(fmt),
                           attributes={schema.FORMAT_ATTR: fmt.name, schema.AXIS_ATTR: -1})
            model.graph.append(node)
            name = value.name
            value.name = f"{name}_float"
            node.outputs[0].name = name
            model.graph.outputs[index] = node.outputs[0]
    add_mx_functions(model, {(schema.QUANTIZE_DEQUANTIZE, fmt)})
    session = create_session(in_memory_proto(model).SerializeToString())
    cached = np.array(_greedy_with_cache(session, PROMPT, 6)[1])
    recomputed = np.array(_greedy_recomputed(session, PROMPT, 6)[1])
    assert np.abs(cached[1:] - recomputed[1:]).max() > 1e-2


def test_optimum_generation_uses_the_quantized_cache(kv_model):
    """``ORTModelForCausalLM`` (optimum's decode loop with the cache) gives the recomputed greedy tokens."""
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    from mxonnx.session import session_options

    lm = ORTModelForCausalLM.from_pretrained(kv_model, use_cache=True, session_options=session_options(),
                                             provider="CPUExecutionProvider")
    out = lm.generate(input_ids=torch.from_numpy(PROMPT), attention_mask=torch.ones_like(torch.from_numpy(PROMPT)),
                      max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)
    expected = _greedy_recomputed(create_session(kv_model / "model.onnx"), PROMPT, 10)[0]
    assert out[0, PROMPT.shape[1]:].tolist() == expected


def test_without_past_quantizes_the_same_tensors(tiny_onnx, tiny_onnx_nopast, tmp_path):
    """A --no-past export quantized alike computes the logits of the past export's prefill."""
    past = create_session(_quantized(tiny_onnx, tmp_path / "past") / "model.onnx")
    nopast_folder = _quantized(tiny_onnx_nopast, tmp_path / "nopast")
    assert inspect_model(nopast_folder)["kv_cache"] == {KV: 2 * LAYERS}
    nopast = create_session(nopast_folder / "model.onnx")
    np.testing.assert_allclose(_run(nopast, PROMPT)["logits"], _run(past, PROMPT)["logits"], rtol=0, atol=1e-5)
    float_cache = create_session(_quantized(tiny_onnx_nopast, tmp_path / "nopast-float", kv="none") / "model.onnx")
    assert np.abs(_run(float_cache, PROMPT)["logits"] - _run(past, PROMPT)["logits"]).max() > 1e-2


@pytest.mark.parametrize("kv,message", [
    ("mxint8-32", "block size 32 does not divide the attention head size 16"),
    ("int8", "KV-cache format 'int8' is not supported"),
    ("mxint9-8", "mxint9"),
])
def test_bad_kv_format_is_one_line_and_writes_nothing(kv, message, tiny_onnx, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_onnx), "-o", str(out), "--method", "rtn", "--kv", kv]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_pass_refuses_a_graph_whose_cache_is_not_found(tiny_onnx):
    model = ir.load(tiny_onnx / "model.onnx")
    blocks = find_decoder_blocks(model)
    blocks[1].value = None
    with pytest.raises(InputError, match="decoder block 1: cannot tell where its values enter the KV cache"):
        KvCachePass(blocks, KV)(model)


def test_cli_json_and_inspect_report_the_kv_format(tiny_onnx, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_onnx), "-o", str(out), "--method", "rtn", "--weights", "mxint4-16",
                 "--acts", "mxint8-16", "--kv", "MXFP8E4M3-16", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kv"] == "mxfp8e4m3-16"
    assert main(["inspect", str(out), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    # the KV quantizers are not counted as activations: 4 per block and lm_head's input (MXINT8-32 by default)
    assert d["kv_cache"] == {"mxfp8e4m3-16": 2 * LAYERS}
    assert d["formats"]["acts"] == {"mxint8-16": 4 * LAYERS, LM_HEAD_DEFAULT: 1}
    assert main(["inspect", str(out)]) == 0
    assert "KV cache            mxfp8e4m3-16 x4" in capsys.readouterr().out
    assert inspect_model(tiny_onnx)["kv_cache"] == {}


def test_resume_refuses_another_kv_format(tiny_onnx, tiny_text, tmp_path):
    """--kv is part of the run's fingerprint: a work folder of another KV format is not continued."""
    from mxonnx.quantize import run_fingerprint
    from mxonnx.modelio import resolve_model

    paths = resolve_model(tiny_onnx)
    base = QuantizeConfig(**W4A8, calib_path=tiny_text)
    assert run_fingerprint(paths, base) != run_fingerprint(paths, QuantizeConfig(**W4A8, calib_path=tiny_text, kv=KV))
    assert run_fingerprint(paths, base) == run_fingerprint(paths, QuantizeConfig(**W4A8, calib_path=tiny_text))


@pytest.mark.parametrize("target", ["inline", "qdq", "matmulnbits"])
def test_lowering_keeps_the_kv_quantizers_as_standard_ops(target, kv_model, tmp_path):
    out = tmp_path / target
    assert lower_model(kv_model, out, target)["custom_ops_left"] == 0
    model = onnx.load(out / "model.onnx", load_external_data=False)
    assert not any(n.domain == schema.DOMAIN for n in model.graph.node)
    reference = _run(create_session(kv_model / "model.onnx", use_native=False), PROMPT)
    lowered_session = create_session(out / "model.onnx", use_native=False)
    lowered = _run(lowered_session, PROMPT)
    for name in reference:
        if name.startswith("present."):  # MatMulNBits sums in another order: a key may round to a neighbour code
            if target != "matmulnbits":
                np.testing.assert_array_equal(lowered[name], reference[name], err_msg=name)
            np.testing.assert_array_equal(formats.quantize_dequantize(lowered[name], formats.parse_format(KV)),
                                          lowered[name])
    if target != "matmulnbits":
        np.testing.assert_array_equal(lowered["logits"], reference["logits"])
    assert _greedy_with_cache(lowered_session, PROMPT, 6)[0] == _greedy_recomputed(lowered_session, PROMPT, 6)[0]


def _initializers(folder) -> dict[str, np.ndarray]:
    model = ir.load(folder / "model.onnx")
    return {name: v.const_value.numpy() for name, v in model.graph.initializers.items()}


def test_gptq_calibrates_on_the_quantized_cache(tiny_onnx, tiny_text, tmp_path):
    """In a sequential run the KV quantizers are in place while blocks are calibrated: o_proj's Hessian (its input is
    the attention over the quantized cache) and every later block see them; ``kv_in_calibration=False`` adds them
    after the linears, which then equal those of the run without --kv."""
    gptq = {**W4A8, "method": "gptq", "calib_path": tiny_text, "calib_samples": 8, "calib_seqlen": 64}
    during = _initializers(_quantized(tiny_onnx, tmp_path / "during", **gptq))
    after = _initializers(_quantized(tiny_onnx, tmp_path / "after", kv_in_calibration=False, **gptq))
    plain = _initializers(_quantized(tiny_onnx, tmp_path / "plain", kv="none", **gptq))
    assert during.keys() == after.keys() == plain.keys()
    assert all(np.array_equal(after[name], plain[name]) for name in plain)
    differ = {name for name in plain if not np.array_equal(during[name], plain[name])}
    assert "layers.0.o_proj.weight_codes" in differ and "layers.1.q_proj.weight_codes" in differ
    assert "layers.0.q_proj.weight_codes" not in differ  # q/k/v of block 0 read the float embedding's norm


def test_kv_cache_alone_is_something_to_quantize(tiny_onnx, tmp_path, capsys):
    """Weights and activations left in float with an MX cache: only the 2 x layers KV quantizers are added."""
    out = tmp_path / "kv_only"
    assert main(["quantize", str(tiny_onnx), "-o", str(out), "--method", "rtn", "--weights", "none", "--acts", "none",
                 "--kv", KV, "--json"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["quantized_matmuls"] == 0 and report["kv_cache"] == {KV: 2 * LAYERS}
