"""Hugging Face folder or GGUF file -> ONNX model folder, built from optimum's export of a small copy of the model.

OUT holds ``model.onnx`` with its weights in ``model.onnx_data`` (always external, whatever the model's size: the
quantizer then memory-maps them instead of parsing them into memory), config.json, generation_config.json and the
tokenizer, and loads in optimum's ``ORTModelForCausalLM``. The graph is optimum's (``mxonnx.export_stream``: a
2-layer copy of the model with a small vocabulary and MLP is exported by optimum and its last decoder block copied
L-2 times); the weights are then written one checkpoint tensor at a time (``mxonnx.checkpoint``), stored in
``--dtype`` (float16/bfloat16 weights are read through ``Cast`` nodes: compute stays float32).

Memory: for a Hugging Face folder with safetensors weights the peak grows with one decoder block (the template's
two blocks, one checkpoint tensor, and the logits check below), not with the number of layers. GGUF files (dequantized
by transformers) and ``pytorch_model.bin`` folders are loaded whole into memory first, then follow the same route.

Logits check: ONNX logits (onnxruntime) against torch logits on ``CHECK_TOKENS`` tokens, the torch model's weights
rounded to the export dtype (so the check is as strict at every dtype). Models of up to ``FULL_CHECK_BYTES`` of
float32 weights are checked whole; larger ones on their first ``CHECK_LAYERS`` decoder layers with the final norm and
lm_head (a second graph over the same ``model.onnx_data``, removed afterwards): that covers the embedding, the head,
the template's blocks and one copied block, with memory independent of the depth.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import io
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np

from mxonnx.architectures import CAUSAL_LM_CLASSES, GGUF_ARCHITECTURES, causal_lm_class
from mxonnx.errors import InputError
from mxonnx.export_stream import DTYPES
from mxonnx.modelio import EXTERNAL_DATA_NAME, ONNX_NAME, atomic_output_dir

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_LIBRARY_LOGGERS = ("transformers", "optimum", "torch", "accelerate")
CHECK_TOKENS = 12  # length of the input on which ONNX and torch logits are compared
CHECK_RTOL = 1e-4  # allowed |onnx - torch| relative to max(1, max |torch logits|)
FULL_CHECK_BYTES = 2 << 30  # float32 weight bytes up to which the logits check runs the whole model
CHECK_LAYERS = 3  # decoder layers of the reduced check of larger models
CHECK_GRAPH_NAME = "check.onnx"  # the reduced check's graph, beside model.onnx_data while it runs


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
    """Refuse a GGUF file that does not parse (corrupt, truncated) or whose architecture is not supported."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
        field = reader.fields.get("general.architecture")
        architecture = field.contents() if field is not None else None
    except Exception as exc:  # noqa: BLE001 - every parse failure means the same thing to the user
        raise InputError(f"{path}: not a readable GGUF file ({' '.join(str(exc).split()) or type(exc).__name__})") from None
    if architecture not in GGUF_ARCHITECTURES:
        raise InputError(f"{path}: GGUF architecture {architecture!r} is not supported "
                         f"(supported: {', '.join(GGUF_ARCHITECTURES)})")


def _check_hf_folder(path: Path) -> None:
    """Refuse a folder without a Hugging Face config and weights, or whose model type is not supported."""
    from transformers import AutoConfig

    if not (path / "config.json").is_file() or not any((path / name).is_file() for name in _WEIGHT_FILES):
        raise InputError(f"{path}: folder holds no Hugging Face model (config.json and model.safetensors or pytorch_model.bin)")
    try:
        model_type = AutoConfig.from_pretrained(path).model_type
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: unreadable config.json ({' '.join(str(exc).split())})") from None
    if model_type not in CAUSAL_LM_CLASSES:
        raise InputError(f"{path}: model type {model_type!r} is not supported (supported: {', '.join(CAUSAL_LM_CLASSES)})")


def check_source(src: Path) -> None:
    """Raise ``InputError`` unless ``src`` is a supported model (``mxonnx.architectures``) as a Hugging Face folder
    or a .gguf file."""
    if not src.exists():
        raise InputError(f"{src}: no such file or folder")
    if src.is_dir():
        _check_hf_folder(src)
    elif src.suffix.lower() == ".gguf":
        _check_gguf(src)
    else:
        raise InputError(f"{src}: expected a Hugging Face model folder or a .gguf file")


def keep_byte_level(tokenizer) -> None:
    """Make a byte-level BPE tokenizer (ByteLevel pre-tokenizer) byte-level only: no byte fallback, a ByteLevel
    decoder. transformers builds GGUF ``gpt2`` tokenizers with SentencePiece's byte fallback and ``▁`` decoders;
    with a byte-level vocabulary they never act (every byte has a token; the ids and text are the same), but
    other readers of tokenizer.json (onnxruntime-genai's tokenizer) then take it for SentencePiece and map
    newlines and spaces to unknown ids."""
    from tokenizers import decoders, models, pre_tokenizers

    backend = tokenizer.backend_tokenizer
    if isinstance(backend.pre_tokenizer, pre_tokenizers.ByteLevel) and isinstance(backend.model, models.BPE):
        backend.model.byte_fallback = False
        backend.decoder = decoders.ByteLevel()


def _load_gguf(src: Path):
    """A GGUF-loaded model cannot be saved or exported as is: copy its (dequantized) weights into a fresh model of
    the same class and config and tie the embeddings again."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    model = causal_lm_class(loaded.config)(loaded.config)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    tokenizer.vocab_file = None  # else save_pretrained copies the whole GGUF as "tokenizer.model"
    keep_byte_level(tokenizer)
    return model, tokenizer


def _load_checked(src: Path):
    """``load_causal_lm`` for a source that already passed ``check_source``."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    if src.is_dir():
        model = causal_lm_class(AutoConfig.from_pretrained(src)).from_pretrained(src, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(src)
    else:
        model, tokenizer = _load_gguf(src)
    return model.eval(), tokenizer


def load_causal_lm(src: Path):
    """``(causal LM in float32, eval mode, tokenizer)`` from a Hugging Face folder or a .gguf file."""
    check_source(src)
    return _load_checked(src)


def _generation_config(src: Path, config):
    """The folder's generation_config.json, else the one transformers derives from the model config."""
    from transformers import GenerationConfig

    if (src / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(src)
    return GenerationConfig.from_model_config(config)


def _open_source(src: Path):
    """``(config, generation_config, tokenizer, tensors)`` of a source that passed ``check_source``; ``tensors`` is a
    ``mxonnx.checkpoint.TensorSource`` (safetensors and GGUF read tensor by tensor, else the model loaded whole)."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from mxonnx.checkpoint import GGUFSource, SafetensorsSource, StateDictSource, has_safetensors

    if not src.is_dir():
        config = AutoConfig.from_pretrained(src.parent, gguf_file=src.name)  # the metadata only
        tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
        tokenizer.vocab_file = None  # else save_pretrained copies the whole GGUF as "tokenizer.model"
        return config, GenerationConfig.from_model_config(config), tokenizer, GGUFSource(src, config)
    config = AutoConfig.from_pretrained(src)
    tokenizer = AutoTokenizer.from_pretrained(src)
    if has_safetensors(src):
        tensors = SafetensorsSource(src, tied=bool(config.tie_word_embeddings))
    else:
        tensors = StateDictSource(causal_lm_class(config).from_pretrained(src, dtype=torch.float32), str(src))
    return config, _generation_config(src, config), tokenizer, tensors


def _parameter_shapes(config) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of the causal LM of ``config`` (built on the meta device: no memory)."""
    import torch

    with torch.device("meta"):
        model = causal_lm_class(config)(config)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def _save_assets(folder: Path, config, generation, tokenizer, past: bool) -> None:
    """config.json, generation_config.json and the tokenizer as optimum's export writes them (generation parameters
    set in the model config move to the generation config)."""
    import torch

    config = copy.deepcopy(config)
    config.use_cache = past
    config.dtype = torch.float32  # the graph's inputs, outputs and compute
    generation = copy.deepcopy(generation)
    for name, value in config._get_non_default_generation_parameters().items():
        setattr(generation, name, value)
        setattr(config, name, None)
    config.save_pretrained(folder)
    try:
        generation.save_pretrained(folder)
    except ValueError:  # transformers refuses to save a generation config it finds invalid; optimum skips it too
        pass
    tokenizer.save_pretrained(folder)


def _reference_logits(config, tensors, layers: int, dtype: str, ids: np.ndarray) -> np.ndarray:
    """Torch logits of the first ``layers`` decoder layers of the checkpoint (with the final norm and lm_head), its
    weights rounded to ``dtype`` and computed in float32. The model is built on the meta device and each module
    (embedding, decoder layer, norm, head) gets its weights from ``tensors`` just before it runs and drops them after,
    so at most one decoder layer's weights are in memory."""
    import torch

    cfg = copy.deepcopy(config)
    cfg.num_hidden_layers, cfg.use_cache = layers, False
    with torch.device("meta"):
        model = causal_lm_class(cfg)(cfg).eval()
    model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg)  # its inv_freq buffer is computed, not loaded
    stored = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    names = {id(module): name for name, module in model.named_modules()}

    def swap(module, load: bool) -> None:
        for name, p in list(module.named_parameters(remove_duplicate=False)):
            owner_name, _, attr = name.rpartition(".")
            owner = module.get_submodule(owner_name)
            value = (tensors.read(f"{names[id(module)]}.{name}").to(stored).to(torch.float32) if load
                     else torch.empty_like(p, device="meta"))
            owner._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)

    for module in [model.model.embed_tokens, *model.model.layers, model.model.norm, model.lm_head]:
        module.register_forward_pre_hook(lambda m, _: swap(m, True))
        module.register_forward_hook(lambda m, _, __: swap(m, False))
    with torch.no_grad():
        logits = model(torch.from_numpy(ids[None])).logits.numpy()
    del model
    gc.collect()
    return logits


def _onnx_logits(onnx_path: Path, config, ids: np.ndarray) -> np.ndarray:
    """onnxruntime logits of ``ids`` (empty KV cache) from a session that keeps memory low: no graph optimization
    (16-bit weights are cast when used, not folded into float32 copies at load), no prepacked weight copies, no arena
    (each cast weight is freed after use); onnxruntime maps the external data file."""
    import onnxruntime as ort

    from mxonnx.session import session_options

    options = session_options(optimize=False)
    options.enable_cpu_mem_arena = False
    options.add_session_config_entry("session.disable_prepacking", "1")
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    feed = {"input_ids": ids[None]}
    for name in (i.name for i in session.get_inputs()):
        if name == "attention_mask":
            feed[name] = np.ones((1, len(ids)), np.int64)
        elif name == "position_ids":
            feed[name] = np.arange(len(ids), dtype=np.int64)[None]
        elif name.startswith("past_key_values."):
            feed[name] = np.zeros((1, config.num_key_value_heads, 0, head_dim), np.float32)
    logits = session.run(["logits"], feed)[0]
    del session
    gc.collect()
    return logits


def _check_logits(folder: Path, template, config, tensors, shapes, dtype: str) -> tuple[float, int]:
    """Max |ONNX - torch| logits on a short fixed input and the number of decoder layers checked; raise when above
    ``CHECK_RTOL`` (relative). Large models are checked on their first ``CHECK_LAYERS`` layers (module docstring)."""
    import onnx

    from mxonnx.export_stream import build_model, point_like

    layers = config.num_hidden_layers
    if 4 * sum(int(np.prod(s)) for s in shapes.values()) > FULL_CHECK_BYTES:
        layers = min(layers, CHECK_LAYERS)
    ids = (np.arange(CHECK_TOKENS, dtype=np.int64) * 7919 + 3) % config.vocab_size
    expected = _reference_logits(config, tensors, layers, dtype, ids)
    onnx_path = folder / ONNX_NAME
    if layers < config.num_hidden_layers:
        check, _ = build_model(template, layers, shapes, config.vocab_size, dtype)
        point_like(check.graph, onnx.load(str(onnx_path), load_external_data=False).graph)
        onnx_path = folder / CHECK_GRAPH_NAME
        onnx_path.write_bytes(check.SerializeToString())
    try:
        actual = _onnx_logits(onnx_path, config, ids)
    finally:
        if onnx_path.name == CHECK_GRAPH_NAME:
            onnx_path.unlink()
    diff = float(np.abs(actual - expected).max())
    tolerance = CHECK_RTOL * max(1.0, float(np.abs(expected).max()))
    if not diff <= tolerance:
        raise RuntimeError(f"exported ONNX logits differ from torch by {diff:.3g} (tolerance {tolerance:.3g})")
    return diff, layers


def store_weights_externally(onnx_path: Path) -> None:
    """Move the weights of a single-file ONNX model into ``model.onnx_data`` beside it (no-op when they are there)."""
    import onnx_ir as ir

    if (onnx_path.parent / EXTERNAL_DATA_NAME).exists():
        return
    model = ir.load(onnx_path)
    ir.save(model, onnx_path, external_data=EXTERNAL_DATA_NAME)


def export_model(src: Path, out: Path, past: bool = True, progress: bool = True, dtype: str = "float32") -> dict:
    """Export ``src`` (HF folder or .gguf) to the ONNX folder ``out``; ``out`` is whole or absent afterwards.

    ``past=True`` exports optimum's ``text-generation-with-past`` graph (KV-cache inputs/outputs), else
    ``text-generation``; weights are stored in ``dtype`` (float32, float16 or bfloat16). Returns ``{output, seconds,
    past, dtype, logits_max_abs_diff, logits_check_layers}`` (the check of ONNX against torch logits on
    ``CHECK_TOKENS`` tokens, over that many decoder layers).
    """
    from tqdm.auto import tqdm

    from mxonnx.export_stream import build_model, export_template, write_weights

    if dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    src, out = Path(src), Path(out)
    start = time.perf_counter()
    check_source(src)
    with atomic_output_dir(out, src) as tmp:
        steps = tqdm(total=4, desc="export", unit="step", disable=not progress, file=sys.stderr)
        with steps, quiet_libraries():
            steps.set_postfix_str("load")
            config, generation, tokenizer, tensors = _open_source(src)
            if config.num_hidden_layers < 1:
                raise InputError(f"{src}: the model has no decoder layer")
            shapes = _parameter_shapes(config)
            tensors.check(shapes)  # a missing or misshapen tensor fails here, before anything is exported
            steps.update()
            steps.set_postfix_str("optimum export of the template")
            template = export_template(config, past, tmp / ".template")
            model, weights = build_model(template, config.num_hidden_layers, shapes, config.vocab_size, dtype)
            steps.update()
            steps.set_postfix_str("weights")
            write_weights(model.graph, weights, tensors, tmp / EXTERNAL_DATA_NAME)
            (tmp / ONNX_NAME).write_bytes(model.SerializeToString())
            del model
            _save_assets(tmp, config, generation, tokenizer, past)
            steps.update()
            steps.set_postfix_str("check logits")
            diff, checked = _check_logits(tmp, template, config, tensors, shapes, dtype)
            steps.update()
    return {"output": str(out), "seconds": time.perf_counter() - start, "past": past, "dtype": dtype,
            "logits_max_abs_diff": diff, "logits_check_layers": checked}
