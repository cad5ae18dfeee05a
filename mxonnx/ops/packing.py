"""Quantized weights as ONNX tensors in their storage types: 4-bit codes two to a byte (INT4/UINT4), 8-bit codes
one byte, MX exponents one byte per block (E8M0), fixed-point scales float32.

Input is ``mxonnx.formats.quantize(W, fmt, axis=0)``'s output: MXINT codes are int8 integers k, MXFP codes uint8
bit patterns, fixed-point codes int8 integers.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir

from mxonnx import formats
from mxonnx.ops import schema

_NUMPY_STORAGE = {
    ir.DataType.INT4: ml_dtypes.int4,
    ir.DataType.UINT4: ml_dtypes.uint4,
    ir.DataType.INT8: np.int8,
    ir.DataType.UINT8: np.uint8,
}


def code_storage(fmt: str | formats.MXFormat) -> ir.DataType:
    """Storage type of a weight format's codes: ``schema.code_dtype`` for MX; INT4 (d <= 4) or INT8 for int{d}."""
    fmt = formats.parse_format(fmt)
    if fmt.kind == "mx":
        return schema.code_dtype(fmt)
    if fmt.kind == "int":
        return ir.DataType.INT4 if fmt.bits <= 4 else ir.DataType.INT8
    raise ValueError(f"format {fmt.name!r} has no codes")


def code_tensor(codes: np.ndarray, fmt: str | formats.MXFormat, name: str) -> ir.Tensor:
    """The codes in their storage type (values must fit it: MXINT/int k, MXFP bit patterns)."""
    storage = code_storage(fmt)
    return ir.Tensor(np.asarray(codes).astype(_NUMPY_STORAGE[storage]), dtype=storage, name=name)


def scale_tensor(scales: np.ndarray, fmt: str | formats.MXFormat, name: str) -> ir.Tensor:
    """MX: uint8 E8M0 exponents; fixed point: float32 scales."""
    dtype = np.uint8 if formats.parse_format(fmt).kind == "mx" else np.float32
    return ir.Tensor(np.ascontiguousarray(scales, dtype=dtype), name=name)

