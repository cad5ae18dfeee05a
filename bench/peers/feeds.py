"""Calibration inputs for peers' quantizers, built from token windows saved by ``bench/calib_tokens.py``.

Imports only numpy and onnxruntime, so it runs in every peer's environment. Each window becomes one feed
of an optimum decoder graph: ``input_ids [1, L]``, ``attention_mask`` (ones), ``position_ids`` (0..L-1) and
an empty KV cache ``[1, kv_heads, 0, head_dim]`` for every ``past_key_values.*`` input.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader


def decoder_feeds(windows: np.ndarray, input_names: list[str], config: dict) -> list[dict[str, np.ndarray]]:
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    kv_heads = config.get("num_key_value_heads", heads)
    feeds = []
    for window in windows:
        ids = window[None].astype(np.int64)
        feed = {"input_ids": ids}
        if "attention_mask" in input_names:
            feed["attention_mask"] = np.ones_like(ids)
        if "position_ids" in input_names:
            feed["position_ids"] = np.arange(ids.shape[1], dtype=np.int64)[None]
        for name in input_names:
            if name.startswith("past_key_values."):
                feed[name] = np.zeros((1, kv_heads, 0, head_dim), dtype=np.float32)
        feeds.append(feed)
    return feeds


class WindowReader(CalibrationDataReader):
    """onnxruntime ``CalibrationDataReader`` over the windows of ``tokens_npz`` (array ``ids [n, L]``)."""

    def __init__(self, tokens_npz: Path, model_folder: Path, input_names: list[str]):
        windows = np.load(tokens_npz)["ids"]
        config = json.loads((Path(model_folder) / "config.json").read_text())
        self.feeds = decoder_feeds(windows, input_names, config)
        self.position = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= len(self.feeds):
            return None
        self.position += 1
        return self.feeds[self.position - 1]

    def rewind(self) -> None:
        self.position = 0

    def __len__(self) -> int:
        return len(self.feeds)
