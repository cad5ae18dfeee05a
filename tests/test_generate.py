"""``mxonnx generate``: the prompt goes through the tokenizer's chat template (``--raw``: as it is), tokens are
streamed as they are decoded, ``--json`` gives one object with the tokens and their speed; the tokens are torch's
greedy tokens for the same input ids."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from mxonnx.cli import main
from mxonnx.generate import generate

# the tiny word-level vocabulary has no role names: w90..w92 stand for the template's markers
TEMPLATE = ("{% for m in messages %}w90 {{ m['content'] }} w91 {% endfor %}"
            "{% if add_generation_prompt %}w92{% endif %}")
PROMPT = "w5 w17 w3"
NEW_TOKENS = 5


@pytest.fixture(scope="module")
def chat_onnx(tiny_onnx, tmp_path_factory):
    """The tiny ONNX folder with a chat template in its tokenizer."""
    folder = tmp_path_factory.mktemp("chat") / "onnx"
    shutil.copytree(tiny_onnx, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


def _torch_greedy_ids(hf_folder, ids: list[int], max_new_tokens: int) -> list[int]:
    model = LlamaForCausalLM.from_pretrained(hf_folder, dtype=torch.float32).eval()
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=2)
    return out[0, len(ids):].tolist()


def test_chat_template_is_applied(chat_onnx, tiny_hf):
    tokenizer = AutoTokenizer.from_pretrained(chat_onnx)
    templated = tokenizer("w90 " + PROMPT + " w91 w92", add_special_tokens=False)["input_ids"]
    r = generate(chat_onnx, PROMPT, max_new_tokens=NEW_TOKENS)
    assert r["chat_template"] is True and r["prompt_tokens"] == len(templated) == 6
    assert r["token_ids"] == _torch_greedy_ids(tiny_hf, templated, NEW_TOKENS)
    assert r["tokens"] == len(r["token_ids"]) and r["text"] == r["completion"] == tokenizer.decode(r["token_ids"])


def test_raw_prompt_skips_the_template(chat_onnx, tiny_hf):
    ids = AutoTokenizer.from_pretrained(chat_onnx)(PROMPT)["input_ids"]
    r = generate(chat_onnx, PROMPT, max_new_tokens=NEW_TOKENS, raw=True)
    assert r["chat_template"] is False and r["prompt_tokens"] == len(ids) == 3
    assert r["token_ids"] == _torch_greedy_ids(tiny_hf, ids, NEW_TOKENS)
    assert r["text"].startswith(PROMPT) and r["text"].endswith(r["completion"])


def test_folder_without_template_is_fed_raw(tiny_onnx):
    assert generate(tiny_onnx, PROMPT, max_new_tokens=2)["chat_template"] is False


@pytest.mark.parametrize("raw", [False, True])
def test_tokens_are_streamed_as_decoded(chat_onnx, raw, capsys):
    pieces = []
    r = generate(chat_onnx, PROMPT, max_new_tokens=NEW_TOKENS, raw=raw, emit=pieces.append)
    assert len(pieces) >= NEW_TOKENS - 1 and "".join(pieces).strip() == r["text"].strip()
    assert main(["generate", str(chat_onnx), PROMPT, "--max-new-tokens", str(NEW_TOKENS)] + ["--raw"] * raw) == 0
    out = capsys.readouterr().out
    assert out.strip() == r["text"].strip() and out.endswith("\n")


def test_cli_json(chat_onnx, capsys):
    for raw in (False, True):
        assert main(["generate", str(chat_onnx), PROMPT, "--max-new-tokens", str(NEW_TOKENS), "--json"]
                    + ["--raw"] * raw) == 0
        r = json.loads(capsys.readouterr().out)  # exactly one object: nothing streamed around it
        assert r["chat_template"] is (not raw) and r["tokens"] == len(r["token_ids"]) == NEW_TOKENS
        assert r["seconds"] > 0 and r["tokens_per_second"] == pytest.approx(r["tokens"] / r["seconds"])
        assert isinstance(r["text"], str) and r["text"]
