"""Calibration on the ONNX graph: token windows, and per decoder block the statistics of its linear inputs
(:mod:`mxonnx.stats`) and GPTQ's Hessians, measured by onnxruntime through
:class:`mxonnx.blockwise.BlockwiseRunner` as the block is *now* in the model.

:func:`block_statistics` and :func:`block_hessians` are the two measurements the quantization driver
(:mod:`mxonnx.quantize`) takes of block ``i``: each is one run of that block over every window, and either run may
also move the runner past the block (``advance``). :func:`collect_statistics` runs them over all blocks of an
unmodified model (tests, benchmarks).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np
import onnx_ir as ir

from mxonnx import formats
from mxonnx.blockwise import BlockwiseRunner
from mxonnx.config import QuantizeConfig, default_calib_text
from mxonnx.errors import InputError
from mxonnx.gptq import HessianAccumulator
from mxonnx.passes.llama_structure import DecoderBlock
from mxonnx.stats import ActivationStats, StatsAccumulator, group_key, linear_groups


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




def config_windows(tokenizer_folder: str | os.PathLike | None, config: QuantizeConfig) -> np.ndarray:
    """The calibration windows of ``config`` (``calib_samples x calib_seqlen`` tokens of ``calib_path``, default
    WikiText-2 validation), tokenized with the tokenizer of the model folder."""
    return calibration_windows(config.calib_path or default_calib_text(), load_tokenizer(tokenizer_folder),
                               config.calib_samples, config.calib_seqlen, config.seed)


def block_statistics(runner: BlockwiseRunner, block: DecoderBlock, hessians: bool = False,
                     rows: list[np.ndarray] | None = None, advance: bool = False,
                     squares: bool = False, states: list[np.ndarray] | None = None) -> dict[str, ActivationStats]:
    """``{group_key: ActivationStats}`` of the four linear inputs of ``block`` over every window of ``runner``
    (the block's inputs as the runner holds them, or ``states``: a stream the caller holds, one array per window,
    e.g. the float model's); ``hessians`` adds ``xtx``; ``rows`` (:func:`sample_rows`) keeps those tokens of each
    window as the sample; ``advance`` also moves the runner (or ``states``, in place) past the block; ``squares``
    adds ``mean_sq``."""
    accumulators = {group: StatsAccumulator(linears[0].shape[0], hessians, rows is not None, squares)
                    for group, linears in block.groups().items()}
    window = dict.fromkeys(accumulators, 0)

    def add(group: str, x: np.ndarray) -> None:
        accumulators[group].add(x, rows[window[group]] if rows is not None else None)
        window[group] += 1

    if states is None:
        runner.capture(block.index, add, advance=advance)
    else:
        names, session = runner.open_capture(block.index)
        for w, state in enumerate(states):
            arrays = session.run(w, state)
            for group, x in zip(names, arrays):
                add(group, x.reshape(-1, x.shape[-1]))
            if advance:
                states[w] = arrays[-1]
    return {group_key(block, group): acc.result() for group, acc in accumulators.items()}


def _group_act_formats(block: DecoderBlock, acts: formats.MXFormat | Mapping[str, formats.MXFormat]):
    """``(per_linear, group_acts)``: each linear's activation format, and the distinct formats each input group is
    read in (one, unless ``--override`` gives linears of one input different ones)."""
    groups = block.groups()
    per_linear = {linear.name: acts[linear.name] if isinstance(acts, Mapping) else acts
                  for linears in groups.values() for linear in linears}
    group_acts = {group: list(dict.fromkeys(per_linear[linear.name] for linear in linears))
                  for group, linears in groups.items()}
    return per_linear, group_acts


def _keyed_by_input(block: DecoderBlock, per_linear: Mapping[str, formats.MXFormat],
                    group_acts: Mapping[str, list[formats.MXFormat]],
                    computed: Mapping[tuple[str, formats.MXFormat], np.ndarray]) -> dict[str, np.ndarray]:
    """``computed[(group, fmt)]`` keyed by the group's key, or, for a group read in several formats, by the name of
    each linear (one array per format, shared by the linears reading it)."""
    keyed = {}
    for group, linears in block.groups().items():
        if len(group_acts[group]) == 1:
            keyed[group_key(block, group)] = computed[(group, group_acts[group][0])]
        else:
            keyed.update({linear.name: computed[(group, per_linear[linear.name])] for linear in linears})
    return keyed


def block_hessians(runner: BlockwiseRunner, block: DecoderBlock,
                   acts: formats.MXFormat | Mapping[str, formats.MXFormat], advance: bool = False,
                   act_scales: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """``{group_key: 2/n A^T A}`` for the four linear groups of ``block`` over every window, with ``A`` the group's
    input quantize-dequantized to ``acts`` (the activations the rewritten MatMul reads; both ``A`` and ``A^T A``
    computed in onnxruntime, summed here in float64; paper Eq. 7); ``act_scales``: static int8 scales by linear
    name; ``advance`` also moves the runner past the block.

    ``acts`` may give one format per linear name (``--override``): a group whose linears read its input in
    different formats gets one Hessian per linear, keyed by the linear's name, instead of the group's."""
    groups = block.groups()
    per_linear, group_acts = _group_act_formats(block, acts)
    widths = runner.group_widths[block.index]  # the runner's: a group already rewritten has no float weight to read
    accumulators = {(group, fmt): HessianAccumulator(widths[group]) for group in groups for fmt in group_acts[group]}
    group_scales = ({group: act_scales[linears[0].name] for group, linears in groups.items()
                     if any(fmt.kind == "int" for fmt in group_acts[group])} if act_scales is not None else None)
    runner.capture_gram_sets(block.index, group_acts,
                             lambda group, fmt, xtx, n: accumulators[(group, fmt)].add_gram(xtx, n),
                             advance=advance, group_scales=group_scales)
    computed = {pair: acc.take_hessian() for pair, acc in accumulators.items()}
    del accumulators
    return _keyed_by_input(block, per_linear, group_acts, computed)


def block_cross_grams(runner: BlockwiseRunner, block: DecoderBlock,
                      acts: formats.MXFormat | Mapping[str, formats.MXFormat],
                      float_states: list[np.ndarray]) -> dict[str, np.ndarray]:
    """``{key: 2/n A^T X}`` for the four linear groups of ``block`` (keys as :func:`block_hessians`'): ``A`` the
    group's input on the quantized prefix's stream (the runner's hidden states) quantize-dequantized to ``acts``,
    ``X`` the same input on the float model's stream ``float_states`` (the block's inputs in the float model, one
    array per window), tokens paired. Moves ``float_states`` past the block (in place, the block as the float model
    has it: run it before the block is rewritten); the runner stays. MX or
    float activations only (static int8 scales are calibrated later than this runs)."""
    per_linear, group_acts = _group_act_formats(block, acts)
    if any(fmt.kind == "int" for fmts in group_acts.values() for fmt in fmts):
        raise InputError("the float-target GPTQ supports MX or float activations, not static int8")
    names, session = runner.open_capture(block.index)
    widths = runner.group_widths[block.index]
    sums = {(group, fmt): np.zeros((widths[group],) * 2) for group in names for fmt in group_acts[group]}
    for window, quantized_state in enumerate(runner.hidden_states):
        floats = session.run(window, float_states[window])
        quantized = session.run(window, quantized_state)
        for group, x, x_q in zip(names, floats, quantized):
            x, x_q = x.reshape(-1, x.shape[-1]), x_q.reshape(-1, x_q.shape[-1])
            for fmt in group_acts[group]:
                a = formats.quantize_dequantize(x_q, fmt, axis=-1) if fmt.kind == "mx" else x_q
                sums[(group, fmt)] += a.T @ x
        float_states[window] = floats[-1]
    scale = 2.0 / runner.windows.size  # every window's tokens
    return _keyed_by_input(block, per_linear, group_acts, {pair: s * scale for pair, s in sums.items()})


def collect_statistics(model: ir.Model, blocks: list[DecoderBlock], tokenizer_folder: str | os.PathLike | None,
                       config: QuantizeConfig, hessians: bool = False, sample_tokens: int = 0,
                       groups: Iterable[str] | None = None, threads: int | None = None,
                       squares: bool = False) -> dict[str, ActivationStats]:
    """:func:`block_statistics` of every block of ``model`` as it is (one pass, block after block, each on the
    previous blocks' outputs) over :func:`config_windows`; ``sample_tokens`` rows kept per group
    (:func:`sample_rows`); ``groups`` restricts the result to some keys of ``linear_groups(blocks)`` (blocks after
    the last one asked for are not run); ``squares`` adds ``mean_sq``."""
    keys = list(linear_groups(blocks)) if groups is None else list(groups)
    unknown = sorted(set(keys) - set(linear_groups(blocks)))
    if unknown:
        raise InputError(f"no linear group {unknown[0]!r} in the model")
    windows = config_windows(tokenizer_folder, config)
    rows = sample_rows(*windows.shape, sample_tokens, config.seed) if sample_tokens else None
    runner = BlockwiseRunner(model, blocks, windows, progress=config.progress, threads=threads)
    last = max(int(key.split(".")[1]) for key in keys) if keys else -1
    stats: dict[str, ActivationStats] = {}
    for block in blocks[: last + 1]:
        stats.update(block_statistics(runner, block, hessians, rows, advance=block.index < last, squares=squares))
    return {key: stats[key] for key in keys}
