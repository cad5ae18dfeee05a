"""Block rotation of a float Llama graph (MR-GPTQ, arXiv 2509.23202, Sec. 4: block-wise Hadamard rotations matched
to the MX block), run before calibration so that statistics, AWQ and GPTQ all see the rotated model.

``Q_b = blockdiag(H_b, ..., H_b) / sqrt(b)`` (``mxonnx.ops.hadamard``) is orthogonal and symmetric. A MatMul's
weight is ``W [K, N]`` (``y = x W``). With ``b_r``, ``b_h``, ``b_d`` the largest powers of two dividing the rotation
block and the hidden size, head_dim and the MLP width (SmolLM2, block 32: 32, 32, 32; block 128: 64, 64, 128):

1. **Residual stream** ``x -> x Q`` (``Q = Q_{b_r}``), folded into existing weights. Each RMSNorm weight
   ``gamma`` is absorbed into the linears reading the norm (``W <- diag(gamma) W``) and set to ones; then
   ``RMSNorm(x Q) = RMSNorm(x) Q`` (rms is invariant under an orthogonal Q), so

   - embedding rows ``E <- E Q``;
   - q/k/v and gate/up (readers of the stream) ``W <- Q^T diag(gamma) W``, lm_head ``W <- Q^T diag(gamma_final) W``;
   - o_proj and down_proj (writers) ``W <- W Q``, their biases ``b <- b Q``.

2. **V/O per head**: v_proj's columns ``W_v <- W_v Q_{b_h}`` (with its bias), o_proj's rows
   ``W_o <- Q_{b_h}^T W_o``: ``b_h`` divides head_dim, so ``Q_{b_h}`` rotates every head alike, and each query head's
   output (a softmax mix of its KV head's rows of V, also with GQA) comes out rotated by the same block.

3. **down_proj's input** ``u = silu(g) * v`` (elementwise, no weight to fold into): an online
   ``com.mxonnx.BlockHadamard`` (block ``b_d``) before down_proj, ``u -> u Q_{b_d}``, and ``W_d <- Q_{b_d}^T W_d``.
   The MX quantizer the rewrite puts on down's input then sees the rotated ``u``. Smoothing scales of down's
   input no longer fold into up_proj's columns, so SmoothQuant/AWQ leave that group alone
   (``DecoderBlock.smoothable_groups``).

Tied embeddings: absorbing ``gamma_final`` makes lm_head ``Q^T diag(gamma_final) E^T``, no longer the embedding's
transpose, so lm_head gets its own initializer (``vocab x hidden`` more float weights: 28.3 M, 113 MB in float32
for SmolLM2, unless ``--lm-head`` quantizes it, as by default). Nothing else is added. New weights are lazy tensors
computed from the source tensors (in float64, stored in each weight's dtype) when read.
"""

from __future__ import annotations

import json
from typing import Callable

import numpy as np
import onnx_ir as ir

from mxonnx import formats
from mxonnx.config import QuantizeConfig
from mxonnx.errors import InputError
from mxonnx.ops import hadamard, schema
from mxonnx.passes.llama_structure import (
    DecoderBlock, Linear, RMSNorm, bias_index, constant_array, constant_dtype, constant_shape, find_decoder_blocks,
    find_lm_head, rmsnorm_producing)
from mxonnx.passes.mx_matmul import add_mx_functions
from mxonnx.passes.smoothing import transformed_tensor, write_input

ROTATION_METADATA = schema.ROTATION_METADATA


def rotation_block(config: QuantizeConfig) -> int:
    """The block of ``--rotate``: ``--rotate-block``, else the weight format's MX (or int-g) block, else the
    activation format's."""
    if config.rotate_block is not None:
        return hadamard.check_block(config.rotate_block)
    for name in (config.weights, config.acts):
        fmt = formats.parse_format(name)
        if fmt.block_size is not None:
            return fmt.block_size
    raise InputError("--rotate takes its block from an MX weight or activation format; give one or --rotate-block B")


def fitted_block(block: int, width: int) -> int:
    """The largest power of two dividing both ``block`` and ``width``."""
    return min(block & -block, width & -width)


def rotate_rows(w: np.ndarray, b: int) -> np.ndarray:
    """``Q_b^T W`` for ``W [K, N]``."""
    k, n = w.shape
    return (hadamard.hadamard_matrix(b).T @ w.reshape(k // b, b, n)).reshape(k, n)


def rotate_columns(w: np.ndarray, b: int) -> np.ndarray:
    """``W Q_b`` along the last axis (a weight ``[K, N]`` or a bias ``[N]``)."""
    return (w.reshape(*w.shape[:-1], w.shape[-1] // b, b) @ hadamard.hadamard_matrix(b)).reshape(w.shape)


def _transform_weight(graph: ir.Graph, linear: Linear, transform: Callable[[np.ndarray], np.ndarray]) -> None:
    write_input(graph, linear.node, 1, transformed_tensor(linear.weight, transform), constant_dtype(linear.weight))


def _rotate_output(graph: ir.Graph, linear: Linear, b: int) -> None:
    """``W <- W Q_b`` and ``b <- b Q_b`` after whatever row transform the weight already has."""
    _transform_weight(graph, linear, lambda w: rotate_columns(w, b))
    add = linear.bias_add
    if add is not None:
        index = bias_index(add, linear.node.outputs[0])
        write_input(graph, add, index, transformed_tensor(add.inputs[index], lambda v: rotate_columns(v, b)),
                    constant_dtype(add.inputs[index]))


def _absorb_norm(graph: ir.Graph, norm: RMSNorm, readers: list[Linear], b: int) -> None:
    """``W <- Q_b^T diag(gamma) W`` for every reader of the norm, then ``gamma <- 1``."""
    consumers = {id(node) for node in norm.output.consumers() if node.op_type not in ("Shape", "Size")}
    if consumers != {id(linear.node) for linear in readers} or norm.output.is_graph_output():
        raise InputError(f"--rotate: norm {norm.node.name!r} is read by more than its linears; cannot fold its weight")
    gamma = constant_array(norm.weight).astype(np.float64)
    for linear in readers:
        _transform_weight(graph, linear, lambda w: rotate_rows(gamma[:, None] * w, b))
    index = next(i for i, v in enumerate(norm.node.inputs) if v is norm.weight)
    norm.weight = write_input(graph, norm.node, index, np.ones_like(gamma), constant_dtype(norm.weight))


def _embedding(model: ir.Model, hidden: int) -> ir.Node:
    """The ``Gather`` of token rows from a constant ``[vocab, hidden]`` table."""
    found = [node for node in model.graph if node.op_type == "Gather" and node.domain in ("", "ai.onnx")
             and (shape := constant_shape(node.inputs[0])) is not None and len(shape) == 2 and shape[1] == hidden]
    if len(found) != 1:
        raise InputError(f"--rotate needs one embedding Gather of a [vocab, {hidden}] table, found {len(found)}")
    return found[0]


def _online_hadamard(model: ir.Model, linear: Linear, b: int) -> ir.Node:
    """``BlockHadamard(x, block=b)`` inserted before ``linear``, which now reads it."""
    x = linear.input
    node = ir.node(schema.BLOCK_HADAMARD, [x], domain=schema.DOMAIN, overload=hadamard.overload(b),
                   attributes={schema.BLOCK_ATTR: b}, name=f"{linear.name}/BlockHadamard")
    node.outputs[0].name = f"{x.name}_hadamard"
    node.outputs[0].shape, node.outputs[0].type = x.shape, x.type
    model.graph.insert_before(linear.node, node)
    linear.node.replace_input_with(0, node.outputs[0])
    return node


def _add_hadamard_function(model: ir.Model, b: int) -> None:
    add_mx_functions(model, set())  # standard opset 21 and IR 10 (function overloads), as the MX rewrite declares
    model.graph.opset_imports[schema.DOMAIN] = schema.DOMAIN_VERSION
    function = ir.serde.deserialize_function(hadamard.function_proto(b))
    model.functions.setdefault(function.identifier(), function)


def _rotate_block(graph: ir.Graph, block: DecoderBlock, b_r: int, b_h: int, b_d: int) -> None:
    _absorb_norm(graph, block.attn_norm, [block.q, block.k, block.v], b_r)
    _absorb_norm(graph, block.mlp_norm, [block.gate, block.up], b_r)
    _rotate_output(graph, block.v, b_h)
    _transform_weight(graph, block.o, lambda w: rotate_rows(w, b_h))
    _rotate_output(graph, block.o, b_r)
    _transform_weight(graph, block.down, lambda w: rotate_rows(w, b_d))
    _rotate_output(graph, block.down, b_r)


def block_rotation(model: ir.Model, config: QuantizeConfig) -> ir.Model:
    """The pass: rotate ``model`` (a float Llama graph) in place as the module docstring says, with the block of
    :func:`rotation_block`; records ``{block, residual, head, down}`` as the metadata ``mxonnx.rotation``."""
    block = rotation_block(config)
    blocks = find_decoder_blocks(model)
    if any(b.down_rotation is not None for b in blocks):
        raise InputError("the model is rotated already (it holds BlockHadamard nodes)")
    head = find_lm_head(model, blocks)
    if head is None:
        raise InputError("--rotate needs the lm_head MatMul (the residual stream's last reader)")
    hidden = blocks[0].q.shape[0]
    final_norm = rmsnorm_producing(head.input)
    if final_norm is None:
        raise InputError("--rotate: lm_head does not read an RMSNorm")
    b_r = fitted_block(block, hidden)
    b_h = fitted_block(block, blocks[0].head_dim)
    b_d = fitted_block(block, blocks[0].down.shape[0])
    graph = model.graph
    embedding = _embedding(model, hidden)
    for decoder_block in blocks:
        _rotate_block(graph, decoder_block, b_r, b_h, b_d)
        _online_hadamard(model, decoder_block.down, b_d)
    _absorb_norm(graph, final_norm, [head], b_r)  # a tied lm_head gets its own initializer here
    write_input(graph, embedding, 0, transformed_tensor(embedding.inputs[0], lambda e: rotate_columns(e, b_r)),
                constant_dtype(embedding.inputs[0]))
    _add_hadamard_function(model, b_d)
    model.metadata_props[ROTATION_METADATA] = json.dumps({"block": block, "residual": b_r, "head": b_h, "down": b_d})
    return model
