"""Lower an MX model (``com.mxonnx`` ops) to graphs that stock runtimes and QDQ compilers read directly.

All three targets are exact: they compute the same values as the custom ops.

- ``inline``: every ``com.mxonnx`` call replaced by its ONNX function body (standard ops only).
- ``qdq``: MXINT weights become ``DequantizeLinear(codes, scale, axis=0, block_size=b)`` (opset 21 blocked
  dequantization) with the fp32 scale ``2^(E - 127 - (d - 2))``, which is exact: an MXINTd element is
  ``k * 2^-(d-2)`` and the block scale ``2^E``. Other MX weights and the activation ops are inlined.
  A pre-scaled format (``prescale`` p) has the float block scale ``fl(2^E f)``, f = fl(1 / p): the DequantizeLinear
  scale becomes ``fl(2^E f) * 2^-(d-2)`` (exact, a power-of-two shift), the inlined bodies multiply by the same f.
  Note: onnxruntime fuses such a DequantizeLinear + MatMul into MatMulNBits and by default runs it with int8
  activations; set the session config ``session.qdq_matmulnbits_accuracy_level`` to ``0`` to keep it exact
  (``mxonnx.session`` does).
- ``matmulnbits``: every ``MatMul(A, MXDequantize(codes, exps))`` with MXINTd weights becomes
  ``com.microsoft.MatMulNBits`` (bits 4 for d <= 4, else 8; unsigned codes ``k + 2^(bits-1)`` with the default
  zero point ``2^(bits-1)``; the same scales, pre-scale included). ORT needs a block size of at least 16; MXFP
  weights, pre-scaled or not, have no MatMulNBits form and are refused. (Every target holds float scales, so none
  needs to refuse a pre-scale for holding only E8M0 ones.)
  Activation ops are inlined.

Memory: the weights that a target rewrites (qdq scales, MatMulNBits codes and scales) are ``ir.LazyTensor``s
computed from the source tensors when the model is saved, one at a time (the source mapping released after each),
and the weights kept as they are stay memory-mapped external tensors that ``ir.save`` copies file to file; lowering
a model holds about one weight's data, whatever its depth.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from mxonnx import formats
from mxonnx.errors import InputError
from mxonnx.ops import schema

TARGETS = ("inline", "qdq", "matmulnbits")
MS_DOMAIN = "com.microsoft"


def _mx_dequantize_nodes(model: ir.Model) -> list[ir.Node]:
    return [n for n in model.graph if n.domain == schema.DOMAIN and n.op_type == schema.DEQUANTIZE]


def _format_and_axis(node: ir.Node) -> tuple[formats.MXFormat, int]:
    fmt = schema.node_format(node)
    axis = node.attributes[schema.AXIS_ATTR].as_int() if schema.AXIS_ATTR in node.attributes else 0
    return fmt, axis


def _read(tensor: ir.TensorProtocol, dtype: type) -> np.ndarray:
    """``tensor``'s values as a new ``dtype`` array; an external tensor's mapping (and its unpacked copy of 4-bit
    codes) is released right after, so lowering holds one weight's data at a time."""
    array = np.asarray(tensor.numpy()).astype(dtype)
    if isinstance(tensor, ir.ExternalTensor):
        try:
            tensor.release()
        except BufferError:  # another view of the mapping is alive: it stays mapped
            pass
    return array


def _lazy(name: str, dtype: ir.DataType, shape: tuple[int, ...], compute) -> ir.Value:
    """An initializer whose data ``compute()`` makes when it is saved (and is dropped right after): the lowered
    weights are written one at a time instead of all being held until the save."""
    tensor = ir.LazyTensor(lambda: ir.Tensor(compute(), name=name), dtype=dtype, shape=ir.Shape(shape), name=name)
    return ir.Value(name=name, const_value=tensor)


def _int_block_scales(exponents: ir.TensorProtocol, fmt: formats.MXFormat) -> np.ndarray:
    """fp32 scales 2^(E - 127 - (d - 2)) of an MXINTd weight, from its E8M0 exponents (exact powers of two);
    pre-scaled: fl(2^(E - 127) f) 2^-(d - 2)."""
    exps = _read(exponents, np.uint8)
    return np.ldexp(formats.block_float_scales(exps, fmt), -(fmt.bits - 2)).astype(np.float32)


def _lowerable_int_weight(node: ir.Node) -> formats.MXFormat | None:
    fmt, axis = _format_and_axis(node)
    codes, exps = node.inputs
    if fmt.elem is None or not fmt.elem.integer_codes or axis != 0 or codes.const_value is None or exps.const_value is None:
        return None
    if len(codes.const_value.shape) != 2:
        return None
    return fmt


def _replace_with_dequantize_linear(model: ir.Model, node: ir.Node, fmt: formats.MXFormat) -> None:
    exponents = node.inputs[1].const_value
    scales = _lazy(f"{node.inputs[0].name}_qdq_scale", ir.DataType.FLOAT, tuple(exponents.shape),
                   lambda: _int_block_scales(exponents, fmt))
    model.graph.register_initializer(scales)
    dq = ir.node("DequantizeLinear", [node.inputs[0], scales], attributes={"axis": 0, "block_size": fmt.block_size},
                 name=f"{node.name}/DequantizeLinear", num_outputs=1)
    model.graph.insert_before(node, dq)
    dq.outputs[0].name = node.outputs[0].name + "_dql"
    ir.convenience.replace_all_uses_with(node.outputs[0], dq.outputs[0])
    model.graph.remove(node, safe=True)


def _pack_matmulnbits(codes: np.ndarray, bits: int, block: int) -> np.ndarray:
    """codes [K, N] (signed k) -> uint8 [N, k_blocks, block * bits / 8], unsigned ``k + 2^(bits-1)``, padding with
    the zero point, two 4-bit codes a byte low nibble first."""
    k, n = codes.shape
    blocks = -(-k // block)
    zero_point = 1 << (bits - 1)
    padded = np.full((blocks * block, n), zero_point, dtype=np.uint8)
    padded[:k] = (codes + zero_point).astype(np.uint8)
    per_column = padded.T.reshape(n, blocks, block)
    if bits == 8:
        return np.ascontiguousarray(per_column)
    return (per_column[..., 0::2] | (per_column[..., 1::2] << 4)).astype(np.uint8)


def _nbits_initializers(deq: ir.Node, fmt: formats.MXFormat, bits: int) -> tuple[ir.Value, ir.Value]:
    """MatMulNBits' packed codes ``[N, k_blocks, block * bits / 8]`` and fp32 scales ``[N, k_blocks]`` of ``deq``'s
    weight, both computed only when saved (:func:`_lazy`)."""
    codes, exponents = deq.inputs[0].const_value, deq.inputs[1].const_value
    k, n = codes.shape
    block = fmt.block_size
    blocks = -(-k // block)
    prefix = deq.inputs[0].name
    packed = _lazy(f"{prefix}_nbits", ir.DataType.UINT8, (n, blocks, block * bits // 8),
                   lambda: _pack_matmulnbits(_read(codes, np.int16), bits, block))
    scales = _lazy(f"{prefix}_nbits_scales", ir.DataType.FLOAT, (n, blocks),
                   lambda: np.ascontiguousarray(_int_block_scales(exponents, fmt).T))
    return packed, scales


def _replace_with_matmulnbits(model: ir.Model, deq: ir.Node, fmt: formats.MXFormat) -> int:
    """Replace every MatMul reading ``deq``'s output as B by MatMulNBits; returns how many."""
    bits = 4 if fmt.bits <= 4 else 8
    k, n = deq.inputs[0].const_value.shape
    matmuls = [c for c in deq.outputs[0].consumers() if c.op_type == "MatMul" and c.domain == "" and c.inputs[1] is deq.outputs[0]]
    if not matmuls or len(matmuls) != len(list(deq.outputs[0].uses())):
        return 0
    packed, scales = _nbits_initializers(deq, fmt, bits)
    model.graph.register_initializer(packed)
    model.graph.register_initializer(scales)
    for mm in matmuls:
        fused = ir.node("MatMulNBits", [mm.inputs[0], packed, scales], domain=MS_DOMAIN, name=f"{mm.name}/MatMulNBits",
                        attributes={"K": k, "N": n, "bits": bits, "block_size": fmt.block_size, "accuracy_level": 0},
                        num_outputs=1)
        model.graph.insert_before(mm, fused)
        out_name = mm.outputs[0].name
        # a quantized lm_head's MatMul gives the graph output (logits): the replacement takes its place and name
        mm.outputs[0].replace_all_uses_with(fused.outputs[0], replace_graph_outputs=True)
        model.graph.remove(mm, safe=True)
        fused.outputs[0].name = out_name
    model.graph.remove(deq, safe=True)
    return len(matmuls)


def _inline_and_clean(model: ir.Model) -> None:
    common_passes.InlinePass()(model)
    common_passes.RemoveUnusedNodesPass()(model)
    common_passes.RemoveUnusedFunctionsPass()(model)
    model.opset_imports.pop(schema.DOMAIN, None)
    for name in [name for name, v in model.graph.initializers.items() if not list(v.uses())]:
        del model.graph.initializers[name]


def lower(model: ir.Model, target: str) -> tuple[ir.Model, dict]:
    """Lower ``model`` in place to ``target``; returns it and counts of what was rewritten."""
    if target not in TARGETS:
        raise InputError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    if not any(n.domain == schema.DOMAIN for n in model.graph):
        raise InputError(f"the model has no {schema.DOMAIN} ops to lower (quantize it with MX formats first; "
                         "int formats are standard ONNX already)")
    counts = {"dequantize_linear": 0, "matmulnbits": 0}
    if target == "qdq":
        for node in _mx_dequantize_nodes(model):
            fmt = _lowerable_int_weight(node)
            if fmt is not None:
                _replace_with_dequantize_linear(model, node, fmt)
                counts["dequantize_linear"] += 1
    elif target == "matmulnbits":
        refused = set()
        for node in _mx_dequantize_nodes(model):
            fmt = _lowerable_int_weight(node)
            if fmt is None or fmt.block_size < 16:
                refused.add(_format_and_axis(node)[0].name)
                continue
            counts["matmulnbits"] += _replace_with_matmulnbits(model, node, fmt)
        if refused:
            raise InputError(f"weights in {', '.join(sorted(refused))} have no MatMulNBits form (it takes MXINT weights "
                             "with blocks of 16 or more); use --target qdq or inline")
        model.opset_imports[MS_DOMAIN] = 1
    _inline_and_clean(model)
    counts["custom_ops_left"] = sum(1 for n in model.graph if n.domain == schema.DOMAIN)
    return model, counts
