"""Names and storage layout of the ``com.mxonnx`` custom domain, shared by the function bodies, the rewrite pass,
``inspect`` and the native kernels (which read the same layout).

| op | inputs -> output | attributes |
|---|---|---|
| ``MXQuantizeDequantize`` | X float32 -> Y float32 (same shape) | ``format`` (string), ``axis`` (int, default -1), ``prescale`` (float, default 1) |
| ``MXDequantize`` | codes, exponents (uint8 E8M0) -> W float32 | ``format``, ``axis`` (default 0), ``prescale`` (default 1) |
| ``BlockHadamard`` | X float32 -> Y float32 (same shape) | ``block`` (int, a power of two dividing X's last dim) |
| ``GroupAttention`` | q, k, v, past_key, past_value, attention_bias -> O, present_key, present_value | ``num_heads``, ``kv_num_heads``, ``scale`` |

``BlockHadamard`` is the online rotation of ``--rotate`` (``passes/rotation.py``): ``Y = X blockdiag(H_b / sqrt(b))``
along the last axis, computed as a fast Walsh-Hadamard transform (``mxonnx.ops.hadamard``); its overload is
``b{block}``.

``GroupAttention`` is the attention of ``create_session(fuse=True)`` with the native library (``passes/fuse_attention.py``,
``mxonnx.ops.attention``): grouped-query attention with an additive mask over the KV cache, no overload.

``prescale`` p (``mxonnx.formats``, in (0.5, 1]): elements Q(x * fl(2^-E p)), values element * fl(2^E / p); written
only when p != 1.

``MXDequantize`` storage: ``codes`` has the output's shape (no padding), dtype ``code_dtype(format)``;
``exponents`` is uint8 with the output's shape but dim ``axis`` = ceil(n / b); W = element(code) * 2^(exponent - 127).

Each node also names the model-local ONNX function that defines it through its ``overload`` field (IR >= 10): one
FunctionProto per (op, format), overload = the canonical format name, ``axis`` an attribute reference.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir

from mxonnx import formats
from mxonnx.errors import InputError

DOMAIN = "com.mxonnx"
DOMAIN_VERSION = 1
QUANTIZE_DEQUANTIZE = "MXQuantizeDequantize"
DEQUANTIZE = "MXDequantize"
OPS = (QUANTIZE_DEQUANTIZE, DEQUANTIZE)
BLOCK_HADAMARD = "BlockHadamard"
BLOCK_ATTR = "block"
GROUP_ATTENTION = "GroupAttention"
ROTATION_METADATA = "mxonnx.rotation"  # model metadata: --rotate's blocks (JSON), read by inspect
FORMAT_ATTR = "format"
AXIS_ATTR = "axis"
PRESCALE_ATTR = "prescale"
DEFAULT_AXIS = {QUANTIZE_DEQUANTIZE: -1, DEQUANTIZE: 0}

# INT4/UINT4 tensors and Cast from them, and DequantizeLinear's block_size, need opset 21 and IR version 10
# (which also brings function overloads).
STANDARD_OPSET = 21
IR_VERSION = 10


def mx_format(fmt: str | formats.MXFormat) -> formats.MXFormat:
    """The parsed format, which must be an MX format (only those go through the domain's ops)."""
    parsed = formats.parse_format(fmt)
    if parsed.kind != "mx":
        raise InputError(f"format {parsed.name!r} is not an MX format; the {DOMAIN} ops take MX formats only")
    return parsed


def format_attributes(fmt: formats.MXFormat, axis: int) -> dict:
    """The attributes of a domain node of ``fmt``: format, axis, and prescale when there is one."""
    attributes = {FORMAT_ATTR: fmt.name, AXIS_ATTR: axis}
    if fmt.prescaled:
        attributes[PRESCALE_ATTR] = fmt.prescale
    return attributes


def node_format(node: ir.Node | onnx.NodeProto, format_attr: str = FORMAT_ATTR,
                prescale_attr: str = PRESCALE_ATTR) -> formats.MXFormat:
    """The format an onnx-ir node or a NodeProto names in ``format_attr``, with the pre-scale in ``prescale_attr``."""
    if isinstance(node, onnx.NodeProto):
        by_name = {a.name: a for a in node.attribute}
        name, p = by_name[format_attr].s.decode(), by_name[prescale_attr].f if prescale_attr in by_name else 1.0
    else:
        name = node.attributes[format_attr].as_string()
        p = node.attributes[prescale_attr].as_float() if prescale_attr in node.attributes else 1.0
    fmt = formats.parse_format(name)
    return formats.with_prescale(fmt, p) if p != 1.0 else fmt


def code_dtype(fmt: str | formats.MXFormat) -> ir.DataType:
    """Storage type of MXDequantize's codes: INT4 for MXINT2..4 (value k), INT8 for MXINT5..8, UINT4 for MXFP4
    (E2M1 bit pattern), UINT8 for MXFP6/MXFP8 (bit pattern, sign at bit d - 1)."""
    elem = mx_format(fmt).elem
    if elem.integer_codes:
        return ir.DataType.INT4 if elem.bits <= 4 else ir.DataType.INT8
    return ir.DataType.UINT4 if elem.bits <= 4 else ir.DataType.UINT8


def overload(fmt: str | formats.MXFormat) -> str:
    """The function overload a node of this format calls: the canonical format name, e.g. ``mxint4-128``."""
    return mx_format(fmt).name


def exponents_shape(shape: tuple[int, ...], axis: int, block_size: int) -> tuple[int, ...]:
    """``shape`` with dim ``axis`` replaced by ceil(n / block_size)."""
    axis %= len(shape)
    return shape[:axis] + (-(-shape[axis] // block_size),) + shape[axis + 1:]
