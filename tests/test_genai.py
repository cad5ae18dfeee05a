"""onnxruntime-genai deployment: ``mxonnx lower`` writes a genai_config.json with which onnxruntime_genai loads the
folder and generates the greedy tokens optimum's ``ORTModelForCausalLM`` generates from it."""

from __future__ import annotations

import json

import pytest

from conftest import make_tiny_llama
from mxonnx.config import QuantizeConfig
from mxonnx.export import export_model
from mxonnx.genai_config import GENAI_CONFIG_NAME
from mxonnx.generate import generate, load_generator
from mxonnx.lower import lower_model
from mxonnx.quantize import quantize_model

PROMPT = "w5 w17 w3 w40 w8 w61"
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def varied_onnx(tmp_path_factory):
    """A tiny Llama with larger random weights (std 0.3): its greedy tokens change with the context (at the default
    0.02 it repeats one token), so a wrong KV cache or position shows in them."""
    folder = tmp_path_factory.mktemp("genai")
    make_tiny_llama(folder / "hf", initializer_range=0.3)
    export_model(folder / "hf", folder / "onnx", progress=False)
    return folder / "onnx"


@pytest.fixture(scope="module", params=[("none", "matmulnbits"), ("mxint8-32", "matmulnbits"), ("mxint8-32", "qdq"),
                                        ("mxint8-32", "inline")], ids="-".join)
def lowered(request, varied_onnx, tmp_path_factory):
    acts, target = request.param
    folder = tmp_path_factory.mktemp("genai")
    quantize_model(varied_onnx, folder / "mx", QuantizeConfig(weights="mxint4-32", acts=acts, method="rtn",
                                                            progress=False))
    lower_model(folder / "mx", folder / target, target)
    return folder / target


def _genai_greedy(folder, prompt_ids: list[int], new_tokens: int) -> list[int]:
    og = pytest.importorskip("onnxruntime_genai")
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt_ids) + new_tokens)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt_ids)
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens


def test_config_describes_the_graph(lowered):
    config = json.loads((lowered / GENAI_CONFIG_NAME).read_text())
    decoder = config["model"]["decoder"]
    assert config["model"]["type"] == "llama" and decoder["filename"] == "model.onnx"
    assert (decoder["num_attention_heads"], decoder["num_key_value_heads"], decoder["head_size"],
            decoder["num_hidden_layers"], decoder["hidden_size"]) == (4, 2, 16, 2, 64)
    assert decoder["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert decoder["outputs"]["present_value_names"] == "present.%d.value"
    assert (config["model"]["eos_token_id"], config["model"]["bos_token_id"]) == (2, 1)
    assert config["search"]["do_sample"] is False and config["search"]["max_length"] == 512


def test_genai_generates_optimum_greedy_tokens(lowered):
    _, tokenizer = load_generator(lowered)
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    expected = generate(lowered, PROMPT, max_new_tokens=NEW_TOKENS, raw=True)["token_ids"]
    assert len(expected) == NEW_TOKENS and len(set(expected)) > NEW_TOKENS // 2  # varied tokens, steps with the cache
    assert _genai_greedy(lowered, prompt_ids, NEW_TOKENS) == expected


@pytest.mark.parametrize("native", [True, False])
def test_genai_runs_the_mx_model(varied_onnx, tmp_path, native, monkeypatch):
    """A quantized (``com.mxonnx``) folder holds a genai_config.json too: with the native library copied in and
    registered, or (MXONNX_NO_NATIVE=1, or not built) the ops' function bodies; same greedy tokens as optimum."""
    from mxonnx.genai_config import NATIVE_LIBRARY_NAME
    from mxonnx.session import native_library

    if native and native_library() is None:
        pytest.skip("native library not built")
    monkeypatch.setenv("MXONNX_NO_NATIVE", "0" if native else "1")
    out = tmp_path / "mx"
    quantize_model(varied_onnx, out, QuantizeConfig(weights="mxint4-32", acts="mxint8-32", method="rtn", progress=False))
    session = json.loads((out / GENAI_CONFIG_NAME).read_text())["model"]["decoder"]["session_options"]
    assert (session.get("custom_ops_library") == NATIVE_LIBRARY_NAME) is native
    assert (out / NATIVE_LIBRARY_NAME).is_file() is native
    _, tokenizer = load_generator(out)
    expected = generate(out, PROMPT, max_new_tokens=NEW_TOKENS, raw=True)["token_ids"]
    assert _genai_greedy(out, tokenizer(PROMPT)["input_ids"], NEW_TOKENS) == expected
    lower_model(out, tmp_path / "nbits", "matmulnbits")  # the lowered folder needs no library
    assert not (tmp_path / "nbits" / NATIVE_LIBRARY_NAME).exists()
    assert "custom_ops_library" not in json.loads((tmp_path / "nbits" / GENAI_CONFIG_NAME).read_text())[
        "model"]["decoder"]["session_options"]


def test_no_config_without_kv_cache(tiny_onnx_nopast, tmp_path):
    quantize_model(tiny_onnx_nopast, tmp_path / "mx", QuantizeConfig(weights="mxint4-32", acts="none", method="rtn",
                                                                     progress=False))
    with pytest.warns(UserWarning, match="no genai_config.json written.*KV cache"):
        lower_model(tmp_path / "mx", tmp_path / "nbits", "matmulnbits")
    assert (tmp_path / "nbits" / "model.onnx").is_file() and not (tmp_path / "nbits" / GENAI_CONFIG_NAME).exists()


def _gguf_style_byte_level_tokenizer():
    """A byte-level BPE as transformers builds it from a GGUF ``gpt2`` tokenizer: with SentencePiece's byte fallback
    and a ByteFallback/Fuse/Replace("▁") decoder before the ByteLevel one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    corpus = ["The capital of France is Paris.\nA second  line", "héllo wörld ✓ 日本語"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse(), decoders.Replace("\u2581", " "),
                                     decoders.ByteLevel()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.mark.parametrize("byte_level_only", [False, True])
def test_genai_reads_exported_byte_level_tokenizers(byte_level_only, lowered, tmp_path):
    """onnxruntime-genai's tokenizer gives transformers' ids for a GGUF byte-level tokenizer once export's
    ``keep_byte_level`` has run (and not before: it then takes it for SentencePiece); transformers' ids and text
    do not change."""
    import shutil

    from mxonnx.export import keep_byte_level

    og = pytest.importorskip("onnxruntime_genai")
    text = "The capital of France is\nParis  ✓ 日本"
    tokenizer = _gguf_style_byte_level_tokenizer()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if byte_level_only:
        keep_byte_level(tokenizer)
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == ids and tokenizer.decode(ids) == text
    tokenizer.save_pretrained(tmp_path)
    shutil.copy(lowered / GENAI_CONFIG_NAME, tmp_path)
    genai_ids = [int(i) for i in og.Tokenizer(og.Config(str(tmp_path))).encode(text)]
    assert (genai_ids == ids) is byte_level_only
