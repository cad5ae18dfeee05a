"""Perplexity protocol, onnxruntime perplexity against an independent torch computation, generation."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import onnx
import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from mxonnx.cli import main
from mxonnx.errors import InputError
from mxonnx.eval import evaluate_perplexity, generate_text, token_windows, window_nll

SEQLEN = 64


def _torch_perplexity(hf_folder, text_path, seqlen: int, max_windows: int | None = None) -> tuple[float, int]:
    """The README protocol written out plainly with torch: (perplexity, windows)."""
    tokenizer = AutoTokenizer.from_pretrained(hf_folder)
    model = LlamaForCausalLM.from_pretrained(hf_folder, dtype=torch.float32).eval()
    text = "\n\n".join(text_path.read_text().splitlines())
    ids = torch.tensor(tokenizer(text)["input_ids"])
    n = len(ids) // seqlen if max_windows is None else min(len(ids) // seqlen, max_windows)
    nlls = []
    with torch.no_grad():
        for w in range(n):
            window = ids[w * seqlen : (w + 1) * seqlen][None]
            logits = model(window).logits[0, :-1].double()
            nlls.append(torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="none"))
    return math.exp(torch.cat(nlls).mean().item()), n


def test_token_windows_drop_the_partial_last_window():
    ids = np.arange(10)
    np.testing.assert_array_equal(token_windows(ids, 4), [[0, 1, 2, 3], [4, 5, 6, 7]])
    np.testing.assert_array_equal(token_windows(np.arange(8), 4), [[0, 1, 2, 3], [4, 5, 6, 7]])
    np.testing.assert_array_equal(token_windows(ids, 4, max_windows=1), [[0, 1, 2, 3]])
    assert token_windows(ids, 4, max_windows=9).shape == (2, 4)
    with pytest.raises(InputError, match="fewer than one window"):
        token_windows(np.arange(3), 4)


def test_window_nll_is_the_summed_cross_entropy_of_next_tokens():
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((700, 50)) * 8).astype(np.float32)  # > 2 row blocks of the log-softmax
    ids = rng.integers(0, 50, 700)
    expected = torch.nn.functional.cross_entropy(torch.from_numpy(logits[:-1]).double(), torch.from_numpy(ids[1:]),
                                                 reduction="sum").item()
    assert window_nll(logits, ids) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("fixture", ["tiny_onnx", "tiny_onnx_nopast"])
def test_onnx_perplexity_matches_torch_protocol(request, tiny_hf, tiny_text, fixture):
    folder = request.getfixturevalue(fixture)
    expected, windows = _torch_perplexity(tiny_hf, tiny_text, SEQLEN)
    r = evaluate_perplexity(folder, data=tiny_text, seqlen=SEQLEN, progress=False)
    assert (r["windows"], r["tokens"], r["seqlen"]) == (windows, windows * SEQLEN, SEQLEN)
    assert r["perplexity"] == pytest.approx(expected, rel=1e-5)
    assert r["seconds"] > 0 and r["tokens_per_second"] > 0


def test_max_windows_and_torch_reference(tiny_hf, tiny_onnx, tiny_text):
    expected, windows = _torch_perplexity(tiny_hf, tiny_text, SEQLEN, max_windows=3)
    onnx_r = evaluate_perplexity(tiny_onnx, data=tiny_text, seqlen=SEQLEN, max_windows=3, progress=False)
    torch_r = evaluate_perplexity(tiny_hf, data=tiny_text, seqlen=SEQLEN, max_windows=3, reference="torch", progress=False)
    assert onnx_r["windows"] == torch_r["windows"] == windows == 3
    assert onnx_r["perplexity"] == pytest.approx(expected, rel=1e-5)
    assert torch_r["perplexity"] == pytest.approx(expected, rel=1e-9)


def _torch_greedy(hf_folder, prompt: str, max_new_tokens: int) -> str:
    tokenizer = AutoTokenizer.from_pretrained(hf_folder)
    model = LlamaForCausalLM.from_pretrained(hf_folder, dtype=torch.float32).eval()
    inputs = tokenizer(prompt, return_tensors="pt", return_token_type_ids=False)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0], skip_special_tokens=True)


@pytest.mark.parametrize("fixture", ["tiny_onnx", "tiny_onnx_nopast"])
def test_generate_matches_torch_greedy(request, tiny_hf, fixture):
    prompt = "w5 w17 w3 w40"
    text = generate_text(request.getfixturevalue(fixture), prompt, max_new_tokens=6)
    assert text.startswith(prompt) and len(text.split()) == 4 + 6
    assert text == _torch_greedy(tiny_hf, prompt, 6)


def test_folder_with_external_data_file(tiny_onnx, tiny_text, tmp_path):
    """Quantized folders keep weights in ``model.onnx_data``; eval and optimum must both read them."""
    folder = tmp_path / "external"
    shutil.copytree(tiny_onnx, folder)
    model = onnx.load(str(folder / "model.onnx"))
    onnx.save(model, str(folder / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx_data", size_threshold=0)
    assert (folder / "model.onnx_data").stat().st_size > (folder / "model.onnx").stat().st_size
    prompt = "w1 w2 w3"
    assert generate_text(folder, prompt, max_new_tokens=5) == generate_text(tiny_onnx, prompt, max_new_tokens=5)
    a = evaluate_perplexity(folder, data=tiny_text, seqlen=SEQLEN, max_windows=2, progress=False)
    b = evaluate_perplexity(tiny_onnx, data=tiny_text, seqlen=SEQLEN, max_windows=2, progress=False)
    assert a["perplexity"] == b["perplexity"]


def test_cli_eval_json(tiny_onnx, tiny_text, capsys):
    assert main(["eval", str(tiny_onnx), "--data", str(tiny_text), "--seqlen", str(SEQLEN), "--max-windows", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"perplexity", "tokens", "windows", "seqlen", "seconds"} <= set(result)
    assert (result["windows"], result["tokens"]) == (2, 2 * SEQLEN)


@pytest.mark.parametrize("case", ["short text", "missing model", "missing data", "bare onnx file", "hf folder",
                                  "generate missing model"])
def test_cli_bad_input_exits_2_with_one_line(case, tiny_onnx, tiny_hf, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("w1 w2 w3\n")
    argv = {
        "short text": ["eval", str(tiny_onnx), "--data", str(short), "--seqlen", str(SEQLEN)],
        "missing model": ["eval", str(tmp_path / "missing")],
        "missing data": ["eval", str(tiny_onnx), "--data", str(tmp_path / "missing.txt")],
        "bare onnx file": ["eval", str(tiny_onnx / "model.onnx"), "--data", str(short)],
        "hf folder": ["eval", str(tiny_hf), "--data", str(short)],
        "generate missing model": ["generate", str(tmp_path / "missing"), "hello"],
    }[case]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith(f"mxonnx {argv[0]}: ")
