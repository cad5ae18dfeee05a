"""Export: HF folder and GGUF file -> ONNX folder; logits equal torch's; bad input leaves nothing behind."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

from mxonnx import export as export_mod
from mxonnx.cli import main
from mxonnx.eval import OrtCausalLM
from mxonnx.export import export_model
from tiny_gguf import write_tiny_gguf

ATOL = 1e-4


def _torch_logits(hf_folder, ids: np.ndarray) -> np.ndarray:
    model = LlamaForCausalLM.from_pretrained(hf_folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.numpy()


def _random_ids(n: int = 2, length: int = 37, vocab: int = 96) -> np.ndarray:
    return np.random.default_rng(1).integers(0, vocab, size=(n, length), dtype=np.int64)


@pytest.fixture(scope="module")
def tiny_gguf(tiny_hf, tmp_path_factory):
    return write_tiny_gguf(tiny_hf, tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.mark.parametrize("fixture, past", [("tiny_onnx", True), ("tiny_onnx_nopast", False)])
def test_export_writes_an_optimum_model_folder(request, fixture, past):
    folder = request.getfixturevalue(fixture)
    names = {p.name for p in folder.iterdir()}
    assert {"model.onnx", "config.json", "generation_config.json", "tokenizer.json"} <= names
    inputs = [i.name for i in onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.input]
    assert any(n.startswith("past_key_values.") for n in inputs) == past
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left


@pytest.mark.parametrize("fixture", ["tiny_onnx", "tiny_onnx_nopast"])
def test_onnx_logits_equal_torch_logits(request, tiny_hf, fixture):
    folder = request.getfixturevalue(fixture)
    ids = _random_ids()
    actual = OrtCausalLM(folder / "model.onnx").logits(ids)
    np.testing.assert_allclose(actual, _torch_logits(tiny_hf, ids), rtol=0, atol=ATOL)


def test_gguf_export_reproduces_the_source_model(tiny_hf, tiny_gguf, tmp_path):
    out = tmp_path / "from_gguf"
    result = export_model(tiny_gguf, out, past=False, progress=False)
    assert result["output"] == str(out) and result["past"] is False and result["seconds"] > 0
    assert not (out / "tokenizer.model").exists()  # the GGUF is not copied as a tokenizer file
    ids = _random_ids()
    np.testing.assert_allclose(OrtCausalLM(out / "model.onnx").logits(ids), _torch_logits(tiny_hf, ids), rtol=0, atol=ATOL)


def test_failed_logit_check_leaves_no_output(tiny_hf, tmp_path, monkeypatch):
    monkeypatch.setattr(export_mod, "CHECK_RTOL", -1.0)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="differ from torch"):
        export_model(tiny_hf, out, progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def bad_sources(tmp_path_factory, tiny_hf, tiny_gguf) -> dict:
    tmp_path = tmp_path_factory.mktemp("bad_sources")
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file " * 8)
    data = tiny_gguf.read_bytes()
    (tmp_path / "truncated.gguf").write_bytes(data[: len(data) * 2 // 3])
    (tmp_path / "header_only.gguf").write_bytes(data[:64])
    write_tiny_gguf(tiny_hf, tmp_path / "gpt2.gguf", architecture="gpt2")
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=64)).save_pretrained(tmp_path / "gpt2")
    return {
        "missing": tmp_path / "missing",
        "empty folder": tmp_path / "empty",
        "not a model file": tiny_hf / "config.json",
        "corrupt gguf": tmp_path / "junk.gguf",
        "truncated gguf": tmp_path / "truncated.gguf",
        "header-only gguf": tmp_path / "header_only.gguf",
        "non-llama gguf": tmp_path / "gpt2.gguf",
        "non-llama folder": tmp_path / "gpt2",
    }


BAD_CASES = ["missing", "empty folder", "not a model file", "corrupt gguf", "truncated gguf", "header-only gguf",
             "non-llama gguf", "non-llama folder"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_source_exits_2_with_one_line(case, bad_sources, tmp_path, capsys):
    src = bad_sources[case]
    out_parent = tmp_path / "outputs"
    out_parent.mkdir()
    capsys.readouterr()
    assert main(["export", str(src), "-o", str(out_parent / "out")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1 and captured.err.startswith("mxonnx export: ")
    assert list(out_parent.iterdir()) == []


def test_onnx_folder_is_not_an_export_source(tiny_onnx, tmp_path, capsys):
    assert main(["export", str(tiny_onnx), "-o", str(tmp_path / "out")]) == 2
    assert "no Hugging Face model" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
