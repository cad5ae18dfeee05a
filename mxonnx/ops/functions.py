"""ONNX function bodies of the ``com.mxonnx`` ops, built only from standard opset-21 ops, so that any runtime
runs a quantized model with nothing registered. They compute ``mxonnx.formats`` bit for bit (OCP MX v1.0;
Sharify et al., arXiv 2405.07135, Sec. 1, "Microscaling format"):

    E = clamp(floor(log2(max|x|)) - emax, -127, 127)   per block of b elements along ``axis`` (zero padded)
    Q(v) = clamp(round_half_even(v / s) * s, +-max_norm),   s = 2^(clamp(floor(log2|v|), emin, emax) - mbits)
    y = Q(x * 2^-E) * 2^E;  a block holding NaN or Inf is all NaN (E8M0 code 255)

A function body cannot branch on the string ``format``, so there is one function per (op, format): its
``overload`` is the format name and the format's numbers (emax, emin, mbits, max_norm, b, code table) are
constants of the body; ``axis`` stays an attribute reference, handled at run time for any rank (inputs and
outputs are declared ``FLOAT[...]``, unknown rank: a bare ``FLOAT`` would declare a scalar).

Pre-scale (``prescale`` attribute p, float, default 1; ``mxonnx.formats``): the prescaled variant of a body multiplies
the gathered 2^-E by p and the gathered 2^E by f = 1 / p (float32 ``Div``), which are the I_E and S_E of
``mxonnx.formats`` bit for bit; p = 1 multiplies by 1. Only models that use a pre-scale hold that variant
(:func:`function_proto` with ``prescaled``), so other models keep the plain bodies byte for byte.

Exactness: ``Log`` is not exact at powers of two, so ``floor(log2 a)`` is estimated with it and then corrected by
comparing ``a`` with exact powers of two gathered from a table (the estimate is off by at most one). Powers of two
of scales likewise come from tables (``2^(c - 127)`` for E8M0 code c, NaN for 255), never from ``Pow``.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
from onnxscript import FLOAT, script
from onnxscript import opset21 as op
from onnxscript.values import Opset

from mxonnx import formats
from mxonnx.ops import schema

_DOMAIN = Opset(schema.DOMAIN, schema.DOMAIN_VERSION)

# POW2[j] = 2^(j - 127) for j = 0..256 (2^-127 is a float32 subnormal, exact; 2^128 and 2^129 overflow to Inf).
_POW2 = np.append(np.ldexp(1.0, np.arange(-127, 128)), [np.inf, np.inf]).astype(np.float32)
# E8M0 code c -> 2^(c - 127) and 2^(127 - c); code 255 -> NaN.
_SCALE = np.append(_POW2[:255], np.float32(np.nan))
_INVERSE_SCALE = np.append(_POW2[254::-1], np.float32(np.nan))
_INV_LN2 = np.float32(1 / np.log(2))


def _element_table(fmt: formats.MXFormat) -> np.ndarray:
    """Value of every storage code (2^4 or 2^8 entries) read as an index. Signed storage (MXINT) is indexed by
    the integer k, which Gather maps to entry k mod 2^storage; only the low d bits of a code count."""
    storage_bits = 4 if schema.code_dtype(fmt).bitwidth == 4 else 8
    return formats.element_values(fmt.elem)[np.arange(2**storage_bits) & (2**fmt.elem.bits - 1)]


def _quantize_dequantize_body(fmt: formats.MXFormat):
    elem = fmt.elem
    B = np.array([fmt.block_size], np.int64)
    EMAX = np.array([elem.emax], np.int64)
    # floor(log2) bounds as indices into _POW2 (exponent + 127)
    SHARED_LO, SHARED_HI = np.int64(0), np.int64(254)
    ELEM_LO, ELEM_HI = np.float32(elem.emin), np.float32(elem.emax)
    ELEM_LO_INDEX, ELEM_HI_INDEX = np.int64(elem.emin + 127), np.int64(elem.emax + 127)
    MBITS = np.int64(elem.mbits)
    MAX_NORM = np.float32(elem.max_norm)
    NAN_CODE = np.int64(255)
    ZERO = np.float32(0.0)
    POW2, SCALE, INVERSE_SCALE, INV_LN2 = _POW2, _SCALE, _INVERSE_SCALE, _INV_LN2

    @script(_DOMAIN)
    def MXQuantizeDequantize(X: FLOAT[...], axis: int = -1) -> FLOAT[...]:
        # blocks: X as [outer, nb, b, inner] around `axis`, the last block zero padded
        shape = op.Shape(X)
        rank = op.Size(shape)
        ax = op.Reshape(op.Mod(op.Add(op.Constant(value_int=axis), rank), rank), op.Constant(value_ints=[1]))
        one = op.Constant(value_ints=[1])
        zero = op.Constant(value_ints=[0])
        outer = op.ReduceProd(op.Concat(one, op.Slice(shape, zero, ax), axis=0), keepdims=1)
        n = op.Gather(shape, ax)
        inner = op.ReduceProd(op.Concat(one, op.Slice(shape, ax + 1, op.Reshape(rank, one)), axis=0), keepdims=1)
        nb = op.Div(n + B - 1, B)
        x3 = op.Reshape(X, op.Concat(outer, n, inner, axis=0))
        padded = op.Pad(x3, op.Concat(zero, zero, zero, zero, nb * B - n, zero, axis=0))
        xb = op.Reshape(padded, op.Concat(outer, nb, B, inner, axis=0))

        # shared exponent per block; NaN/Inf blocks get code 255
        block_axis = op.Constant(value_ints=[2])
        non_finite = op.Or(op.IsNaN(xb), op.IsInf(xb))
        xz = op.Where(non_finite, op.Constant(value_float=0.0), xb)
        absmax = op.ReduceMax(op.Abs(xz), block_axis, keepdims=1)
        est = op.Clip(op.Floor(op.Log(absmax) * INV_LN2), op.Constant(value_float=-127.0),
                      op.Constant(value_float=127.0))
        j = op.Cast(est, to=7) + 127
        j = j - op.Cast(op.Less(absmax, op.Gather(POW2, j)), to=7) + op.Cast(
            op.GreaterOrEqual(absmax, op.Gather(POW2, j + 1)), to=7)
        j = op.Clip(j, SHARED_LO, SHARED_HI)  # floor(log2 max) + 127, floored at 0 (zero/subnormal max)
        code = op.Max(j - EMAX, op.Constant(value_int=0))
        bad = op.Cast(op.ReduceMax(op.Cast(non_finite, to=1), block_axis, keepdims=1), to=9)
        code_or_nan = op.Where(bad, NAN_CODE, code)

        # elements: v = x / 2^E rounded on the grid of step s = 2^(clamp(floor(log2|v|), emin, emax) - mbits)
        v = xz * op.Gather(INVERSE_SCALE, code)
        mag = op.Abs(v)
        e_est = op.Clip(op.Floor(op.Log(mag) * INV_LN2), ELEM_LO, ELEM_HI)
        i = op.Cast(e_est, to=7) + 127
        i = i - op.Cast(op.Less(mag, op.Gather(POW2, i)), to=7) + op.Cast(
            op.GreaterOrEqual(mag, op.Gather(POW2, i + 1)), to=7)
        step = op.Gather(POW2, op.Clip(i, ELEM_LO_INDEX, ELEM_HI_INDEX) - MBITS)
        q = op.Clip(op.Round(v / step) * step, -MAX_NORM, MAX_NORM)
        q = op.Where(op.Equal(q, ZERO), ZERO, q)  # -0 -> +0 (an Add of 0 would be optimised away)
        yb = q * op.Gather(SCALE, code_or_nan)

        # back to X's shape
        y3 = op.Reshape(yb, op.Concat(outer, nb * B, inner, axis=0))
        return op.Reshape(op.Slice(y3, zero, n, one), shape)

    return MXQuantizeDequantize


def _dequantize_body(fmt: formats.MXFormat):
    B = np.array([fmt.block_size], np.int64)
    ELEMENTS = _element_table(fmt)
    SCALE = _SCALE

    @script(_DOMAIN)
    def MXDequantize(codes, exponents, axis: int = 0) -> FLOAT[...]:
        values = op.Gather(ELEMENTS, op.Cast(codes, to=7))
        shape = op.Shape(values)
        rank = op.Size(shape)
        ax = op.Reshape(op.Mod(op.Add(op.Constant(value_int=axis), rank), rank), op.Constant(value_ints=[1]))
        one = op.Constant(value_ints=[1])
        zero = op.Constant(value_ints=[0])
        outer = op.ReduceProd(op.Concat(one, op.Slice(shape, zero, ax), axis=0), keepdims=1)
        n = op.Gather(shape, ax)
        inner = op.ReduceProd(op.Concat(one, op.Slice(shape, ax + 1, op.Reshape(rank, one)), axis=0), keepdims=1)
        nb = op.Div(n + B - 1, B)
        # scale per element: 2^(exponent - 127) of its block, repeated b times along `axis`
        scale = op.Reshape(op.Gather(SCALE, op.Cast(exponents, to=7)), op.Concat(outer, nb, one, inner, axis=0))
        repeated = op.Expand(scale, op.Concat(outer, nb, B, inner, axis=0))
        per_element = op.Slice(op.Reshape(repeated, op.Concat(outer, nb * B, inner, axis=0)), zero, n, one)
        w3 = op.Reshape(values, op.Concat(outer, n, inner, axis=0)) * per_element
        return op.Reshape(w3, shape)

    return MXDequantize


_BODIES = {schema.QUANTIZE_DEQUANTIZE: _quantize_dequantize_body, schema.DEQUANTIZE: _dequantize_body}
# the constant tables whose gathered entries a pre-scale multiplies: 2^-E by p, 2^E by f = 1 / p
_PRESCALED_TABLES = {"INVERSE_SCALE": "prescale_p", "SCALE": "prescale_f"}


def _add_prescale(proto: onnx.FunctionProto) -> None:
    """Declare the ``prescale`` attribute (default 1.0) and multiply the output of every Gather from one of
    ``_PRESCALED_TABLES`` by p or f = 1 / p."""
    p = onnx.helper.make_node("Constant", [], ["prescale_p"])
    p.attribute.append(onnx.AttributeProto(name="value_float", ref_attr_name=schema.PRESCALE_ATTR,
                                           type=onnx.AttributeProto.FLOAT))
    head = [p, onnx.helper.make_node("Constant", [], ["prescale_one"], value_float=1.0),
            onnx.helper.make_node("Div", ["prescale_one", "prescale_p"], ["prescale_f"])]
    nodes, patched = [], 0
    for node in proto.node:
        nodes.append(node)
        if node.op_type == "Gather" and node.input[0] in _PRESCALED_TABLES:
            out = node.output[0]
            node.output[0] = f"{out}_pow2"
            nodes.append(onnx.helper.make_node("Mul", [node.output[0], _PRESCALED_TABLES[node.input[0]]], [out]))
            patched += 1
    assert patched, "a body without scale tables"
    del proto.node[:]
    proto.node.extend(head + nodes)
    proto.attribute_proto.append(onnx.helper.make_attribute(schema.PRESCALE_ATTR, 1.0))


@functools.lru_cache(maxsize=None)
def _function_proto(op_type: str, fmt: formats.MXFormat, prescaled: bool) -> onnx.FunctionProto:
    proto = _BODIES[op_type](fmt).to_function_proto()
    proto.overload = schema.overload(fmt)
    # the node's `format` is the contract; declared (unused by the body) so checkers accept the attribute
    proto.attribute.append(schema.FORMAT_ATTR)
    if prescaled:
        _add_prescale(proto)
    return proto


def function_proto(op_type: str, fmt: str | formats.MXFormat, prescaled: bool | None = None) -> onnx.FunctionProto:
    """The FunctionProto defining ``op_type`` (one of ``schema.OPS``) for an MX format (a fresh copy); with
    ``prescaled`` (default: whether ``fmt`` has a pre-scale) the variant taking the ``prescale`` attribute, which
    with p = 1 computes the plain body's values."""
    if op_type not in _BODIES:
        raise ValueError(f"{op_type!r} is not an op of {schema.DOMAIN} (ops: {', '.join(schema.OPS)})")
    fmt = schema.mx_format(fmt)
    base = formats.parse_format(fmt.name)  # the body depends on the element format and block only
    proto = onnx.FunctionProto()
    proto.CopyFrom(_function_proto(op_type, base, fmt.prescaled if prescaled is None else prescaled))
    return proto
