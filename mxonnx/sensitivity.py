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
    rest of the model float); ``windows`` ``[n, T]`` token ids (e.g. :func:`probe_windows`), the logits compared at
    ``positions`` positions per window drawn with ``seed``. ``model`` is read, not changed.

    One stream per linear carries its perturbed block output through the later (float) blocks to the logits. The
    float hidden states entering every block are computed once; the linears are then taken in chunks of at most
    ``max_streams``, each chunk one pass from its first linear's block to the end (memory: ``L + 1 + max_streams``
    hidden states of the probe windows)."""
    from tqdm.auto import tqdm

    probe = formats.parse_format(probe)
    wanted = set(names)
    targets = [(block.index, linear) for block in blocks for linear in block.linears() if linear.name in wanted]
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
    chunks = [targets[i: i + max(1, max_streams)] for i in range(0, len(targets), max(1, max_streams))]
    total = sum(len(blocks) - chunk[0][0] for chunk in chunks)
    result: dict[str, float] = {}
    with tqdm(total=total, desc="sensitivity (KL)", unit="block", disable=not progress, leave=False) as bar:
        for chunk in chunks:
            streams: dict[str, list[np.ndarray]] = {}
            for block in blocks[chunk[0][0]:]:
                inputs = {l.weight.name: f"{l.name}.probe_weight" for l in block.linears()}
                session = runner.open_block(block.index, weights_as_inputs(inputs))
                floats = {inputs[l.weight.name]: l.weight_array.astype(np.float32) for l in block.linears()}
                for states in streams.values():
                    states[:] = [session.run(w, states[w], floats)[0] for w in range(n)]
                for index, linear in chunk:
                    if index == block.index:
                        name = inputs[linear.weight.name]
                        feed = {**floats, name: formats.quantize_dequantize(floats[name], probe, axis=0)}
                        streams[linear.name] = [session.run(w, entering[index][w], feed)[0] for w in range(n)]
                del session, floats
                bar.update()
            for name, states in streams.items():
                result[name] = float(np.mean([kl_divergence(ref[w], tail.run(w, states[w][:, picks[w]])[0][0])
                                              for w in range(n)]))
            del streams
    return result


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
