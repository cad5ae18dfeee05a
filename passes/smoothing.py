"""Fold per-channel smoothing scales into the weights that already exist (SmoothQuant, AWQ): no node is added.

A linear group reading ``x [.., K]`` with scales ``s [K]`` is rewritten as ``x W = (x diag(s)^-1) (diag(s) W)``
(paper Eq. 1 and 4): the rows of every W of the group are multiplied by ``s`` and ``1/s`` goes into whatever
produces ``x``:

- ``qkv`` and ``gate_up``: the RMSNorm weight, ``gamma <- gamma / s``;
- ``o``: the attention output is, per head, a weighted sum of V rows, so it is linear in each V channel:
  ``W_v[:, c] <- W_v[:, c] / s_c`` and, for a biased v_proj, ``b_v[c] <- b_v[c] / s_c`` (the softmax weights sum
  to 1, so the bias passes through the attention unchanged). With grouped-query attention the o_proj input channel ``h*d + e`` reads
  channel ``e`` of KV head ``h // (H / H_kv)``, so o's scales are one per KV channel (``[H_kv * d]``), repeated
  over the query heads of a group for the rows of W_o;
- ``down``: ``x_down = silu(x W_gate + b_gate) * (x W_up + b_up)`` is linear in the up channels:
  ``W_up[:, c] <- W_up[:, c] / s_c``, ``b_up[c] <- b_up[c] / s_c``.

Row scales leave biases alone (``(x / s) (diag(s) W) + b = x W + b``), so folds into the RMSNorm weights do not touch
q/k/v's or gate/up's biases.

Scale shapes: ``qkv``, ``gate_up``: [hidden]; ``o``: [H_kv * d]; ``down``: [intermediate].
A weight shared with other nodes (e.g. a norm weight that is an ``Identity`` of a shared initializer) gets its own
new initializer; Identity/Transpose nodes and initializers left unused by that are removed.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import onnx_ir as ir

from mxonnx.passes.llama_structure import (  # noqa: F401 (FOLD_ORDER is also read from here)
    FOLD_ORDER, DecoderBlock, Linear, RMSNorm, bias_index, constant_array, constant_dtype, constant_reader, constant_shape)

SCALE_MIN, SCALE_MAX = 1e-5, 1e5
ScaleFunction = Callable[[DecoderBlock, str], "np.ndarray | None"]
BlockScales = dict  # {group: s} of one block, the scales of Eq. 1/4 before sane_scales


def sane_scales(s: np.ndarray) -> np.ndarray:
    """Scales clipped to ``[SCALE_MIN, SCALE_MAX]``; a channel whose scale is not a positive finite number
    (zero or missing statistics) keeps scale 1, i.e. is left alone."""
    s = np.asarray(s, np.float64)
    return np.where(np.isfinite(s) & (s > 0), np.clip(s, SCALE_MIN, SCALE_MAX), 1.0)


def per_kv_channel(per_o_input: np.ndarray, block: DecoderBlock, reduce: Callable = np.max) -> np.ndarray:
    """Reduce a statistic over o_proj's input channels ``[H*d]`` to one value per KV channel ``[H_kv*d]``
    (``reduce`` over the query heads that read the same KV head)."""
    rep = block.num_heads // block.num_kv_heads
    return reduce(np.asarray(per_o_input).reshape(block.num_kv_heads, rep, block.head_dim), axis=1).reshape(-1)


def to_o_inputs(per_kv: np.ndarray, block: DecoderBlock) -> np.ndarray:
    """Repeat a per-KV-channel vector ``[H_kv*d]`` over the query heads: ``[H*d]`` in o_proj's input order."""
    rep = block.num_heads // block.num_kv_heads
    kv = np.asarray(per_kv).reshape(block.num_kv_heads, 1, block.head_dim)
    return np.broadcast_to(kv, (block.num_kv_heads, rep, block.head_dim)).reshape(-1)


def row_scales(group: str, s: np.ndarray, block: DecoderBlock) -> np.ndarray:
    """The scales multiplying the rows (input channels) of the group's weights."""
    return to_o_inputs(s, block) if group == "o" else np.asarray(s)


def _remove_if_dead(graph: ir.Graph, value: ir.Value) -> None:
    """Drop an initializer, or an Identity/Transpose chain ending in one, that nothing reads any more."""
    while value is not None and not value.uses() and not value.is_graph_output():
        producer = value.producer()
        if value.is_initializer():
            graph.initializers.pop(value.name)
            return
        if producer is None or producer.op_type not in ("Identity", "Transpose") or producer.graph is not graph:
            return
        source = producer.inputs[0]
        graph.remove(producer, safe=True)
        value = source


def _unique_name(graph: ir.Graph, base: str) -> str:
    name, i = base, 1
    while name in graph.initializers:
        name, i = f"{base}_{i}", i + 1
    return name


def write_input(graph: ir.Graph, node: ir.Node, index: int, array: np.ndarray | ir.TensorProtocol,
                dtype: ir.DataType) -> ir.Value:
    """Make input ``index`` of ``node`` the constant ``array`` (a numpy array, or a tensor such as
    :func:`scaled_tensor`'s): in place when it is an initializer read by this node alone, else as a new initializer
    of this node (the old source is dropped if it became unused). Returns the value now read."""
    value = node.inputs[index]
    in_place = value.is_initializer() and len(value.uses()) == 1
    name = value.name if in_place else _unique_name(graph, f"{node.name or value.name}.weight")
    if isinstance(array, np.ndarray):
        tensor = ir.Tensor(np.ascontiguousarray(array, dtype=dtype.numpy()), name=name)
    else:
        tensor, tensor.name = array, name
    if in_place:
        value.const_value = tensor
        return value
    own = ir.Value(name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(dtype), const_value=tensor)
    graph.register_initializer(own)
    node.replace_input_with(index, own)
    _remove_if_dead(graph, value)
    return own


def transformed_tensor(value: ir.Value, transform: Callable[[np.ndarray], np.ndarray]) -> ir.LazyTensor:
    """``transform(W)`` (W in float64, the result stored in W's dtype and of W's shape) for the constant ``W`` that
    ``value`` reads, evaluated each time it is read: the new weight costs no memory of its own, the model keeps
    reading the source tensor (memory-mapped external data for an exported model)."""
    read, dtype = constant_reader(value), constant_dtype(value)
    shape = constant_shape(value)

    def evaluate() -> ir.Tensor:
        w = read().astype(np.float64)
        read.release()  # no pages of the source stay mapped between reads
        return ir.Tensor(np.ascontiguousarray(transform(w), dtype=dtype.numpy()))

    return ir.LazyTensor(evaluate, dtype=dtype, shape=ir.Shape(shape))


def scaled_tensor(value: ir.Value, factor: np.ndarray) -> ir.LazyTensor:
    """``W * factor`` (broadcast) for the constant ``W`` that ``value`` reads (:func:`transformed_tensor`)."""
    return transformed_tensor(value, lambda w: w * factor)


def scale_rows(graph: ir.Graph, linear: Linear, s: np.ndarray) -> None:
    """``W <- diag(s) W``: input channel j of the linear times ``s_j``."""
    write_input(graph, linear.node, 1, scaled_tensor(linear.weight, s[:, None]), constant_dtype(linear.weight))


def scale_columns(graph: ir.Graph, linear: Linear, s: np.ndarray) -> None:
    """``W <- W diag(s)`` and ``b <- b * s``: output channel c of the linear (with its bias) times ``s_c``."""
    write_input(graph, linear.node, 1, scaled_tensor(linear.weight, s[None, :]), constant_dtype(linear.weight))
    add = linear.bias_add
    if add is not None:
        index = bias_index(add, linear.node.outputs[0])
        write_input(graph, add, index, scaled_tensor(add.inputs[index], s), constant_dtype(add.inputs[index]))


def scale_norm(graph: ir.Graph, norm: RMSNorm, s: np.ndarray) -> None:
    """``gamma <- gamma * s`` on the RMSNorm's weight (``norm.weight`` follows a weight given its own copy)."""
    index = next(i for i, v in enumerate(norm.node.inputs) if v is norm.weight)
    gamma = constant_array(norm.weight).astype(np.float64)
    norm.weight = write_input(graph, norm.node, index, gamma * s, constant_dtype(norm.weight))


def _producer(block: DecoderBlock, group: str) -> RMSNorm | Linear:
    return {"qkv": block.attn_norm, "o": block.v, "gate_up": block.mlp_norm, "down": block.up}[group]


def fold_group(graph: ir.Graph, block: DecoderBlock, group: str, s: np.ndarray) -> np.ndarray:
    """Fold one group's scales (see the module docstring) into its weights and its input's producer. Returns the
    row scales ``r`` [K] folded: the group's input is now ``x / r``."""
    s = sane_scales(s)
    rows = row_scales(group, s, block)
    for linear in block.groups()[group]:
        scale_rows(graph, linear, rows)
    producer = _producer(block, group)
    if isinstance(producer, RMSNorm):
        scale_norm(graph, producer, 1.0 / s)
    else:
        scale_columns(graph, producer, 1.0 / s)
    return rows


GroupWeights = Callable[[str], "list[np.ndarray]"]


def choose_block_scales(block: DecoderBlock, choose: Callable[[str, GroupWeights], "np.ndarray | None"]) -> BlockScales:
    """The scales of one block, group by group in ``FOLD_ORDER``, as plain data (nothing in the model changes).

    ``choose(group, weights)`` gives a group's scales (or None: left alone); ``weights(group)`` returns the group's
    weights ``[K, N]`` as they will be when the groups chosen before it are folded: o's scales divide v_proj's
    columns and down's divide up_proj's (computed as :func:`scaled_tensor` will, in float64 stored in W's dtype), so
    every group's scales are taken on the weights it really gets."""
    column_factors: dict[str, np.ndarray] = {}  # role -> 1/s folded into that linear's columns

    def weights(group: str) -> list[np.ndarray]:
        arrays = []
        for linear in block.groups()[group]:
            w = linear.weight_array
            if linear.role in column_factors:
                stored = constant_dtype(linear.weight).numpy()
                w = (w.astype(np.float64) * column_factors[linear.role][None, :]).astype(stored).astype(w.dtype)
            arrays.append(w)
        return arrays

    chosen: BlockScales = {}
    for group in block.smoothable_groups():
        s = choose(group, weights)
        if s is not None:
            chosen[group] = np.asarray(s, np.float64)
            producer = _producer(block, group)
            if isinstance(producer, Linear):
                column_factors[producer.role] = 1.0 / sane_scales(s)
    return chosen


def folded_rows(block: DecoderBlock, scales: BlockScales) -> dict[str, np.ndarray]:
    """Per ``layers.{i}.{group}`` key, the row scales ``r`` [K] that folding ``scales`` gives the group: its input
    becomes ``x / r`` (so statistics of ``x`` taken before folding carry over)."""
    return {f"layers.{block.index}.{group}": row_scales(group, sane_scales(s), block) for group, s in scales.items()}


def fold_smoothing_scales(model: ir.Model, blocks: Sequence[DecoderBlock],
                          scales: "dict[int, BlockScales]") -> ir.Model:
    """The pass: fold ``scales[block.index]`` (from :func:`choose_block_scales`) into each of ``blocks``, group by
    group in ``FOLD_ORDER`` (in place; also returned). Blocks without an entry are left alone."""
    SmoothingPass(blocks, lambda block, group: scales.get(block.index, {}).get(group))(model)
    return model


class SmoothingPass(ir.passes.InPlacePass):
    """Fold ``scales(block, group)`` (an array, or None to leave the group alone) into the model's weights, group
    by group in ``FOLD_ORDER``; each call sees the weights as folded so far. The graph's nodes stay as they are
    (bar Identity/Transpose nodes left unused by giving a shared norm weight its own initializer)."""

    def __init__(self, blocks: Sequence[DecoderBlock], scales: ScaleFunction):
        super().__init__()
        self.blocks, self.scales = blocks, scales

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for block in self.blocks:
            for group in block.smoothable_groups():
                s = self.scales(block, group)
                if s is not None:
                    fold_group(model.graph, block, group, s)
                    modified = True
        return ir.passes.PassResult(model, modified=modified)
