"""Calibration statistics of the linear inputs, collected by running onnxruntime over calibration windows.

Every decoder block has four linear inputs (one per group of linears reading the same tensor):
``layers.{i}.qkv`` (attention norm output), ``layers.{i}.o``, ``layers.{i}.gate_up`` (MLP norm output) and
``layers.{i}.down``. For each, over all calibration tokens ``x_t [K]``:

    max_abs_j = max_t |x_tj|   (SmoothQuant, paper Eq. 3)      mean_abs_j = mean_t |x_tj|   (AWQ, paper Eq. 5)
    xtx = sum_t x_t^T x_t  (float64; the GPTQ Hessian is H = 2/n xtx, paper Eq. 7)

plus, on request, a bounded random sample of raw input rows (for AWQ's search).

The windows stream through the graph one decoder block at a time (:class:`mxonnx.blockwise.BlockwiseRunner`,
one pass: each block's run gives its linear inputs and the next block's input), so memory holds one hidden state
per window and one block's weights in onnxruntime, never a second copy of the model; a block's statistics are
computed when first asked for (:class:`StreamedStatistics`), so a pass may fold scales into block ``i`` before
block ``i + 1`` is calibrated (folding does not change the float function).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import numpy as np
import onnx_ir as ir

from mxonnx.blockwise import BlockwiseRunner
from mxonnx.config import QuantizeConfig, default_calib_text
from mxonnx.errors import InputError
from mxonnx.gptq import HessianAccumulator
from mxonnx.passes.llama_structure import DecoderBlock, Linear


@dataclasses.dataclass(frozen=True)
class ActivationStats:
    """Per-channel statistics of one linear input ``x [tokens, K]``."""

    max_abs: np.ndarray  # [K] float32
    mean_abs: np.ndarray  # [K] float32
    count: int  # tokens seen
    xtx: np.ndarray | None = None  # [K, K] float64, sum_t x_t^T x_t
    sample: np.ndarray | None = None  # [n, K] float32 rows drawn at random from the calibration tokens

    @property
    def hessian(self) -> np.ndarray:
        """GPTQ's ``H = 2/n sum_t x_t^T x_t`` (paper Eq. 7)."""
        if self.xtx is None:
            raise ValueError("statistics were collected without hessians=True")
        return self.xtx * (2.0 / self.count)


class _Accumulator:
    """Running reductions of one linear input, fed one window at a time."""

    def __init__(self, k: int, hessian: bool, sample_tokens: int):
        self.max_abs = np.zeros(k, np.float32)
        self.sum_abs = np.zeros(k, np.float64)
        self.count = 0
        self.gram = HessianAccumulator(k) if hessian else None
        self.rows: list[np.ndarray] = []
        self.sample_tokens = sample_tokens

    def add(self, x: np.ndarray, rows: np.ndarray | None) -> None:
        """One window's inputs ``x [tokens, K]``; ``rows``: indices of the tokens to keep in the sample."""
        magnitude = np.abs(x)
        np.maximum(self.max_abs, magnitude.max(axis=0), out=self.max_abs)
        self.sum_abs += magnitude.sum(axis=0, dtype=np.float64)
        self.count += x.shape[0]
        if rows is not None and len(rows):
            self.rows.append(np.array(x[rows], np.float32))
        if self.gram is not None:
            self.gram.add_batch(x)

    def result(self) -> ActivationStats:
        mean_abs = (self.sum_abs / max(self.count, 1)).astype(np.float32)
        sample = np.concatenate(self.rows) if self.sample_tokens else None
        xtx = self.gram.xtx if self.gram is not None else None
        return ActivationStats(self.max_abs, mean_abs, self.count, xtx, sample)


def load_tokenizer(folder: str | os.PathLike | None) -> Callable[[str], list[int]]:
    """``encode(text) -> token ids`` (with the tokenizer's default special tokens) of the tokenizer saved in a model
    folder: its ``tokenizer.json`` through the ``tokenizers`` library when there is one (what a fast Hugging Face
    tokenizer runs, without importing transformers and torch: ~300 MB less memory), else transformers'
    ``AutoTokenizer``."""
    from mxonnx.export import quiet_libraries

    if folder is None or not Path(folder).is_dir():
        raise InputError("calibration needs the model folder with its tokenizer, not a bare .onnx file")
    fast = Path(folder) / "tokenizer.json"
    if fast.is_file():
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(fast))
        tokenizer.no_truncation()
        return lambda text: tokenizer.encode(text).ids
    from transformers import AutoTokenizer

    try:
        with quiet_libraries():
            auto = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError):
        raise InputError(f"{folder}: no tokenizer found in the model folder") from None

    def encode(text: str) -> list[int]:
        with quiet_libraries():  # hides "sequence longer than the model's maximum length"
            return auto(text)["input_ids"]

    return encode


def calibration_windows(text_path: str | os.PathLike, encode: Callable[[str], list[int]], n: int, seqlen: int,
                        seed: int) -> np.ndarray:
    """``[n, seqlen]`` int64 token windows starting at ``n`` offsets drawn uniformly with ``seed`` from the
    text (the whole file, tokenized once by ``encode``, e.g. :func:`load_tokenizer`)."""
    path = Path(text_path)
    if not path.is_file():
        raise InputError(f"{path}: no such calibration text (set --calib or MXONNX_DATA)")
    ids = np.asarray(encode(path.read_text(encoding="utf-8")), dtype=np.int64)
    if len(ids) < seqlen:
        raise InputError(f"{path}: {len(ids)} tokens, fewer than one calibration window of {seqlen}")
    starts = np.random.default_rng(seed).integers(0, len(ids) - seqlen + 1, size=n)
    return ids[starts[:, None] + np.arange(seqlen)]


def group_key(block: DecoderBlock, group: str) -> str:
    """``layers.{i}.{group}``: the key of a linear group's statistics (and of its GPTQ Hessian)."""
    return f"layers.{block.index}.{group}"


def linear_groups(blocks: Iterable[DecoderBlock]) -> dict[str, list[Linear]]:
    """The linears of every decoder block grouped by shared input, keyed by ``group_key``."""
    return {group_key(b, group): linears for b in blocks for group, linears in b.groups().items()}


def sample_rows(windows: int, seqlen: int, sample_tokens: int, seed: int) -> list[np.ndarray]:
    """Per window, the sorted token indices of the AWQ sample: ``sample_tokens`` rows in all, spread evenly over the
    windows (the same tokens for every linear group)."""
    rng = np.random.default_rng(seed)
    per_window, taken, rows = -(-sample_tokens // windows), 0, []
    for _ in range(windows):
        take = min(per_window, sample_tokens - taken, seqlen)
        rows.append(np.sort(rng.choice(seqlen, size=take, replace=False)).astype(np.int64))
        taken += take
    return rows


class StreamedStatistics(Mapping[str, ActivationStats]):
    """The statistics of the linear inputs of ``blocks``, keyed by ``group_key``, computed block by block when first
    asked for (blocks in order: asking for block ``i`` computes the blocks before it). Each block's statistics come
    from the model as it is then, with blocks ``0..i-1`` run as they were when they were calibrated.

    ``hessians`` adds ``xtx``; ``sample_tokens`` keeps that many random input rows per group, and
    ``keep_samples=False`` drops a block's samples once a later block is calibrated (AWQ needs only the current
    block's)."""

    def __init__(self, model: ir.Model, blocks: list[DecoderBlock], tokenizer_folder: str | os.PathLike | None,
                 config: QuantizeConfig, hessians: bool = False, sample_tokens: int = 0, keep_samples: bool = True,
                 threads: int | None = None):
        windows = calibration_windows(config.calib_path or default_calib_text(), load_tokenizer(tokenizer_folder),
                                      config.calib_samples, config.calib_seqlen, config.seed)
        self.blocks, self.hessians, self.keep_samples = blocks, hessians, keep_samples
        self.rows = sample_rows(*windows.shape, sample_tokens, config.seed) if sample_tokens else None
        self.runner = BlockwiseRunner(model, blocks, windows, progress=config.progress, threads=threads)
        self.stats: dict[str, ActivationStats] = {}
        self.keys = list(linear_groups(blocks))
        self.calibrated = 0  # blocks done so far

    def __getitem__(self, key: str) -> ActivationStats:
        if key not in self.stats:
            if key not in self.keys:
                raise KeyError(key)
            while key not in self.stats:
                self._calibrate(self.blocks[self.calibrated])
        return self.stats[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)

    def _calibrate(self, block: DecoderBlock) -> None:
        accumulators = {group: _Accumulator(linears[0].shape[0], self.hessians, self.rows is not None)
                        for group, linears in block.groups().items()}
        window = {group: 0 for group in accumulators}

        def add(group: str, x: np.ndarray) -> None:
            accumulators[group].add(x, self.rows[window[group]] if self.rows is not None else None)
            window[group] += 1

        if not self.keep_samples:
            for key, stats in self.stats.items():
                self.stats[key] = dataclasses.replace(stats, sample=None)
        self.runner.capture(block.index, add, advance=block.index < len(self.blocks) - 1)
        self.stats.update({group_key(block, group): acc.result() for group, acc in accumulators.items()})
        self.calibrated += 1


def collect_statistics(model: ir.Model, blocks: list[DecoderBlock], tokenizer_folder: str | os.PathLike | None,
                       config: QuantizeConfig, hessians: bool = False, sample_tokens: int = 0,
                       groups: Iterable[str] | None = None, threads: int | None = None) -> dict[str, ActivationStats]:
    """All statistics of :class:`StreamedStatistics` at once over ``config.calib_samples`` windows of
    ``config.calib_seqlen`` tokens of ``config.calib_path`` (default: WikiText-2 validation); ``groups`` restricts
    the result to some keys of ``linear_groups(blocks)`` (blocks after the last one asked for are not run)."""
    keys = list(linear_groups(blocks)) if groups is None else list(groups)
    unknown = sorted(set(keys) - set(linear_groups(blocks)))
    if unknown:
        raise InputError(f"no linear group {unknown[0]!r} in the model")
    stream = StreamedStatistics(model, blocks, tokenizer_folder, config, hessians, sample_tokens, threads=threads)
    return {key: stream[key] for key in keys}
