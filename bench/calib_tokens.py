"""Calibration windows for peers that need a data reader: ``n`` windows of ``seqlen`` tokens taken at seeded
random offsets of the calibration text (default WikiText-2 validation, as for ``mxonnx quantize``), tokenized
once with the model's tokenizer and saved as ``ids [n, seqlen]`` int64 in an ``.npz`` file."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_calibration_windows(model_folder: Path, out: Path, samples: int, seqlen: int, seed: int = 0,
                              text_path: Path | None = None) -> Path:
    from transformers import AutoTokenizer

    from mxonnx.config import default_calib_text

    text = "\n\n".join(Path(text_path or default_calib_text()).read_text(encoding="utf-8").splitlines())
    tokenizer = AutoTokenizer.from_pretrained(model_folder)
    ids = np.asarray(tokenizer(text)["input_ids"], dtype=np.int64)
    starts = np.random.default_rng(seed).integers(0, len(ids) - seqlen, size=samples)
    windows = np.stack([ids[s : s + seqlen] for s in starts])
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, ids=windows)
    return out
