"""Shared fixtures: a tiny seeded random Llama (2 layers, GQA 4/2 heads) with a word-level tokenizer,
saved as a Hugging Face folder and exported to ONNX with and without past, plus a small text corpus."""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy loads: BLAS threads contend with onnxruntime's

import random
from pathlib import Path

import pytest

VOCAB_WORDS = [f"w{i}" for i in range(93)]
SPECIAL = ["<unk>", "<s>", "</s>"]


def make_tiny_llama(folder: Path, seed: int = 0, layers: int = 2, hidden: int = 64, intermediate: int = 128,
                    heads: int = 4, kv_heads: int = 2, **config) -> Path:
    """Build and save a random LlamaForCausalLM and a word-level tokenizer in ``folder`` (``config``: more
    ``LlamaConfig`` settings, e.g. ``initializer_range``)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    vocab = SPECIAL + VOCAB_WORDS
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                      **config)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norm weights so folding into them is really tested
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.5 * torch.rand_like(p))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def in_memory_proto(model):
    """``model`` serialized with the data of its external tensors embedded (the exported fixtures keep their weights
    in ``model.onnx_data``; a proto run from bytes or checked on its own cannot resolve that file)."""
    import onnx
    import onnx_ir as ir

    proto = ir.to_proto(model)
    folders = {v.const_value.base_dir for v in model.graph.initializers.values()
               if isinstance(v.const_value, ir.ExternalTensor)}
    for folder in folders:
        onnx.external_data_helper.load_external_data_for_model(proto, str(folder))
    return proto


def make_text(path: Path, words: int = 6000, seed: int = 0) -> Path:
    """Random sentences over the tiny vocabulary, one paragraph per line."""
    rng = random.Random(seed)
    lines = []
    while sum(len(line.split()) for line in lines) < words:
        lines.append(" ".join(rng.choice(VOCAB_WORDS[: 20 + rng.randrange(70)]) for _ in range(rng.randrange(5, 40))))
    path.write_text("\n".join(lines) + "\n")
    return path


def _export(src: Path, out: Path, past: bool) -> Path:
    try:
        from mxonnx.export import export_model
    except ImportError:
        export_model = None
    if export_model is not None:
        export_model(src, out, past=past, progress=False)
    else:
        from optimum.exporters.onnx import main_export

        main_export(str(src), str(out), task="text-generation-with-past" if past else "text-generation")
    return out


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "hf")


@pytest.fixture(scope="session")
def tiny_onnx(tiny_hf, tmp_path_factory) -> Path:
    """ONNX folder of the tiny model with KV-cache inputs (optimum text-generation-with-past)."""
    return _export(tiny_hf, tmp_path_factory.mktemp("tiny_onnx") / "past", past=True)


@pytest.fixture(scope="session")
def tiny_onnx_nopast(tiny_hf, tmp_path_factory) -> Path:
    return _export(tiny_hf, tmp_path_factory.mktemp("tiny_onnx") / "nopast", past=False)


@pytest.fixture(scope="session")
def tiny_text(tmp_path_factory) -> Path:
    return make_text(tmp_path_factory.mktemp("text") / "text.txt")


def visible_lines(err: str) -> list[str]:
    """The non-blank lines a terminal shows for ``err``: a carriage return (a progress bar redrawn or cleared)
    overwrites the line."""
    return [shown for line in err.split("\n") if (shown := line.split("\r")[-1].strip())]
