"""Llama variants and related decoders end to end: biased linears (``attention_bias``/``mlp_bias``), untied embeddings
with Llama-3 rope scaling, Mistral (sliding window) and Qwen2 (q/k/v biases; also as a GGUF file), each a tiny seeded
random checkpoint:
export against torch (prefill and cached decode), quantize with every method close to the float model, smoothing
folds that keep the float function, eval, lower and generate."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch

from conftest import in_memory_proto, make_text, make_tiny_llama
from tiny_gguf import write_tiny_gguf
from mxonnx.blockwise import decoder_feed
from mxonnx.config import QuantizeConfig
from mxonnx.eval import OrtCausalLM, evaluate_perplexity, generate_text
from mxonnx.export import export_model
from mxonnx.inspect import inspect_model
from mxonnx.lower import lower_model
from mxonnx.passes.llama_structure import ROLES, constant_array, find_decoder_blocks
from mxonnx.passes.smoothing import fold_smoothing_scales
from mxonnx.quantize import quantize_model
from mxonnx.session import create_session

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
VARIANTS = {  # name -> (make_tiny_llama arguments, roles whose linear has a bias)
    "llama-biases": ({"attention_bias": True, "mlp_bias": True}, set(ROLES)),
    "llama-untied-llama3-rope": ({"tie_word_embeddings": False, "rope_scaling": LLAMA3_ROPE}, set()),
    "mistral": ({"model_type": "mistral", "sliding_window": 8}, set()),
    "qwen2": ({"model_type": "qwen2", "tie_word_embeddings": False}, {"q", "k", "v"}),
    "qwen2-gguf": ({"model_type": "qwen2"}, {"q", "k", "v"}),  # exported from a GGUF copy of the checkpoint
}
METHODS = ("rtn", "gptq", "sq", "awq", "sq+gptq", "awq+gptq")
IDS = np.random.default_rng(1).integers(3, 96, size=(2, 37))  # longer than Mistral's window of 8


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, tmp_path_factory):
    """(name, export source, HF folder (the torch reference), ONNX export with past, text) of one variant."""
    folder = tmp_path_factory.mktemp(request.param)
    hf = make_tiny_llama(folder / "hf", seed=3, layers=3, **VARIANTS[request.param][0])  # 3: a copied template block
    src = write_tiny_gguf(hf, folder / "tiny.gguf") if request.param.endswith("-gguf") else hf
    export_model(src, folder / "onnx", past=True, progress=False)
    return request.param, src, hf, folder / "onnx", make_text(folder / "text.txt", words=3000)


def _torch_model(hf):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()


def _torch_logits(hf, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return _torch_model(hf)(torch.from_numpy(ids)).logits.numpy()


def _config(text, method: str, **kw) -> QuantizeConfig:
    return QuantizeConfig(weights=kw.pop("weights", "mxint8-32"), acts=kw.pop("acts", "mxint8-32"), method=method,
                          calib_path=text, calib_samples=4, calib_seqlen=48, progress=False, **kw)


def test_export_equals_torch_and_biases_are_found(variant):
    name, _, hf, onnx_folder, _ = variant
    np.testing.assert_allclose(OrtCausalLM(onnx_folder / "model.onnx").logits(IDS), _torch_logits(hf, IDS),
                               rtol=0, atol=1e-4)
    blocks = find_decoder_blocks(ir.load(onnx_folder / "model.onnx"))
    assert len(blocks) == 3
    for block in blocks:
        assert {lin.role for lin in block.linears() if lin.bias_add is not None} == VARIANTS[name][1]


def test_cached_decode_equals_torch(variant):
    """Prefill 12 tokens, then decode one token at a time through the KV cache past Mistral's window."""
    _, _, hf, onnx_folder, _ = variant
    session = create_session(onnx_folder / "model.onnx")
    cfg = _torch_model(hf).config
    ids = IDS[:1, :24]
    past = {f"past_key_values.{i}.{kv}": np.zeros((1, cfg.num_key_value_heads, 0, cfg.hidden_size // cfg.num_attention_heads), np.float32)
            for i in range(cfg.num_hidden_layers) for kv in ("key", "value")}
    outputs = ["logits"] + [name.replace("past_key_values", "present") for name in past]
    steps = [(0, 12)] + [(t, t + 1) for t in range(12, 24)]
    logits = []
    for start, stop in steps:
        feed = {"input_ids": ids[:, start:stop], "attention_mask": np.ones((1, stop), np.int64),
                "position_ids": np.arange(start, stop, dtype=np.int64)[None], **past}
        result = session.run(outputs, feed)
        logits.append(result[0])
        past = dict(zip(past, result[1:]))
    np.testing.assert_allclose(np.concatenate(logits, axis=1), _torch_logits(hf, ids), rtol=0, atol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_quantize_every_method_stays_close_to_float(variant, method, tmp_path):
    """W8A8 MXINT8-32: every method's logits within 4 % of the float model's (relative L2 error), native
    fused kernels equal to the function bodies, 21 quantized decoder linears and lm_head (W8A8 MXINT8-32 by default)
    and the biases left in float."""
    name, _, _, onnx_folder, text = variant
    out = tmp_path / "q"
    quantize_model(onnx_folder, out, _config(text, method))
    reference = OrtCausalLM(onnx_folder / "model.onnx").logits(IDS)
    logits = OrtCausalLM(out / "model.onnx").logits(IDS)
    # ||q - f|| / ||f|| measured 0.1-0.2 % with biases, 1.6-1.9 % with the untied head's small logits; the biased
    # model's float logits without its biases are off by 290 %
    assert np.linalg.norm(logits - reference) <= 0.04 * np.linalg.norm(reference)
    bodies = create_session(out / "model.onnx", use_native=False).run(["logits"], OrtCausalLM(out / "model.onnx").feed(IDS))[0]
    np.testing.assert_allclose(logits, bodies, rtol=0, atol=1e-4)
    assert inspect_model(out)["quantized_matmuls"] == 3 * 7 + 1
    graph = ir.load(out / "model.onnx").graph
    biases = [v for v in graph.initializers.values() if v.name.endswith("_proj.bias")]
    assert len(biases) == 3 * len(VARIANTS[name][1])
    assert all(v.dtype == ir.DataType.FLOAT and [n.op_type for n, _ in v.uses()] == ["Add"] for v in biases)


def test_smoothing_fold_keeps_the_float_function(variant):
    """Random scales folded into every group (norms, v_proj and up_proj columns with their biases, rows) leave the
    float logits unchanged."""
    name, _, _, onnx_folder, _ = variant
    model = ir.load(onnx_folder / "model.onnx")
    feed = decoder_feed(list(model.graph.inputs), IDS, num_kv_heads=2, head_dim=16)
    before = create_session(in_memory_proto(model).SerializeToString()).run(["logits"], feed)[0]
    blocks = find_decoder_blocks(model)
    rng = np.random.default_rng(0)
    widths = {"qkv": 64, "o": 32, "gate_up": 64, "down": 128}
    scales = {b.index: {g: np.exp(rng.uniform(-1.5, 1.5, n)) for g, n in widths.items()} for b in blocks}
    biased = [(b.index, group, lin) for b in blocks for group, lin in (("o", b.v), ("down", b.up))
              if lin.bias_add is not None]
    biases = [_bias(lin) for _, _, lin in biased]
    fold_smoothing_scales(model, blocks, scales)
    after = create_session(in_memory_proto(model).SerializeToString()).run(["logits"], feed)[0]
    np.testing.assert_allclose(after, before, rtol=0, atol=1e-4 * max(1.0, np.abs(before).max()))
    assert len(biased) == 3 * len({"v", "up"} & VARIANTS[name][1])
    for (index, group, lin), b in zip(biased, biases):  # b_c / s_c
        np.testing.assert_allclose(_bias(lin), b / scales[index][group], rtol=1e-6)


def _bias(linear) -> np.ndarray:
    add = linear.bias_add
    return next(constant_array(v) for v in add.inputs if v is not linear.node.outputs[0])


def test_eval_lower_generate(variant, tmp_path):
    """Float export: perplexity equals torch's and greedy generation equals transformers'. W4A8 model: evaluates,
    lowers to every target with the same logits on stock onnxruntime, and generates from each folder."""
    _, src, hf, onnx_folder, text = variant
    torch_ppl = evaluate_perplexity(src, data=text, seqlen=32, max_windows=3, reference="torch", progress=False)
    onnx_ppl = evaluate_perplexity(onnx_folder, data=text, seqlen=32, max_windows=3, progress=False)
    assert onnx_ppl["perplexity"] == pytest.approx(torch_ppl["perplexity"], rel=1e-4)
    blockwise = evaluate_perplexity(onnx_folder, data=text, seqlen=32, max_windows=3, progress=False, blockwise=True)
    assert blockwise["path"] != onnx_ppl["path"] and blockwise["perplexity"] == pytest.approx(onnx_ppl["perplexity"], rel=1e-5)

    from transformers import AutoTokenizer

    prompt = "w5 w17 w3 w40"
    tokenizer = AutoTokenizer.from_pretrained(onnx_folder)  # the source's (a GGUF's differs from the HF folder's)
    with torch.no_grad():
        expected = _torch_model(hf).generate(**tokenizer(prompt, return_tensors="pt", return_token_type_ids=False),
                                             max_new_tokens=8, do_sample=False, pad_token_id=2)
    assert generate_text(onnx_folder, prompt, max_new_tokens=8) == tokenizer.decode(expected[0], skip_special_tokens=True)

    mx = tmp_path / "mx"
    quantize_model(onnx_folder, mx, _config(text, "rtn", weights="mxint4-32"))
    mx_ppl = evaluate_perplexity(mx, data=text, seqlen=32, max_windows=3, progress=False)["perplexity"]
    assert np.isfinite(mx_ppl) and mx_ppl != onnx_ppl["perplexity"]
    mx_blockwise = evaluate_perplexity(mx, data=text, seqlen=32, max_windows=3, progress=False, blockwise=True)
    assert mx_blockwise["perplexity"] == pytest.approx(mx_ppl, rel=1e-5)
    feed = OrtCausalLM(mx / "model.onnx").feed(IDS)
    mx_logits = create_session(mx / "model.onnx", use_native=False).run(["logits"], feed)[0]
    mx_text = generate_text(mx, prompt, max_new_tokens=8)
    for target in ("inline", "qdq", "matmulnbits"):
        lowered = tmp_path / target
        lower_model(mx, lowered, target)
        logits = create_session(lowered / "model.onnx", use_native=False).run(["logits"], feed)[0]
        np.testing.assert_allclose(logits, mx_logits, rtol=0, atol=1e-4)
        assert generate_text(lowered, prompt, max_new_tokens=8) == mx_text


def test_unsupported_architectures_are_one_line_naming_the_supported(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    from mxonnx.cli import main

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=64)).save_pretrained(tmp_path / "gpt2")
    hf = make_tiny_llama(tmp_path / "hf", layers=1)
    cases = {tmp_path / "gpt2": "model type 'gpt2' is not supported (supported: llama, mistral, qwen2)",
             write_tiny_gguf(hf, tmp_path / "phi3.gguf", architecture="phi3"):
                 "GGUF architecture 'phi3' is not supported (supported: llama, qwen2)"}
    for src, message in cases.items():
        capsys.readouterr()
        assert main(["export", str(src), "-o", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.strip().splitlines() == [f"mxonnx export: {src}: {message}"]
        assert not (tmp_path / "out").exists()
