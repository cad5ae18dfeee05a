"""Calibration on onnxruntime: statistics of every linear input equal a direct torch computation (forward
hooks on the Hugging Face model), windows are drawn reproducibly, samples are real input rows, bad input is refused."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from mxonnx.blockwise import BlockwiseRunner
from mxonnx.calibrate import (
    block_statistics, calibration_windows, collect_statistics, config_windows, load_tokenizer, sample_rows)
from mxonnx.config import QuantizeConfig
from mxonnx.errors import InputError
from mxonnx.passes.llama_structure import find_decoder_blocks

GROUP_MODULE = {"qkv": "self_attn.q_proj", "o": "self_attn.o_proj", "gate_up": "mlp.gate_proj", "down": "mlp.down_proj"}


def _config(text, **kw) -> QuantizeConfig:
    return QuantizeConfig(calib_path=text, calib_samples=kw.pop("samples", 3), calib_seqlen=kw.pop("seqlen", 48),
                          seed=kw.pop("seed", 0), progress=False, **kw)


def _torch_inputs(hf_folder, windows) -> dict[str, np.ndarray]:
    """Inputs of one linear per group, rows of all windows, from forward hooks on the HF model."""
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(hf_folder, attn_implementation="eager").eval()
    captured: dict[str, list[np.ndarray]] = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        for group, path in GROUP_MODULE.items():
            module = layer.get_submodule(path)
            key = f"layers.{i}.{group}"
            hooks.append(module.register_forward_hook(
                lambda mod, args, out, key=key: captured.setdefault(key, []).append(args[0].reshape(-1, args[0].shape[-1]).numpy())))
    with torch.no_grad():
        for ids in windows:
            model(torch.from_numpy(ids[None]))
    for hook in hooks:
        hook.remove()
    return {key: np.concatenate(rows) for key, rows in captured.items()}


@pytest.mark.parametrize("fixture", ["tiny_onnx", "tiny_onnx_nopast"])
def test_statistics_match_torch_hooks(fixture, request, tiny_hf, tiny_text):
    folder = request.getfixturevalue(fixture)
    model = ir.load(folder / "model.onnx")
    blocks = find_decoder_blocks(model)
    config = _config(tiny_text)
    stats = collect_statistics(model, blocks, folder, config, hessians=True)
    windows = calibration_windows(tiny_text, load_tokenizer(folder), 3, 48, 0)
    expected = _torch_inputs(tiny_hf, windows)
    assert sorted(stats) == sorted(expected)
    for key, x in expected.items():
        s = stats[key]
        assert s.count == x.shape[0] == 3 * 48
        np.testing.assert_allclose(s.max_abs, np.abs(x).max(axis=0), rtol=1e-4, atol=1e-6, err_msg=key)
        np.testing.assert_allclose(s.mean_abs, np.abs(x).mean(axis=0), rtol=1e-4, atol=1e-6, err_msg=key)
        xtx = x.astype(np.float64).T @ x.astype(np.float64)
        np.testing.assert_allclose(s.xtx, xtx, rtol=1e-4, atol=1e-4 * np.abs(xtx).max(), err_msg=key)
        np.testing.assert_allclose(s.hessian, 2.0 / s.count * s.xtx)
        assert s.sample is None


def test_samples_are_bounded_rows_of_the_inputs(tiny_onnx, tiny_hf, tiny_text):
    model = ir.load(tiny_onnx / "model.onnx")
    blocks = find_decoder_blocks(model)
    stats = collect_statistics(model, blocks, tiny_onnx, _config(tiny_text), sample_tokens=20,
                               groups=["layers.1.down", "layers.0.qkv"])
    assert sorted(stats) == ["layers.0.qkv", "layers.1.down"]
    windows = calibration_windows(tiny_text, load_tokenizer(tiny_onnx), 3, 48, 0)
    expected = _torch_inputs(tiny_hf, windows)
    for key, s in stats.items():
        assert s.sample.shape == (20, expected[key].shape[1]) and s.xtx is None
        distance = np.abs(s.sample[:, None, :] - expected[key][None]).max(axis=-1).min(axis=1)
        assert distance.max() < 1e-4, key  # every sampled row is one of the real input rows


def test_windows_are_seeded_slices_of_the_text(tiny_onnx, tiny_text):
    tokenizer = load_tokenizer(tiny_onnx)
    ids = np.asarray(tokenizer(tiny_text.read_text()))
    windows = calibration_windows(tiny_text, tokenizer, 5, 32, seed=7)
    assert windows.shape == (5, 32) and windows.dtype == np.int64
    np.testing.assert_array_equal(windows, calibration_windows(tiny_text, tokenizer, 5, 32, seed=7))
    assert not np.array_equal(windows, calibration_windows(tiny_text, tokenizer, 5, 32, seed=8))
    text = ids.tobytes()
    assert all(w.tobytes() in text for w in windows)


def test_bad_input(tiny_onnx, tiny_text, tmp_path):
    tokenizer = load_tokenizer(tiny_onnx)
    with pytest.raises(InputError, match="no such calibration text"):
        calibration_windows(tmp_path / "missing.txt", tokenizer, 1, 8, 0)
    short = tmp_path / "short.txt"
    short.write_text("w1 w2 w3\n")
    with pytest.raises(InputError, match="fewer than one calibration window of 8"):
        calibration_windows(short, tokenizer, 1, 8, 0)
    with pytest.raises(InputError, match="tokenizer"):
        load_tokenizer(tmp_path)
    with pytest.raises(InputError, match="model folder"):
        load_tokenizer(None)
    model = ir.load(tiny_onnx / "model.onnx")
    blocks = find_decoder_blocks(model)
    with pytest.raises(InputError, match="no linear group 'layers.5.qkv'"):
        collect_statistics(model, blocks, tiny_onnx, _config(tiny_text), groups=["layers.5.qkv"])


def test_model_with_external_data(tiny_onnx, tiny_text, tmp_path):
    """Weights kept in an external data file (read through memory maps) give the same statistics."""
    import shutil

    import onnx

    folder = tmp_path / "external"
    shutil.copytree(tiny_onnx, folder)
    onnx.save(onnx.load(tiny_onnx / "model.onnx"), folder / "model.onnx", save_as_external_data=True,
              location="model.onnx_data", size_threshold=0)
    stats = {}
    for source in (tiny_onnx, folder):
        model = ir.load(source / "model.onnx")
        stats[source] = collect_statistics(model, find_decoder_blocks(model), source, _config(tiny_text), groups=["layers.1.o"])
    np.testing.assert_array_equal(stats[folder]["layers.1.o"].max_abs, stats[tiny_onnx]["layers.1.o"].max_abs)


def test_tokenizer_json_encodes_like_auto_tokenizer(tiny_onnx, tiny_text):
    from transformers import AutoTokenizer

    text = tiny_text.read_text()
    assert load_tokenizer(tiny_onnx)(text) == AutoTokenizer.from_pretrained(tiny_onnx)(text)["input_ids"]


def test_block_statistics_measure_one_block_and_advance_on_request(tiny_onnx, tiny_text):
    """One block's statistics are plain data of that block's four inputs; the runner stays at the block unless
    asked to advance, and the next block's statistics then match one pass over the whole model."""
    model = ir.load(tiny_onnx / "model.onnx")
    blocks = find_decoder_blocks(model)
    config = _config(tiny_text)
    windows = config_windows(tiny_onnx, config)
    runner = BlockwiseRunner(model, blocks, windows)
    rows = sample_rows(*windows.shape, 20, config.seed)
    first = block_statistics(runner, blocks[0], rows=rows)
    assert sorted(first) == [f"layers.0.{g}" for g in ("down", "gate_up", "o", "qkv")] and runner.position == 0
    assert first["layers.0.o"].sample.shape == (20, first["layers.0.o"].max_abs.shape[0])
    again = block_statistics(runner, blocks[0], advance=True)
    assert runner.position == 1 and again["layers.0.o"].sample is None
    np.testing.assert_array_equal(again["layers.0.o"].max_abs, first["layers.0.o"].max_abs)
    second = block_statistics(runner, blocks[1])
    whole = collect_statistics(model, blocks, tiny_onnx, config, groups=["layers.1.down"])
    np.testing.assert_array_equal(second["layers.1.down"].mean_abs, whole["layers.1.down"].mean_abs)


def test_calibration_windows_do_not_load_transformers(tiny_onnx, tiny_text):
    """A folder with tokenizer.json is tokenized by ``tokenizers`` alone: transformers (and torch, ~300 MB) stay
    unloaded while quantizing."""
    import subprocess
    import sys

    code = ("import sys; from mxonnx.calibrate import calibration_windows, load_tokenizer; "
            f"w = calibration_windows({str(tiny_text)!r}, load_tokenizer({str(tiny_onnx)!r}), 2, 8, 0); "
            "assert w.shape == (2, 8); print(sorted(m for m in ('transformers', 'torch') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "[]"
