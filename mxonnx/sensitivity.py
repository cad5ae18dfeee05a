"""How much the model's output moves when one linear is quantized: the measured part of the ``--target-bits``
sensitivity (project issue 20).

A linear's Hessian-weighted error ``L_ic = tr(E^T H E) = ||X E||^2`` (:func:`mxonnx.allocate.hessian_error`) is the
squared error of its *output*; what that costs the model depends on where the linear sits (an error in layer 0's
down_proj passes through every later block). Per linear ``i`` this module measures

    D_i = mean over probe tokens of KL(p_float || p_i),

the KL divergence of the model's next-token distribution with linear ``i`` alone rounded to nearest in a probe
format (the rest float) from the float model's, on a few short calibration windows (:func:`linear_divergences`).
The allocation then uses the linear's output-sensitivity factor ``s_i = D_i / L_i,probe`` and the losses
``s_i * L_ic`` (:func:`scaled_losses`): second order in the output error (KL ~ ||X E||^2 near the float model),
measured once per linear, carried across candidates by the Hessian errors. The losses are unchanged by a rescaling
that leaves the model's function as it is (``v_proj`` times 2^k and ``o_proj`` divided by it multiplies ``L`` of
``v_proj`` by 4^k, not ``s_i L_ic``).

An earlier version measured one KL per block (all its linears probed) and split it by each linear's share of the
change of the block's output, ``||dh_i||^2 / ||dh_block||^2``. On SmolLM2 that share was off by up to 2x against
the KL measured per linear (layer 29: v_proj and gate_proj 2.3x and 2.2x too high, down_proj 2.1x too low; the
residual stream's norm weighs directions unlike the logits do), and the allocation lost to uniform formats.

Cost (:func:`linear_divergences`): one float pass over the blocks, then per linear one stream from its block to the
end, ``sum_i (L - b_i) + L`` block runs of the probe windows (7 linears per block: about ``3.5 L^2``; SmolLM2's 30
layers: ~3 300 runs of 2 x 256 tokens, 0.85x the token-blocks of one pass over the default 128 x 512
calibration), and the final norm and lm_head on sampled positions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from mxonnx import formats
from mxonnx.blockwise import BlockwiseRunner, weights_as_inputs
from mxonnx.passes.llama_structure import DecoderBlock

PROBE_WINDOWS = 2  # calibration windows the divergences are measured on
PROBE_SEQLEN = 256  # their first tokens
PROBE_POSITIONS = 128  # positions per window whose logits are compared
MAX_STREAMS = 64  # perturbed streams carried at once (7B, 2 x 256 tokens: 0.5 GB of hidden states)
MEASURE_FRACTION = 1 / 16  # candidates with at least this fraction of the probe's Hessian error get their own KL


def probe_windows(windows: np.ndarray, count: int = PROBE_WINDOWS, seqlen: int = PROBE_SEQLEN) -> np.ndarray:
    """The first ``count`` calibration windows cut to their first ``seqlen`` tokens (causal: a window's prefix is
    itself a window)."""
    return np.asarray(windows)[:count, :seqlen]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def kl_divergence(ref_logp: np.ndarray, logits: np.ndarray) -> float:
    """``mean_t sum_v p_t(v) (log p_t(v) - log q_t(v))`` with ``log p`` given, ``q = softmax(logits)``."""
    logq = log_softmax(logits)
    return float((np.exp(ref_logp) * (ref_logp - logq)).sum(axis=-1).mean())


def linear_divergences(model: ir.Model, blocks: Sequence[DecoderBlock], windows: np.ndarray, probe: str | formats.MXFormat,
                       names: Sequence[str], positions: int = PROBE_POSITIONS, seed: int = 0,
                       progress: bool = False, max_streams: int = MAX_STREAMS) -> dict[str, float]:
    """``{name: D_i}`` (module docstring) for the linears ``names``, each rounded to nearest in ``probe`` alone (the
    rest of the model float): :func:`measured_divergences` with one format."""
    probe = formats.parse_format(probe)
    table = measured_divergences(model, blocks, windows, {name: [probe] for name in names}, positions, seed,
                                 progress, max_streams)
    return {name: row[probe.name] for name, row in table.items()}


def measured_divergences(model: ir.Model, blocks: Sequence[DecoderBlock], windows: np.ndarray,
                         probes: Mapping[str, Sequence[str | formats.MXFormat]], positions: int = PROBE_POSITIONS,
                         seed: int = 0, progress: bool = False,
                         max_streams: int = MAX_STREAMS) -> dict[str, dict[str, float]]:
    """``{name: {format name: D_ic}}``: for every linear of ``probes`` and each of its formats, the KL divergence of
    the model's next-token distribution with that linear alone rounded to nearest in the format (the rest float)
    from the float model's; ``windows`` ``[n, T]`` token ids (e.g. :func:`probe_windows`), the logits compared at
    ``positions`` positions per window drawn with ``seed``. ``model`` is read, not changed.

    One stream per (linear, format) carries its perturbed block output through the later (float) blocks to the
    logits. The float hidden states entering every block are computed once; the streams are then taken in chunks
    of at most ``max_streams``, each chunk one pass from its first stream's block to the end (memory:
    ``L + 1 + max_streams`` hidden states of the probe windows)."""
    from tqdm.auto import tqdm

    targets = [(block.index, linear, formats.parse_format(fmt)) for block in blocks for linear in block.linears()
               for fmt in probes.get(linear.name, ())]
    if not targets:
        return {}
    runner = BlockwiseRunner(model, blocks, windows)
    n = len(runner.windows)
    entering = [list(runner.hidden_states)]  # entering[b]: the float model's inputs of block b (b = L: h_L)
    for block in blocks:
        runner.advance(block.index)
        entering.append(list(runner.hidden_states))
    logits = [v for v in model.graph.outputs if v.name == "logits"] or list(model.graph.outputs)[:1]
    tail = runner.open_tail(logits)
    rng = np.random.default_rng(seed)
    seqlen = runner.windows.shape[1]
    picks = [np.sort(rng.choice(seqlen, size=min(positions, seqlen), replace=False)) for _ in range(n)]
    ref = [log_softmax(tail.run(w, entering[-1][w][:, picks[w]])[0][0]) for w in range(n)]
    size = max(1, max_streams)
    chunks = [targets[i: i + size] for i in range(0, len(targets), size)]
    total = sum(len(blocks) - chunk[0][0] for chunk in chunks)
    result: dict[str, dict[str, float]] = {}
    with tqdm(total=total, desc="sensitivity (KL)", unit="block", disable=not progress, leave=False) as bar:
        for chunk in chunks:
            streams: dict[tuple[str, str], list[np.ndarray]] = {}
            for block in blocks[chunk[0][0]:]:
                inputs = {l.weight.name: f"{l.name}.probe_weight" for l in block.linears()}
                session = runner.open_block(block.index, weights_as_inputs(inputs))
                floats = {inputs[l.weight.name]: l.weight_array.astype(np.float32) for l in block.linears()}
                for states in streams.values():
                    states[:] = [session.run(w, states[w], floats)[0] for w in range(n)]
                for index, linear, fmt in chunk:
                    if index == block.index:
                        name = inputs[linear.weight.name]
                        feed = {**floats, name: formats.quantize_dequantize(floats[name], fmt, axis=0)}
                        streams[(linear.name, fmt.name)] = [session.run(w, entering[index][w], feed)[0]
                                                            for w in range(n)]
                del session, floats
                bar.update()
            for (name, fmt), states in streams.items():
                result.setdefault(name, {})[fmt] = float(np.mean(
                    [kl_divergence(ref[w], tail.run(w, states[w][:, picks[w]])[0][0]) for w in range(n)]))
            del streams
    return result


def formats_to_measure(losses: Mapping[str, Sequence[float]], candidates: Sequence[str | formats.MXFormat],
                       probe_index: int, fraction: float = MEASURE_FRACTION) -> dict[str, list[formats.MXFormat]]:
    """Per linear, the candidates whose KL is measured: the probe and every candidate whose Hessian error is at
    least ``fraction`` of the probe's (the others, e.g. 8-bit ones, are carried from the probe by the Hessian
    ratio: their KL is second order small)."""
    cands = [formats.parse_format(c) for c in candidates]
    out = {}
    for name, row in losses.items():
        probe = float(row[probe_index])
        out[name] = [c for i, c in enumerate(cands) if i == probe_index or float(row[i]) >= fraction * probe > 0]
    return out


def measured_losses(losses: Mapping[str, Sequence[float]], divergences: Mapping[str, Mapping[str, float]],
                    candidates: Sequence[str | formats.MXFormat], probe_index: int) -> dict[str, list[float]]:
    """``{name: [D_ic for c]}``: the measured KL where :func:`measured_divergences` has it, else the probe's carried
    by the Hessian errors, ``D_i,probe * L_ic / L_i,probe``; then made non-increasing as the Hessian error falls
    (a candidate with less error than another never scores more KL: a finer grid measured worse on the few probe
    tokens is taken as equal)."""
    names = [formats.parse_format(c).name for c in candidates]
    out = {}
    for name, row in losses.items():
        measured = divergences[name]
        probe = float(row[probe_index])
        base = max(measured[names[probe_index]], 0.0)
        d = [max(measured[c], 0.0) if c in measured else (base * float(row[i]) / probe if probe > 0 else 0.0)
             for i, c in enumerate(names)]
        best = np.inf
        for i in sorted(range(len(d)), key=lambda i: -float(row[i])):
            best = min(best, d[i])
            d[i] = best
        out[name] = d
    return out


def scaled_losses(losses: Mapping[str, Sequence[float]], divergences: Mapping[str, float],
                  probe_index: int) -> dict[str, list[float]]:
    """``{name: [s_i * L_ic for c]}`` with ``s_i = D_i / L_i,probe`` (the module docstring);
    ``losses[name][probe_index]`` is the Hessian error in the probe format. A linear whose probe error is zero
    (its weight on the probe grid) scores zero."""
    out = {}
    for name, row in losses.items():
        probe = float(row[probe_index])
        factor = max(divergences[name], 0.0) / probe if probe > 0 else 0.0
        out[name] = [factor * float(x) for x in row]
    return out
