"""How much the model's output moves when one linear is quantized: the measured part of the ``--target-bits``
sensitivity (project issue 20).

A linear's Hessian-weighted error ``L_ic = tr(E^T H E) = ||X E||^2`` (:func:`mxonnx.allocate.hessian_error`) is the
squared error of its *output*; what that costs the model depends on where the linear sits (an error in layer 0's
down_proj passes through every later block). Per decoder block this module measures

    D_block = mean over probe tokens of KL(p_float || p_block),

the KL divergence of the model's next-token distribution with the block's linears rounded to nearest in a probe
format (the rest float) from the float model's, on a few short calibration windows, and gives each linear ``i`` of
the block the share ``D_i`` of it that the linear's own error of the block's output takes
(:func:`linear_divergences`). The allocation then uses the linear's output-sensitivity factor
``s_i = D_i / L_i,probe`` and the losses ``s_i * L_ic`` (:func:`scaled_losses`): second order in the output error
(KL ~ ||X E||^2 near the float model), measured once per linear, carried across candidates by the Hessian errors.
The losses are unchanged by a rescaling that leaves the model's function as it is (``v_proj`` times 2^k and
``o_proj`` divided by it multiplies ``L`` of ``v_proj`` by 4^k, not ``s_i L_ic``).

Cost, block by block (:func:`linear_divergences`): one session per block, the float stream plus one stream per block
perturbed so far run through it (at most ``L + 1`` hidden states of the probe windows in memory), then the final
norm and lm_head on sampled positions. About ``L^2 / 2 + 9 L`` block runs of the probe windows: on a 32-layer
model ~25 passes of the whole model over the default 2 x 256 tokens, as many as one pass over 12 800 tokens.
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


def logit_divergence(model: ir.Model, runner: BlockwiseRunner, float_states: Sequence[np.ndarray], positions: int,
                     seed: int):
    """``states -> mean_t KL(p_float || p_states)``: the next-token distributions the final norm and lm_head give
    from the last block's outputs ``states`` (one array per window of ``runner``) against those from
    ``float_states``, at ``positions`` positions per window drawn with ``seed`` (the same for every call)."""
    logits = [v for v in model.graph.outputs if v.name == "logits"] or list(model.graph.outputs)[:1]
    tail = runner.open_tail(logits)
    rng = np.random.default_rng(seed)
    n, seqlen = runner.windows.shape
    picks = [np.sort(rng.choice(seqlen, size=min(positions, seqlen), replace=False)) for _ in range(n)]
    ref = [log_softmax(tail.run(w, float_states[w][:, picks[w]])[0][0]) for w in range(n)]

    def divergence(states: Sequence[np.ndarray]) -> float:
        return float(np.mean([kl_divergence(ref[w], tail.run(w, states[w][:, picks[w]])[0][0]) for w in range(n)]))

    return divergence


def linear_divergences(model: ir.Model, blocks: Sequence[DecoderBlock], windows: np.ndarray, probe: str | formats.MXFormat,
                      names: Sequence[str], positions: int = PROBE_POSITIONS, seed: int = 0,
                      progress: bool = False) -> dict[str, float]:
    """``{name: D_i}`` (module docstring) for the linears ``names``, rounded to nearest in ``probe``; ``windows`` ``[n, T]`` token ids (e.g. :func:`probe_windows`), the
    logits compared at ``positions`` positions per window drawn with ``seed``. ``model`` is read, not changed.

    One stream per block carries the block's probed linears to the logits: ``D_block = KL``; a linear's share is
    its own error of the block's output, ``D_i = D_block * ||dh_i||^2 / ||dh_block||^2`` (``dh``: the change of the
    block's output, the residual stream every later block reads, with only ``i`` or the whole block probed)."""
    from tqdm.auto import tqdm

    probe = formats.parse_format(probe)
    wanted = set(names)
    if not any(l.name in wanted for b in blocks for l in b.linears()):
        return {}
    runner = BlockwiseRunner(model, blocks, windows)
    n = len(runner.windows)
    float_states = list(runner.hidden_states)
    streams: dict[int, list[np.ndarray]] = {}
    shares: dict[str, tuple[int, float]] = {}  # linear -> (block, ||dh_i||^2 / ||dh_block||^2)
    for block in tqdm(blocks, desc="sensitivity (KL)", unit="block", disable=not progress, leave=False):
        inputs = {l.weight.name: f"{l.name}.probe_weight" for l in block.linears()}
        session = runner.open_block(block.index, weights_as_inputs(inputs))
        floats = {inputs[l.weight.name]: l.weight_array.astype(np.float32) for l in block.linears()}
        probed = {inputs[l.weight.name]: formats.quantize_dequantize(floats[inputs[l.weight.name]], probe, axis=0)
                  for l in block.linears() if l.name in wanted}
        for states in streams.values():
            states[:] = [session.run(w, states[w], floats)[0] for w in range(n)]
        if probed:
            reference = [session.run(w, float_states[w], floats)[0] for w in range(n)]

            def change(feed: dict[str, np.ndarray], keep: bool = False) -> float:
                outs = [session.run(w, float_states[w], {**floats, **feed})[0] for w in range(n)]
                if keep:
                    streams[block.index] = outs
                return float(sum(np.square(o - r, dtype=np.float64).sum() for o, r in zip(outs, reference)))

            whole = change(probed, keep=True)
            for linear in block.linears():
                name = inputs[linear.weight.name]
                if name in probed:
                    shares[linear.name] = (block.index, change({name: probed[name]}) / whole if whole > 0 else 0.0)
            float_states = reference
        else:
            float_states = [session.run(w, float_states[w], floats)[0] for w in range(n)]
        del session, floats, probed
    divergence = logit_divergence(model, runner, float_states, positions, seed)
    block_kl = {i: divergence(states) for i, states in streams.items()}
    return {key: block_kl[i] * share for key, (i, share) in shares.items()}


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


STREAM_BUDGET_BYTES = 1 << 30  # hidden states of the perturbed streams held at once by :func:`context_divergences`


def context_divergences(model: ir.Model, blocks: Sequence[DecoderBlock], windows: np.ndarray,
                        base: Mapping[str, formats.MXFormat], candidates: Sequence[str | formats.MXFormat],
                        names: Sequence[str], positions: int = PROBE_POSITIONS, seed: int = 0,
                        budget_bytes: int = STREAM_BUDGET_BYTES, progress: bool = False) -> dict[str, list[float]]:
    """``{name: [D_ic for c in candidates]}``: the KL divergence of the model's next-token distribution from the
    float model's, ``mean_t KL(p_float || p)``, with every decoder linear rounded to nearest in its ``base`` format
    (a linear absent from ``base`` stays float) except linear ``i``, rounded in candidate ``c`` instead: each
    linear's cost measured *beside the others quantized*, around the point the allocation moves from. A candidate
    equal to the linear's base format scores the all-base divergence (no run). ``windows`` ``[n, T]`` token ids,
    logits compared at ``positions`` positions per window drawn with ``seed``; ``model`` is read, not changed.

    One stream of hidden states per (linear, other candidate) runs from the linear's block to the logits through
    the base-quantized blocks after it. The streams started in a run of consecutive blocks ("origins") are carried
    together, each later block's session opened once per run; a run holds at most ``budget_bytes`` of them (or
    one block's). Cost: ``sum_i m_i (L - i)`` block runs of the probe windows, ``m_i`` the streams block ``i``
    starts; SmolLM2 (30 layers, 7 linears, 3 other candidates) ~9 800 runs of 2 x 256 tokens."""
    from tqdm.auto import tqdm

    cands = [formats.parse_format(c) for c in candidates]
    wanted = set(names)
    runner = BlockwiseRunner(model, blocks, windows)
    n = len(runner.windows)
    inputs = [{l.weight.name: f"{l.name}.probe_weight" for l in b.linears()} for b in blocks]

    def base_feed(block: DecoderBlock) -> dict[str, np.ndarray]:
        feed = {}
        for l in block.linears():
            w = l.weight_array.astype(np.float32)
            fmt = base.get(l.name)
            feed[inputs[block.index][l.weight.name]] = (w if fmt is None or fmt.kind == "none"
                                                        else formats.quantize_dequantize(w, fmt, axis=0))
        return feed

    def perturbed(block: DecoderBlock) -> list[tuple[str, int, str, np.ndarray]]:
        """(linear, candidate index, its input name, its weight rounded in the candidate) for each stream."""
        out = []
        for l in block.linears():
            if l.name in wanted:
                w = l.weight_array.astype(np.float32)
                out += [(l.name, c, inputs[block.index][l.weight.name], formats.quantize_dequantize(w, fmt, axis=0))
                        for c, fmt in enumerate(cands) if fmt != base.get(l.name)]
        return out

    # pass 0: the float and the all-base streams; the base stream's input of every block is kept
    float_states = list(runner.hidden_states)
    base_states = list(runner.hidden_states)
    base_inputs: list[list[np.ndarray]] = []
    counts = []
    for block in tqdm(blocks, desc="sensitivity (base)", unit="block", disable=not progress, leave=False):
        session = runner.open_block(block.index, weights_as_inputs(inputs[block.index]))
        floats = {inputs[block.index][l.weight.name]: l.weight_array.astype(np.float32) for l in block.linears()}
        base_inputs.append(base_states)
        feed = base_feed(block)
        float_states = [session.run(w, float_states[w], floats)[0] for w in range(n)]
        base_states = [session.run(w, base_states[w], feed)[0] for w in range(n)]
        counts.append(sum(1 for l in block.linears() if l.name in wanted
                          for fmt in cands if fmt != base.get(l.name)))
        del session, floats, feed
    divergence = logit_divergence(model, runner, float_states, positions, seed)
    base_kl = divergence(base_states)
    del float_states, base_states
    out = {name: [base_kl] * len(cands) for name in names}

    stream_bytes = sum(s.nbytes for s in base_inputs[0])
    origins, start = [], 0  # runs of origin blocks whose streams fit the budget together
    while start < len(blocks):
        end, held = start + 1, counts[start]
        while end < len(blocks) and (held + counts[end]) * stream_bytes <= budget_bytes:
            held += counts[end]
            end += 1
        origins.append((start, end))
        start = end
    total = sum(len(blocks) - a for a, _ in origins)
    bar = tqdm(total=total, desc="sensitivity (KL)", unit="block", disable=not progress, leave=False)
    for first, last in origins:
        streams: list[tuple[str, int, list[np.ndarray]]] = []
        for block in blocks[first:]:
            if block.index >= last and not streams:
                break
            session = runner.open_block(block.index, weights_as_inputs(inputs[block.index]))
            feed = base_feed(block)
            for _, _, states in streams:
                states[:] = [session.run(w, states[w], feed)[0] for w in range(n)]
            if block.index < last:
                for name, c, weight_input, weight in perturbed(block):
                    streams.append((name, c, [session.run(w, base_inputs[block.index][w], {**feed, weight_input: weight})[0]
                                              for w in range(n)]))
            del session, feed
            bar.update()
        for name, c, states in streams:
            out[name][c] = divergence(states)
        del streams
    bar.close()
    return out
