"""Hugging Face folder or GGUF file -> ONNX model folder through optimum's exporter.

OUT holds ``model.onnx`` with its weights in ``model.onnx_data`` (always external, whatever the model's size: the
quantizer then memory-maps them instead of parsing them into memory), config.json,
generation_config.json and the tokenizer, and loads in optimum's ``ORTModelForCausalLM``. After the export
the ONNX logits are checked against the torch logits on a short input.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np

from mxonnx.errors import InputError
from mxonnx.modelio import EXTERNAL_DATA_NAME, ONNX_NAME, atomic_output_dir

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_LIBRARY_LOGGERS = ("transformers", "optimum", "torch", "accelerate")
CHECK_TOKENS = 12  # length of the input on which ONNX and torch logits are compared
CHECK_RTOL = 1e-4  # allowed |onnx - torch| relative to max(1, max |torch logits|)


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Hide the warnings, log lines and prints of torch/transformers/optimum inside the block.

    On failure the captured text is attached to the exception as a note (shown by ``--debug`` tracebacks).
    """
    import transformers

    captured = io.StringIO()
    handler = logging.StreamHandler(captured)
    loggers = [logging.getLogger(name) for name in _LIBRARY_LOGGERS]
    saved = [(lg.level, lg.propagate, lg.handlers) for lg in loggers]
    bars_were_enabled = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    for lg in loggers:
        lg.setLevel(logging.WARNING)
        lg.handlers = [handler]
        lg.propagate = False
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            warnings.simplefilter("ignore")
            yield
    except BaseException as exc:
        if captured.getvalue().strip() and hasattr(exc, "add_note"):  # Python >= 3.11
            exc.add_note("library output:\n" + captured.getvalue())
        raise
    finally:
        for lg, (level, propagate, handlers) in zip(loggers, saved):
            lg.handlers = handlers
            lg.setLevel(level)
            lg.propagate = propagate
        if bars_were_enabled:
            transformers.utils.logging.enable_progress_bar()


def _check_gguf(path: Path) -> None:
    """Refuse a GGUF file that does not parse (corrupt, truncated) or does not hold a Llama."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
        field = reader.fields.get("general.architecture")
        architecture = field.contents() if field is not None else None
    except Exception as exc:  # noqa: BLE001 - every parse failure means the same thing to the user
        raise InputError(f"{path}: not a readable GGUF file ({' '.join(str(exc).split()) or type(exc).__name__})") from None
    if architecture != "llama":
        raise InputError(f"{path}: GGUF architecture is {architecture!r}; only Llama models are supported")


def _check_hf_folder(path: Path) -> None:
    """Refuse a folder without a Hugging Face config and weights, or whose model is not a Llama."""
    from transformers import AutoConfig

    if not (path / "config.json").is_file() or not any((path / name).is_file() for name in _WEIGHT_FILES):
        raise InputError(f"{path}: folder holds no Hugging Face model (config.json and model.safetensors or pytorch_model.bin)")
    try:
        model_type = AutoConfig.from_pretrained(path).model_type
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: unreadable config.json ({' '.join(str(exc).split())})") from None
    if model_type != "llama":
        raise InputError(f"{path}: model type is {model_type!r}; only Llama models are supported")


def check_source(src: Path) -> None:
    """Raise ``InputError`` unless ``src`` is a Llama as a Hugging Face folder or a .gguf file."""
    if not src.exists():
        raise InputError(f"{src}: no such file or folder")
    if src.is_dir():
        _check_hf_folder(src)
    elif src.suffix.lower() == ".gguf":
        _check_gguf(src)
    else:
        raise InputError(f"{src}: expected a Hugging Face model folder or a .gguf file")


def _load_gguf(src: Path):
    """A GGUF-loaded model cannot be saved or exported as is: copy its (dequantized) weights into a fresh
    ``LlamaForCausalLM`` of the same config and tie the embeddings again."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    model = LlamaForCausalLM(loaded.config)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    tokenizer.vocab_file = None  # else save_pretrained copies the whole GGUF as "tokenizer.model"
    return model, tokenizer


def _load_checked(src: Path):
    """``load_causal_lm`` for a source that already passed ``check_source``."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    if src.is_dir():
        model = LlamaForCausalLM.from_pretrained(src, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(src)
    else:
        model, tokenizer = _load_gguf(src)
    return model.eval(), tokenizer


def load_causal_lm(src: Path):
    """``(LlamaForCausalLM in float32, eval mode, tokenizer)`` from a Hugging Face folder or a .gguf file."""
    check_source(src)
    return _load_checked(src)


def _check_logits(model, onnx_path: Path) -> float:
    """Max |ONNX - torch| logits on a short fixed input; raise when above ``CHECK_RTOL`` (relative)."""
    import torch

    from mxonnx.eval import OrtCausalLM

    ids = (np.arange(CHECK_TOKENS, dtype=np.int64) * 7919 + 3) % model.config.vocab_size
    with torch.no_grad():
        expected = model(torch.from_numpy(ids[None])).logits.numpy()
    actual = OrtCausalLM(onnx_path, config=model.config).logits(ids[None])
    diff = float(np.abs(actual - expected).max())
    tolerance = CHECK_RTOL * max(1.0, float(np.abs(expected).max()))
    if not diff <= tolerance:
        raise RuntimeError(f"exported ONNX logits differ from torch by {diff:.3g} (tolerance {tolerance:.3g})")
    return diff


def store_weights_externally(onnx_path: Path) -> None:
    """Move the weights of a single-file ONNX model into ``model.onnx_data`` beside it (no-op when optimum has
    done so already, as it does above 2 GB)."""
    import onnx_ir as ir

    if (onnx_path.parent / EXTERNAL_DATA_NAME).exists():
        return
    model = ir.load(onnx_path)
    ir.save(model, onnx_path, external_data=EXTERNAL_DATA_NAME)


def export_model(src: Path, out: Path, past: bool = True, progress: bool = True) -> dict:
    """Export ``src`` (HF folder or .gguf) to the ONNX folder ``out``; ``out`` is whole or absent afterwards.

    ``past=True`` exports optimum's ``text-generation-with-past`` graph (KV-cache inputs/outputs), else
    ``text-generation``. Returns ``{output, seconds, past, logits_max_abs_diff}`` (the last from the check of
    ONNX against torch logits on ``CHECK_TOKENS`` tokens).
    """
    from optimum.exporters.onnx import onnx_export_from_model
    from tqdm.auto import tqdm

    src, out = Path(src), Path(out)
    start = time.perf_counter()
    check_source(src)
    with atomic_output_dir(out, src) as tmp:
        steps = tqdm(total=3, desc="export", unit="step", disable=not progress, file=sys.stderr)
        with steps, quiet_libraries():
            steps.set_postfix_str("load")
            model, tokenizer = _load_checked(src)
            model.config.use_cache = past
            steps.update()
            steps.set_postfix_str("optimum export")
            # A model already in memory goes to the function main_export ends in: GGUF needs no HF copy on disk.
            onnx_export_from_model(model, tmp, task="text-generation-with-past" if past else "text-generation",
                                   do_validation=False)
            tokenizer.save_pretrained(tmp)
            store_weights_externally(tmp / ONNX_NAME)
            steps.update()
            steps.set_postfix_str("check logits")
            diff = _check_logits(model, tmp / ONNX_NAME)
            steps.update()
    return {"output": str(out), "seconds": time.perf_counter() - start, "past": past, "logits_max_abs_diff": diff}
