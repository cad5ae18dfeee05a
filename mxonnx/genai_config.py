"""``genai_config.json``: what onnxruntime-genai needs to load a model folder and generate from it.

onnxruntime-genai (``onnxruntime_genai.Model(folder)``) reads the decoder graph's file name and the names of its
inputs and outputs, the head counts and sizes, the context length, the special token ids and the default search
options from this file, and the tokenizer from ``tokenizer.json`` + ``tokenizer_config.json`` beside it. The names
are those of optimum's decoder export: ``input_ids``, ``attention_mask``, ``position_ids``,
``past_key_values.N.key/value`` -> ``logits``, ``present.N.key/value`` (checked against the graph). Search defaults
come from generation_config.json (greedy unless it samples), ``max_length`` is the context length.

MX model folders (``com.mxonnx`` ops) run there too: the ops' ONNX function bodies need nothing loaded, and the
native library is registered through ``session_options.custom_ops_library`` when it is built. onnxruntime-genai
loads such a library only from inside the model folder (or the working directory, or an EP's folder), so it is
copied into the folder as ``NATIVE_LIBRARY_NAME``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from mxonnx.errors import InputError

GENAI_CONFIG_NAME = "genai_config.json"
NATIVE_LIBRARY_NAME = "libmxonnx_ops.so"  # the native MX op library's copy inside an MX model folder
GENAI_MODEL_TYPES = ("llama", "mistral", "qwen2")  # decoder-only types of onnxruntime-genai that mxonnx writes
PAST_KEY, PAST_VALUE = "past_key_values.%d.key", "past_key_values.%d.value"
PRESENT_KEY, PRESENT_VALUE = "present.%d.key", "present.%d.value"
OPTIONAL_INPUTS = ("attention_mask", "position_ids")
# onnxruntime fuses DequantizeLinear + MatMul into MatMulNBits; level 0 keeps its float activations (exact)
EXACT_SESSION_ENTRIES = {"session.qdq_matmulnbits_accuracy_level": "0"}


class GenaiUnsupportedError(InputError):
    """The folder lacks what onnxruntime-genai's decoder needs: config.json, or the graph's KV-cache inputs/outputs."""


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: unreadable JSON ({' '.join(str(exc).split())})") from None


def _layer_names(names: list[str], pattern: str) -> list[int]:
    regex = re.compile(re.escape(pattern).replace("%d", r"(\d+)") + "$")
    return sorted(int(m.group(1)) for name in names if (m := regex.match(name)))


def _first(*values):
    return next((v for v in values if v is not None), None)


def _search_options(generation: dict, context_length: int) -> dict:
    """onnxruntime-genai's search section from a Hugging Face generation config (its defaults where unset)."""
    sample = bool(generation.get("do_sample", False))
    return {
        "do_sample": sample,
        "num_beams": int(generation.get("num_beams") or 1),
        "num_return_sequences": 1,
        "max_length": context_length,
        "min_length": 0,
        "temperature": float(_first(generation.get("temperature"), 1.0)),
        "top_k": int(_first(generation.get("top_k"), 50)) if sample else 1,
        "top_p": float(_first(generation.get("top_p"), 1.0)),
        "repetition_penalty": float(_first(generation.get("repetition_penalty"), 1.0)),
        "past_present_share_buffer": False,
        "early_stopping": True,
        "length_penalty": 1.0,
        "no_repeat_ngram_size": 0,
        "diversity_penalty": 0.0,
    }


def genai_config(folder: Path, onnx_name: str = "model.onnx", custom_ops_library: str | None = None) -> dict:
    """The ``genai_config.json`` contents for the model folder ``folder`` (its config.json, generation_config.json
    and the graph ``onnx_name``). ``custom_ops_library``: a library path registered in the decoder's session
    (onnxruntime-genai accepts only paths inside the model folder, the working directory or an EP's folder)."""
    import onnx

    folder = Path(folder)
    config = _read_json(folder / "config.json")
    if not config:
        raise GenaiUnsupportedError("onnxruntime-genai needs config.json in the model folder")
    generation = _read_json(folder / "generation_config.json")
    graph = onnx.load(str(folder / onnx_name), load_external_data=False).graph
    inputs, outputs = [i.name for i in graph.input], [o.name for o in graph.output]
    layers = int(config["num_hidden_layers"])
    if "input_ids" not in inputs or "logits" not in outputs:
        raise InputError(f"{folder / onnx_name}: not a causal language model graph (needs input_ids and logits)")
    for names, patterns in ((inputs, (PAST_KEY, PAST_VALUE)), (outputs, (PRESENT_KEY, PRESENT_VALUE))):
        for pattern in patterns:
            if _layer_names(names, pattern) != list(range(layers)):
                raise GenaiUnsupportedError(f"onnxruntime-genai needs the graph's KV cache ({pattern % 0} ... for "
                                            f"{layers} layers); export the model without --no-past")
    heads = int(config["num_attention_heads"])
    head_size = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
    context_length = int(config.get("max_position_embeddings") or 2048)
    eos = _first(generation.get("eos_token_id"), config.get("eos_token_id"))
    pad = _first(generation.get("pad_token_id"), config.get("pad_token_id"), eos[0] if isinstance(eos, list) else eos)
    session_options = {"log_id": "onnxruntime-genai", "provider_options": [], **EXACT_SESSION_ENTRIES}
    if custom_ops_library is not None:
        session_options["custom_ops_library"] = str(custom_ops_library)
    model_type = config.get("model_type", "llama")
    return {
        "model": {
            "type": model_type if model_type in GENAI_MODEL_TYPES else "llama",
            "bos_token_id": _first(generation.get("bos_token_id"), config.get("bos_token_id")),
            "eos_token_id": eos,
            "pad_token_id": pad,
            "vocab_size": int(config["vocab_size"]),
            "context_length": context_length,
            "decoder": {
                "filename": onnx_name,
                "session_options": session_options,
                "hidden_size": int(config["hidden_size"]),
                "num_attention_heads": heads,
                "num_key_value_heads": int(config.get("num_key_value_heads") or heads),
                "num_hidden_layers": layers,
                "head_size": head_size,
                "inputs": {"input_ids": "input_ids",
                           **{name: name for name in OPTIONAL_INPUTS if name in inputs},
                           "past_key_names": PAST_KEY, "past_value_names": PAST_VALUE},
                "outputs": {"logits": "logits", "present_key_names": PRESENT_KEY, "present_value_names": PRESENT_VALUE},
            },
        },
        "search": _search_options(generation, context_length),
    }


def write_genai_config(folder: Path, onnx_name: str = "model.onnx", custom_ops_library: str | None = None) -> Path:
    """Write :func:`genai_config` as ``folder/genai_config.json``; returns its path."""
    path = Path(folder) / GENAI_CONFIG_NAME
    path.write_text(json.dumps(genai_config(folder, onnx_name, custom_ops_library), indent=2) + "\n", encoding="utf-8")
    return path


def write_mx_genai_config(folder: Path, onnx_name: str = "model.onnx") -> Path:
    """:func:`write_genai_config` for an MX model folder: with the native library copied into ``folder`` and
    registered when it is built (``mxonnx.session.native_library()``, and ``MXONNX_NO_NATIVE`` is not 1), else with
    the ops' function bodies."""
    from mxonnx.session import native_library

    library = native_library() if os.environ.get("MXONNX_NO_NATIVE") != "1" else None
    if library is None:
        return write_genai_config(folder, onnx_name)
    path = write_genai_config(folder, onnx_name, custom_ops_library=NATIVE_LIBRARY_NAME)
    shutil.copy2(library, Path(folder) / NATIVE_LIBRARY_NAME)
    return path
