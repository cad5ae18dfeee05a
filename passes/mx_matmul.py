"""Rewrite the linears of a Llama graph to quantized MatMuls (Sharify et al., arXiv 2405.07135):

    MatMul(X, W)  ->  MatMul(MXQuantizeDequantize(X), MXDequantize(codes, exponents))

for q, k, v, o, gate, up and down of every decoder block (and lm_head when selected). Weights and activations take
their formats independently:

- MX weights: packed codes and E8M0 exponents (``mxonnx.ops.packing``) read by ``com.mxonnx.MXDequantize``, axis 0;
- fixed-point weights ``int{d}`` / ``int{d}-g{b}``: int4/int8 codes and fp32 scales read by a standard
  ``DequantizeLinear`` (per output channel via ``axis=1``, per group via the opset-21 ``block_size``);
- MX activations: one ``MXQuantizeDequantize`` (axis -1) per distinct input, shared by the linears reading it
  (q/k/v, gate/up); ``none`` leaves the tensor float;
- ``int8`` activations (the paper's fixed-point baseline, its Sec. 4 calibration): static, symmetric, one scale
  per input channel ``j`` (the last axis), ``s_j = max_t |x_tj| / 127`` over the calibration tokens
  (``act_scales``, from :func:`static_activation_scales`), standard ``QuantizeLinear`` + ``DequantizeLinear``
  (axis -1, zero point 0), shared like the MX ones.

Weights come from a *weight provider*, ``provider(name, w[K, N]) -> (codes, scales)`` in
``mxonnx.formats.quantize(w, fmt, axis=0)``'s layout: round to nearest here, GPTQ (``mxonnx.gptq``) plugs in the
same way. Weights holding NaN/Inf are refused before any provider sees them.

The functions defining the used (op, format) pairs are added to the model, whose standard opset is raised to 21
(INT4 tensors, ``block_size``) and IR version to 10 (function overloads); the ops of an opset-18 Llama export have
the same semantics at opset 21.
"""

from __future__ import annotations

from typing import Mapping, Protocol, Union

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common

from mxonnx import formats
from mxonnx.config import QuantizeConfig
from mxonnx.errors import InputError
from mxonnx.layer_formats import resolve_formats
from mxonnx.ops import functions, packing, schema
from mxonnx.passes.llama_structure import DecoderBlock, Linear, find_decoder_blocks, find_lm_head
from mxonnx.stats import ActivationStats, group_key


FormatSpec = Union[str, formats.MXFormat, Mapping[str, "str | formats.MXFormat"]]


def format_of(spec: FormatSpec, name: str) -> formats.MXFormat:
    """The format ``spec`` gives the linear ``name``: one format for all, or a mapping by linear name."""
    return formats.parse_format(spec[name] if isinstance(spec, Mapping) else spec)


class WeightProvider(Protocol):
    """Quantizes the float weight ``w [K, N]`` of the linear ``name`` (e.g. "layers.3.q_proj") into
    ``(codes, scales)`` laid out as ``mxonnx.formats.quantize(w, fmt, axis=0)`` returns them."""

    def __call__(self, name: str, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


class RoundToNearest:
    """The RTN weight provider: ``mxonnx.formats.quantize(w, fmt, axis=0)``, ``fmt`` one format or one per linear
    name."""

    def __init__(self, fmt: FormatSpec):
        self.fmt = fmt if isinstance(fmt, Mapping) else formats.parse_format(fmt)

    def __call__(self, name: str, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return formats.quantize(w, format_of(self.fmt, name), axis=0)


def selected_linears(model: ir.Model, lm_head: bool = False) -> list[Linear]:
    """q, k, v, o, gate, up, down of every decoder block, in block order, then lm_head when asked for."""
    blocks = find_decoder_blocks(model)
    linears = [linear for block in blocks for linear in block.linears()]
    head = find_lm_head(model, blocks) if lm_head else None
    return linears + ([head] if head is not None else [])


STATIC_ACTIVATIONS = "int8"  # the only fixed-point activation format: per channel, calibrated range


def check_activation_format(acts: formats.MXFormat) -> None:
    """MX formats, ``none`` and static per-channel ``int8`` are the activation formats a rewrite supports."""
    if acts.kind == "int" and acts.name != STATIC_ACTIVATIONS:
        raise InputError(f"activation format {acts.name!r} is not supported: fixed-point activations are "
                         f"{STATIC_ACTIVATIONS!r} (per channel, calibrated range); or use an MX format or none")


def require_static_scales(acts: FormatSpec, linears: list[Linear],
                          act_scales: Mapping[str, np.ndarray] | None) -> None:
    """For static ``int8`` activations, refuse linears without a calibrated input scale in ``act_scales``."""
    missing = [linear.name for linear in linears
               if format_of(acts, linear.name).kind == "int" and linear.name not in (act_scales or {})]
    if missing:
        raise InputError(f"{format_of(acts, missing[0]).name} activations need a calibrated scale for every linear "
                         f"input; none for {missing[0]}")


def static_int8_scales(peak: np.ndarray) -> np.ndarray:
    """The int8 scale of each channel from its calibrated peak ``max_t |x_tj|``: ``peak_j / 127`` (float32), 1 for a
    channel that was zero on every token."""
    peak = np.asarray(peak).astype(np.float32)
    return np.where(peak > 0, peak / np.float32(127), np.float32(1))


def static_activation_scales(stats: Mapping[str, ActivationStats], blocks: list[DecoderBlock],
                             folded: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Per linear name, the int8 scales ``[K]`` of its input: ``s_j = max_t |x_tj| / 127`` from the calibration
    statistics of its group (``mxonnx.calibrate.group_key``); a channel that was zero on every token gets 1.

    ``folded``: smoothing row scales ``r`` folded into the model after ``stats`` were taken (per group key,
    ``passes.smoothing.folded_rows``); the group's input is then ``x / r``, so its peak is ``max_t |x_tj| / r_j``."""
    folded = folded or {}
    scales = {}
    for block in blocks:
        for group, linears in block.groups().items():
            key = group_key(block, group)
            peak = stats[key].max_abs.astype(np.float64)
            if key in folded:
                peak = peak / folded[key]
            s = static_int8_scales(peak)
            for linear in linears:
                scales[linear.name] = s
    return scales


class MxMatMulPass(ir.passes.InPlacePass):
    """Replace the weight of each of ``linears`` by its dequantized codes and quantize-dequantize its input
    (``int8`` activations: with the scales ``act_scales[linear.name]``). ``weights`` and ``acts``: one format for
    all, or one per linear name (``--override``); linears reading one input in one activation format share its
    quantizer, in different formats each gets its own."""

    def __init__(self, linears: list[Linear], weights: FormatSpec, acts: FormatSpec,
                 provider: WeightProvider, act_scales: Mapping[str, np.ndarray] | None = None):
        super().__init__()
        self.linears = linears
        self.weights = {linear.name: format_of(weights, linear.name) for linear in linears}
        self.acts = {linear.name: format_of(acts, linear.name) for linear in linears}
        for fmt in dict.fromkeys(self.acts.values()):
            check_activation_format(fmt)
        require_static_scales(self.acts, linears, act_scales)
        self.act_scales = act_scales or {}
        self.provider = provider

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        used: set[tuple[str, formats.MXFormat]] = set()
        quantized_inputs: dict[tuple[ir.Value, str], ir.Value] = {}
        for linear in self.linears:
            weights, acts = self.weights[linear.name], self.acts[linear.name]
            if weights.kind != "none":
                weight = self._quantized_weight(graph, linear, weights)
                linear.node.replace_input_with(1, weight)
                if weights.kind == "mx":
                    used.add((schema.DEQUANTIZE, weights))
            if acts.kind != "none":
                x = linear.input
                key = (x, acts.label)
                if key not in quantized_inputs:
                    if acts.kind == "mx":
                        again = any(v is x and f != "int8" for v, f in quantized_inputs)  # x in a second MX format
                        quantized_inputs[key] = insert_quantize_dequantize(graph, x, acts,
                                                                           f".{acts.label}" if again else "")
                        used.add((schema.QUANTIZE_DEQUANTIZE, acts))
                    else:
                        quantized_inputs[key] = _insert_static_int8(graph, x, self.act_scales[linear.name])
                linear.node.replace_input_with(0, quantized_inputs[key])
        add_mx_functions(model, used)
        ir.passes.common.RemoveUnusedNodesPass()(model)
        return ir.passes.PassResult(model, modified=bool(self.linears))

    def _quantized_weight(self, graph: ir.Graph, linear: Linear, fmt: formats.MXFormat) -> ir.Value:
        """The dequantized weight value, produced by a new node inserted before the linear."""
        w = np.asarray(linear.weight_array, np.float32)
        formats.check_finite(w, f"weight of {linear.name}")
        codes, scales = self.provider(linear.name, w)
        codes_value = _initializer(graph, packing.code_tensor(codes, fmt, f"{linear.name}.weight_codes"))
        if fmt.kind == "mx":
            scales_value = _initializer(graph, packing.scale_tensor(scales, fmt, f"{linear.name}.weight_exponents"))
            node = ir.node(schema.DEQUANTIZE, [codes_value, scales_value], domain=schema.DOMAIN,
                           overload=schema.overload(fmt), name=f"{linear.name}/MXDequantize",
                           attributes=schema.format_attributes(fmt, 0))
        else:
            node = _dequantize_linear(graph, linear.name, codes_value, scales, fmt)
        node.outputs[0].name = f"{linear.name}.weight_dequantized"
        graph.insert_before(linear.node, node)
        return node.outputs[0]


def _initializer(graph: ir.Graph, tensor: ir.Tensor) -> ir.Value:
    value = ir.Value(name=tensor.name, shape=tensor.shape, type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def _dequantize_linear(graph: ir.Graph, name: str, codes: ir.Value, scales: np.ndarray,
                       fmt: formats.MXFormat) -> ir.Node:
    """Standard DequantizeLinear of int{d} (per output channel: 1-D scales along axis 1) or int{d}-g{b}
    (per group: scales [ceil(K/b), N], ``block_size`` b along axis 0)."""
    if fmt.block_size is None:
        scale = _initializer(graph, packing.scale_tensor(scales.reshape(-1), fmt, f"{name}.weight_scales"))
        attributes = {"axis": 1}
    else:
        scale = _initializer(graph, packing.scale_tensor(scales, fmt, f"{name}.weight_scales"))
        attributes = {"axis": 0, "block_size": fmt.block_size}
    return ir.node("DequantizeLinear", [codes, scale], attributes=attributes, name=f"{name}/DequantizeLinear")


def insert_quantize_dequantize(graph: ir.Graph, x: ir.Value, fmt: formats.MXFormat, suffix: str = "") -> ir.Value:
    """``MXQuantizeDequantize(x)`` along the last axis, placed right after x's producer (``suffix`` tells the names
    of a second quantizer of x, in another format, apart)."""
    node = ir.node(schema.QUANTIZE_DEQUANTIZE, [x], domain=schema.DOMAIN, overload=schema.overload(fmt),
                   attributes=schema.format_attributes(fmt, -1),
                   name=f"{x.name}/MXQuantizeDequantize{suffix}")
    node.outputs[0].name = f"{x.name}_mxqdq{suffix}"
    node.outputs[0].shape, node.outputs[0].type = x.shape, x.type
    _insert_after_producer(graph, x, [node])
    return node.outputs[0]


def _insert_after_producer(graph: ir.Graph, x: ir.Value, nodes: list[ir.Node]) -> None:
    """Place ``nodes`` right after the node producing ``x`` (first in the graph for a graph input)."""
    producer = x.producer()
    if producer is None:
        graph.insert_before(graph.node(0), nodes)
    else:
        graph.insert_after(producer, nodes)


def _insert_static_int8(graph: ir.Graph, x: ir.Value, scales: np.ndarray) -> ir.Value:
    """``DequantizeLinear(QuantizeLinear(x, s, 0), s, 0)`` along the last axis with int8 codes, right after x's
    producer: ``clip(round_half_even(x_j / s_j), -128, 127) * s_j`` (GPTQ's Hessians see the same pair:
    ``mxonnx.blockwise._append_static_int8``)."""
    scales = np.asarray(scales, np.float32).reshape(-1)
    scale_value = _initializer(graph, ir.tensor(scales, name=f"{x.name}.act_scales"))
    zero_value = _initializer(graph, ir.tensor(np.zeros(scales.shape, np.int8), name=f"{x.name}.act_zero_points"))
    quantize = ir.node("QuantizeLinear", [x, scale_value, zero_value], attributes={"axis": -1},
                       name=f"{x.name}/QuantizeLinear")
    quantize.outputs[0].name = f"{x.name}_int8"
    dequantize = ir.node("DequantizeLinear", [quantize.outputs[0], scale_value, zero_value], attributes={"axis": -1},
                         name=f"{x.name}/DequantizeLinear")
    dequantize.outputs[0].name = f"{x.name}_qdq"
    dequantize.outputs[0].shape, dequantize.outputs[0].type = x.shape, x.type
    _insert_after_producer(graph, x, [quantize, dequantize])
    return dequantize.outputs[0]


def add_mx_functions(model: ir.Model, used: set[tuple[str, formats.MXFormat]]) -> None:
    """Declare the opsets (standard 21, IR 10, the custom domain when ``used``) and add the function of every
    ``(op, format)`` in ``used`` that the model does not hold yet. A pre-scaled format needs the body taking
    ``prescale``: it replaces a plain one already there (with p = 1 it computes the same)."""
    _declare_opsets(model, with_domain=bool(used))
    prescaled: dict[tuple[str, str], bool] = {}
    for op_type, fmt in used:
        prescaled[op_type, fmt.name] = prescaled.get((op_type, fmt.name), False) or fmt.prescaled
    for (op_type, name), with_prescale in sorted(prescaled.items()):
        proto = functions.function_proto(op_type, name, prescaled=with_prescale)
        function = ir.serde.deserialize_function(proto)
        held = model.functions.get(function.identifier())
        if held is None or (with_prescale and schema.PRESCALE_ATTR not in held.attributes):
            model.functions[function.identifier()] = function


def _declare_opsets(model: ir.Model, with_domain: bool) -> None:
    model.ir_version = max(model.ir_version or 0, schema.IR_VERSION)
    if model.graph.opset_imports.get("", 0) < schema.STANDARD_OPSET:
        model.graph.opset_imports[""] = schema.STANDARD_OPSET
    if with_domain:
        model.graph.opset_imports[schema.DOMAIN] = schema.DOMAIN_VERSION


def rewrite_mx_matmuls(model: ir.Model, config: QuantizeConfig, provider: WeightProvider | None = None,
                       act_scales: Mapping[str, np.ndarray] | None = None) -> ir.Model:
    """The pass ``model, config -> model``: quantize the linears ``config`` selects with ``config.weights`` and
    ``config.acts`` and its ``overrides``; weights from ``provider`` (default round to nearest), int8 activation scales from
    ``act_scales`` (linear name -> scales [K]). Modifies ``model`` in place."""
    linears = selected_linears(model, config.quantizes_lm_head)
    chosen = resolve_formats([linear.name for linear in linears], config.weights, config.acts, config.linear_overrides)
    weights = {name: f.weights for name, f in chosen.items()}
    acts = {name: f.acts for name, f in chosen.items()}
    MxMatMulPass(linears, weights, acts, provider or RoundToNearest(weights), act_scales)(model)
    return model
