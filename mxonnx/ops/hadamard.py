"""The block Hadamard transform of ``--rotate`` (MR-GPTQ, arXiv 2509.23202): numpy reference, matrix and the ONNX
function body of ``com.mxonnx.BlockHadamard``.

``H_b`` is Sylvester's Hadamard matrix (``H_1 = [1]``, ``H_2b = [[H_b, H_b], [H_b, -H_b]]``), symmetric with
``H_b H_b = b I``; the transform along the last axis of ``X [..., n]`` (``b`` divides ``n``) is

    Y = X blockdiag(H_b, ..., H_b) / sqrt(b)

computed as the fast Walsh-Hadamard transform: for ``h = 1, 2, .., b/2`` every pair ``(x_i, x_{i+h})`` with
``i mod 2h < h`` becomes ``(x_i + x_{i+h}, x_i - x_{i+h})``, in float32, then one product by ``fl(1/sqrt(b))``. The
function body, the native kernel and :func:`block_hadamard` do exactly these float32 operations, so they agree bit
for bit (for ``b`` a power of 4 the scale is a power of two and the result is the exact transform rounded once per
stage).
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
from onnx import helper

from mxonnx.errors import InputError
from mxonnx.ops import schema


def check_block(block: int) -> int:
    if block < 1 or block & (block - 1):
        raise InputError(f"a block Hadamard needs a power-of-two block, got {block}")
    return int(block)


def hadamard_matrix(block: int) -> np.ndarray:
    """``H_b / sqrt(b)`` in float64 (orthogonal and symmetric)."""
    h = np.ones((1, 1))
    while h.shape[0] < check_block(block):
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(block)


def scale(block: int) -> np.float32:
    """``fl(1/sqrt(b))``, the float32 factor applied after the butterflies."""
    return np.float32(1.0 / np.sqrt(np.float64(block)))


def block_hadamard(x: np.ndarray, block: int) -> np.ndarray:
    """The transform along the last axis in float32, stage by stage as the module docstring says."""
    x = np.asarray(x, np.float32)
    n = x.shape[-1]
    if n % check_block(block):
        raise ValueError(f"last dimension {n} is not a multiple of the Hadamard block {block}")
    y = x.reshape(-1, n)
    h = 1
    while h < block:
        pairs = y.reshape(y.shape[0], n // (2 * h), 2, h)
        a, c = pairs[:, :, 0, :], pairs[:, :, 1, :]
        y = np.stack([a + c, a - c], axis=2).reshape(y.shape[0], n)
        h *= 2
    return (y * scale(block)).reshape(x.shape)


def overload(block: int) -> str:
    return f"b{check_block(block)}"


@functools.lru_cache(maxsize=None)
def _function_proto(block: int) -> onnx.FunctionProto:
    """``BlockHadamard`` for one block size from standard ops: X as ``[rows, n/(2h), 2, h]`` per stage, Split on
    the pair axis, ``Concat(a + c, a - c)``, and the final Mul; any rank (the shape is restored at the end)."""
    nodes = [helper.make_node("Shape", ["X"], ["shape"]),
             helper.make_node("Constant", [], ["last"], value_ints=[-1]),
             helper.make_node("Gather", ["shape", "last"], ["n"], axis=0)]
    current = "X"
    h = 1
    while h < block:
        s = f"s{h}"
        nodes += [
            helper.make_node("Constant", [], [f"{s}_tail"], value_ints=[2, h]),
            helper.make_node("Constant", [], [f"{s}_pairs"], value_ints=[2 * h]),
            helper.make_node("Div", ["n", f"{s}_pairs"], [f"{s}_groups"]),
            helper.make_node("Constant", [], [f"{s}_rows"], value_ints=[-1]),
            helper.make_node("Concat", [f"{s}_rows", f"{s}_groups", f"{s}_tail"], [f"{s}_shape"], axis=0),
            helper.make_node("Reshape", [current, f"{s}_shape"], [f"{s}_x"]),
            helper.make_node("Split", [f"{s}_x"], [f"{s}_a", f"{s}_c"], axis=2, num_outputs=2),
            helper.make_node("Add", [f"{s}_a", f"{s}_c"], [f"{s}_sum"]),
            helper.make_node("Sub", [f"{s}_a", f"{s}_c"], [f"{s}_difference"]),
            helper.make_node("Concat", [f"{s}_sum", f"{s}_difference"], [f"{s}_y"], axis=2),
        ]
        current, h = f"{s}_y", 2 * h
    nodes += [helper.make_node("Reshape", [current, "shape"], ["unscaled"]),
              helper.make_node("Constant", [], ["scale"], value=helper.make_tensor("scale", onnx.TensorProto.FLOAT,
                                                                                    [], [float(scale(block))])),
              helper.make_node("Mul", ["unscaled", "scale"], ["Y"])]
    proto = helper.make_function(schema.DOMAIN, schema.BLOCK_HADAMARD, ["X"], ["Y"], nodes,
                                 [helper.make_opsetid("", schema.STANDARD_OPSET)], attributes=[schema.BLOCK_ATTR])
    proto.overload = overload(block)
    return proto


def function_proto(block: int) -> onnx.FunctionProto:
    """The FunctionProto defining ``BlockHadamard`` with ``block`` (a fresh copy)."""
    proto = onnx.FunctionProto()
    proto.CopyFrom(_function_proto(check_block(block)))
    return proto
