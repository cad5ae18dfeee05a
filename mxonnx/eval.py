"""WikiText-2 perplexity through onnxruntime (or torch, as a reference) and greedy generation through
optimum's ``ORTModelForCausalLM`` (``mxonnx.generate``).

Protocol (shared/data/README.md): ``text = "\\n\\n".join(raw.splitlines())``, tokenized once with the model's
tokenizer, cut into non-overlapping windows of ``seqlen`` tokens from the start (the partial last window is
dropped); in each window token t is predicted from tokens 0..t-1, and
``perplexity = exp(mean_t -log p(x_t | x_<t))`` over every predicted token of every window.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from mxonnx.errors import InputError
from mxonnx.modelio import resolve_model

LOGSOFTMAX_ROWS = 256  # rows of logits turned into float64 at a time


def token_windows(ids: np.ndarray, seqlen: int, max_windows: int | None = None) -> np.ndarray:
    """``[n, seqlen]`` non-overlapping windows of ``ids`` from the start; the partial last window is dropped."""
    if seqlen < 2:
        raise InputError(f"sequence length {seqlen} predicts no token; use at least 2")
    n = len(ids) // seqlen
    if n == 0:
        raise InputError(f"text has {len(ids)} tokens, fewer than one window of {seqlen}")
    if max_windows is not None:
        n = min(n, max_windows)
    return np.asarray(ids[: n * seqlen], dtype=np.int64).reshape(n, seqlen)


def window_nll(logits: np.ndarray, ids: np.ndarray) -> float:
    """Sum over t >= 1 of ``-log softmax(logits[t-1])[ids[t]]`` (logits ``[T, V]``, ids ``[T]``).

    ``log softmax(z)_k = z_k - m - log sum_j exp(z_j - m)`` with ``m = max_j z_j``, in float64, a block of rows at a time.
    """
    predicting, targets = logits[:-1], ids[1:]
    total = 0.0
    for start in range(0, len(targets), LOGSOFTMAX_ROWS):
        z = predicting[start : start + LOGSOFTMAX_ROWS].astype(np.float64)
        t = targets[start : start + LOGSOFTMAX_ROWS]
        m = z.max(axis=-1)
        log_norm = m + np.log(np.exp(z - m[:, None]).sum(axis=-1))
        total += float((log_norm - z[np.arange(len(t)), t]).sum())
    return total


class OrtCausalLM:
    """An onnxruntime session over an optimum decoder graph that returns the logits of whole sequences.

    Graphs with KV-cache inputs get an empty past ``[batch, kv_heads, 0, head_dim]`` (dims read from the graph,
    else from the model config); ``attention_mask`` (ones) and ``position_ids`` (0..T-1) are fed when present.
    """

    def __init__(self, onnx_path: Path, config=None, threads: int | None = None, fuse: bool = False):
        from mxonnx.session import create_session

        self.session = create_session(onnx_path, threads=threads, fuse=fuse)
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        if "input_ids" not in self.inputs or "logits" not in {o.name for o in self.session.get_outputs()}:
            raise InputError(f"{onnx_path}: not a causal language model graph (needs input_ids and logits)")
        self.past_names = [name for name in self.inputs if name.startswith("past_key_values.")]
        self.config = config

    def _past_shape(self, name: str, batch: int) -> tuple[int, int, int, int]:
        dims = self.inputs[name].shape
        if isinstance(dims[1], int) and isinstance(dims[3], int):
            return batch, dims[1], 0, dims[3]
        if self.config is None:
            raise InputError(f"{name} has symbolic head dims and no model config was found to read them from")
        cfg = self.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return batch, getattr(cfg, "num_key_value_heads", cfg.num_attention_heads), 0, head_dim

    def feed(self, input_ids: np.ndarray) -> dict[str, np.ndarray]:
        batch, length = input_ids.shape
        feed = {"input_ids": input_ids.astype(np.int64)}
        if "attention_mask" in self.inputs:
            feed["attention_mask"] = np.ones((batch, length), dtype=np.int64)
        if "position_ids" in self.inputs:
            feed["position_ids"] = np.broadcast_to(np.arange(length, dtype=np.int64), (batch, length)).copy()
        for name in self.past_names:
            dtype = np.float16 if self.inputs[name].type == "tensor(float16)" else np.float32
            feed[name] = np.zeros(self._past_shape(name, batch), dtype=dtype)
        return feed

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        """``[B, T, V]`` float logits for ``input_ids`` ``[B, T]``."""
        return self.session.run(["logits"], self.feed(input_ids))[0]


def graph_input_names(onnx_path: Path) -> list[str]:
    """Names of the graph inputs, read without loading external weights."""
    import onnx

    return [i.name for i in onnx.load(str(onnx_path), load_external_data=False).graph.input]


def _read_text(data: Path | None) -> str:
    from mxonnx.config import default_eval_text

    path = Path(data) if data is not None else default_eval_text()
    if not path.is_file():
        raise InputError(f"{path}: no such text file (set --data or MXONNX_DATA)")
    raw = path.read_text(encoding="utf-8")
    return "\n\n".join(raw.splitlines())


def _tokenize(tokenizer, text: str) -> np.ndarray:
    """All token ids of ``text`` with the tokenizer's default special tokens (no truncation)."""
    from mxonnx.export import quiet_libraries

    with quiet_libraries():  # hides "sequence longer than the model's maximum length"
        return np.asarray(tokenizer(text)["input_ids"], dtype=np.int64)


def _onnx_folder(model: Path):
    """``(ModelPaths, tokenizer)`` of an ONNX model folder; a bare .onnx file has no tokenizer."""
    from transformers import AutoTokenizer

    from mxonnx.export import quiet_libraries

    paths = resolve_model(model)
    if paths.folder is None:
        raise InputError(f"{model}: perplexity needs a model folder with the tokenizer, not a bare .onnx file")
    try:
        with quiet_libraries():
            tokenizer = AutoTokenizer.from_pretrained(paths.folder)
    except (OSError, ValueError):
        raise InputError(f"{paths.folder}: no tokenizer found in the model folder") from None
    return paths, tokenizer


def _model_config(paths):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(paths.folder) if (paths.folder / "config.json").is_file() else None


def _nlls(logits_of, windows: np.ndarray, progress: bool) -> Iterator[float]:
    """Per window, its summed NLL from ``logits_of`` (``[1, T] -> [1, T, V]``)."""
    from tqdm.auto import tqdm

    for window in tqdm(windows, desc="perplexity", unit="window", disable=not progress):
        yield window_nll(logits_of(window[None])[0], window)


def _blockwise_nlls(lm, windows: np.ndarray) -> Iterator[float]:
    """Per window, its summed NLL from a ``mxonnx.stream_eval.StreamedCausalLM``."""
    for window, logits in zip(windows, lm.window_logits(windows)):
        yield window_nll(logits, window)


def _onnx_nlls(paths, windows: np.ndarray, blockwise: bool | None, progress: bool,
               fuse: bool = False) -> tuple[str, Iterator[float]]:
    """``(path, per-window NLLs)``: block by block when ``blockwise``, or (None) when the whole-graph session would
    exceed ``mxonnx.stream_eval.eval_budget()``; a graph that cannot be cut then falls back to the whole graph."""
    from mxonnx.stream_eval import StreamedCausalLM, choose_blockwise

    config = _model_config(paths)
    if choose_blockwise(paths.onnx, blockwise):
        try:
            lm = StreamedCausalLM(paths.onnx, config=config, progress=progress, fuse=fuse)
            return "blockwise", _blockwise_nlls(lm, windows)
        except InputError as exc:
            if blockwise:
                raise
            warnings.warn(f"evaluating the whole graph at once: {exc}", stacklevel=2)
    return "whole-graph", _nlls(OrtCausalLM(paths.onnx, config=config, fuse=fuse).logits, windows, progress)


def _torch_model(model: Path):
    """``(logits function, tokenizer)`` for a Hugging Face folder or .gguf file run in torch."""
    import torch

    from mxonnx.export import load_causal_lm, quiet_libraries

    with quiet_libraries():
        lm, tokenizer = load_causal_lm(Path(model))

    def logits(ids: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return lm(torch.from_numpy(ids)).logits.numpy()

    return logits, tokenizer


def evaluate_perplexity(model: Path, data: Path | None = None, seqlen: int = 2048, max_windows: int | None = None,
                        reference: str | None = None, progress: bool = True, blockwise: bool | None = None,
                        fuse: bool = False) -> dict:
    """Perplexity of ``model`` on ``data`` (default WikiText-2 raw test) with the protocol of this module.

    ``model`` is an ONNX model folder run in onnxruntime, or with ``reference="torch"`` a Hugging Face folder or
    .gguf file run in transformers. ONNX graphs run in one session, or one decoder block at a time
    (``mxonnx.stream_eval``, the same values) with ``blockwise=True``, or with None when the whole-graph session's
    weights are estimated above ``mxonnx.stream_eval.eval_budget()``; ``path`` says which ran. ``tokens`` counts the
    tokens fed (windows x seqlen); ``seconds`` and ``tokens_per_second`` time the forward passes and log-softmax
    (block by block, also opening each block's session), not loading or tokenizing.
    """
    if reference not in (None, "torch"):
        raise InputError(f"unknown reference {reference!r}; the only reference is 'torch'")
    text = _read_text(data)
    if reference == "torch":
        logits_of, tokenizer = _torch_model(model)
        windows = token_windows(_tokenize(tokenizer, text), seqlen, max_windows)
        path, nlls = "torch", _nlls(logits_of, windows, progress)
    else:  # the session is opened only once the text has passed its checks
        paths, tokenizer = _onnx_folder(model)
        windows = token_windows(_tokenize(tokenizer, text), seqlen, max_windows)
        path, nlls = _onnx_nlls(paths, windows, blockwise, progress, fuse)
    start = time.perf_counter()
    total_nll = sum(nlls, 0.0)
    seconds = time.perf_counter() - start
    predicted = windows.shape[0] * (seqlen - 1)
    return {
        "perplexity": float(np.exp(total_nll / predicted)),
        "tokens": int(windows.size),
        "windows": int(windows.shape[0]),
        "seqlen": seqlen,
        "seconds": seconds,
        "tokens_per_second": windows.size / seconds if seconds > 0 else float("inf"),
        "path": path,
        "fused": bool(fuse and reference is None),
    }


def generate_text(model: Path, prompt: str, max_new_tokens: int = 32) -> str:
    """Greedy continuation of the raw ``prompt`` (no chat template) by optimum's ``ORTModelForCausalLM``; returns
    prompt + continuation (the whole sequence decoded without special tokens). See ``mxonnx.generate``."""
    from mxonnx.generate import generate

    return generate(model, prompt, max_new_tokens=max_new_tokens, raw=True)["text"]
