"""Greedy generation through optimum's ``ORTModelForCausalLM``, with the tokenizer's chat template and streaming.

The prompt is asked as one user message through the tokenizer's chat template when it has one (``raw=False``):
``apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)``, so an instruct model
answers the way it was trained to be asked; ``raw=True`` (or no template) feeds the prompt text as it is, with the
tokenizer's default special tokens. Generation is greedy and stops at the generation config's end-of-sequence
tokens or after ``max_new_tokens``. Tokens can be handed to a callback as they are decoded
(``transformers.TextStreamer``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from mxonnx.errors import InputError
from mxonnx.modelio import resolve_model


def load_generator(model: Path, fuse: bool = False):
    """``(ORTModelForCausalLM on the CPU, tokenizer)`` of a model folder (KV cache used when the graph has one);
    ``fuse``: its session is ``create_session(fuse=True)``'s (the graph fused for inference in memory)."""
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from mxonnx.eval import graph_input_names
    from mxonnx.export import quiet_libraries
    from mxonnx.session import create_session, session_options

    paths = resolve_model(model)
    if paths.folder is None or not (paths.folder / "config.json").is_file():
        raise InputError(f"{model}: generation needs a model folder with config.json and the tokenizer")
    has_past = any(name.startswith("past_key_values.") for name in graph_input_names(paths.onnx))
    with quiet_libraries():
        try:
            tokenizer = AutoTokenizer.from_pretrained(paths.folder)
        except (OSError, ValueError):
            raise InputError(f"{paths.folder}: no tokenizer found in the model folder") from None
        if fuse:
            config = AutoConfig.from_pretrained(paths.folder)
            config.use_cache = has_past
            try:
                generation_config = GenerationConfig.from_pretrained(paths.folder)
            except OSError:
                generation_config = GenerationConfig.from_model_config(config)
            session = create_session(paths.onnx, fuse=True)
            session._model_path = str(paths.onnx)  # opened from bytes; optimum reads the file's path from here
            lm = ORTModelForCausalLM(config=config, session=session, generation_config=generation_config,
                                     model_save_dir=paths.folder)
        else:
            lm = ORTModelForCausalLM.from_pretrained(paths.folder, file_name=paths.onnx.name, use_cache=has_past,
                                                     session_options=session_options(),
                                                     provider="CPUExecutionProvider")
    return lm, tokenizer


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def prompt_inputs(tokenizer, prompt: str, raw: bool = False) -> tuple[dict, bool]:
    """``(model inputs as torch tensors, whether the chat template was applied)`` for ``prompt``."""
    if not raw and has_chat_template(tokenizer):
        messages = [{"role": "user", "content": prompt}]
        inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True,
                                               return_tensors="pt")
        return {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}, True
    return dict(tokenizer(prompt, return_tensors="pt", return_token_type_ids=False)), False


def _streamer(tokenizer, emit: Callable[[str], None], skip_prompt: bool):
    from transformers import TextStreamer

    class CallbackStreamer(TextStreamer):
        """``TextStreamer`` handing each piece of decoded text to ``emit`` instead of printing it."""

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text:
                emit(text)

    return CallbackStreamer(tokenizer, skip_prompt=skip_prompt, skip_special_tokens=True)


def generate(model: Path, prompt: str, max_new_tokens: int = 32, raw: bool = False,
             emit: Callable[[str], None] | None = None, fuse: bool = False) -> dict:
    """Greedy generation from ``prompt`` (module docstring). ``emit`` receives the text as it is decoded: the reply
    under the chat template; the prompt followed by its continuation when raw.

    Returns ``{prompt, text, completion, tokens, token_ids, prompt_tokens, seconds, tokens_per_second,
    chat_template}``: ``text`` is what ``emit`` was given (raw: the whole sequence decoded, prompt included; chat: the
    reply), ``completion`` the new tokens decoded, ``tokens`` how many new tokens (an end-of-sequence token
    included) and ``token_ids`` their ids, ``seconds`` the time
    of ``generate`` (prompt and new tokens, not loading) and ``tokens_per_second = tokens / seconds``.
    """
    from mxonnx.export import quiet_libraries

    lm, tokenizer = load_generator(model, fuse=fuse)
    inputs, templated = prompt_inputs(tokenizer, prompt, raw)
    streamer = _streamer(tokenizer, emit, skip_prompt=templated) if emit is not None else None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with quiet_libraries():
        start = time.perf_counter()
        out = lm.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                          streamer=streamer)
        seconds = time.perf_counter() - start
    prompt_tokens = int(inputs["input_ids"].shape[1])
    new = out[0, prompt_tokens:]
    completion = tokenizer.decode(new, skip_special_tokens=True)
    return {
        "prompt": prompt,
        "text": completion if templated else tokenizer.decode(out[0], skip_special_tokens=True),
        "completion": completion,
        "tokens": int(new.shape[0]),
        "token_ids": [int(t) for t in new],
        "prompt_tokens": prompt_tokens,
        "seconds": seconds,
        "tokens_per_second": new.shape[0] / seconds if seconds > 0 else float("inf"),
        "chat_template": templated,
    }
