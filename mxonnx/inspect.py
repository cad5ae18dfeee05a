"""``mxonnx inspect``: what a model folder holds, read from the graph without loading weight data.

A *quantized* MatMul reads its weight from ``com.mxonnx.MXDequantize`` or a standard ``DequantizeLinear`` of
initializers; a *float* MatMul reads a float initializer (also through Identity/Transpose, e.g. a tied lm_head, and
Cast, e.g. a weight stored in float16 or bfloat16 by ``mxonnx export --dtype``).
``bits_per_weight`` = stored bits of the quantized decoder weights (codes + exponents or scales, as laid out on
disk) / number of weights; MXINT4 with blocks of 128 gives 4 + 8/128 = 4.0625. A quantized lm_head is listed in
``linears`` with its own figure but left out of that average (as out of ``--target-bits``' budget).
An ``MXQuantizeDequantize`` read only as the input A of MatMuls quantizes activations; one read otherwise (by the
``present`` Concat of the KV cache, or by the attention in a graph without past) quantizes keys or values entering
the KV cache (``mxonnx quantize --kv``): ``kv_cache`` counts those by format. ``rotation``: the blocks of
``mxonnx quantize --rotate`` and its online ``BlockHadamard`` nodes, or None.
Pre-scaled MX formats (``prescale`` attribute p, ``mxonnx.formats``) keep their format names; a model holding any
gets ``weights_prescale`` / ``acts_prescale`` on its linears (p, 1 for none) and ``prescales``: per side the number
of pre-scaled quantizers and the least and largest p (the values carry the factor 1 / p).
"""

from __future__ import annotations

import collections
import json
import re
from pathlib import Path

import onnx

from mxonnx.modelio import resolve_model
from mxonnx.ops import schema

_WEIGHT_DEQUANTIZERS = {(schema.DOMAIN, schema.DEQUANTIZE), ("", "DequantizeLinear")}
_PASS_THROUGH = ("Identity", "Transpose", "Cast")
_OPTIMUM_LINEAR = re.compile(r"/model/layers\.(\d+)/(?:self_attn|mlp)/(\w+_proj)/MatMul$")  # an exported linear's node
ROLE_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def stored_bytes(tensor: onnx.TensorProto) -> int:
    """Bytes of ``tensor``'s data as stored (in its external file or in the proto), read without loading it."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        return int({e.key: e.value for e in tensor.external_data}["length"])
    if tensor.raw_data:
        return len(tensor.raw_data)
    return onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize * _numel(tensor)  # typed fields


def _numel(tensor: onnx.TensorProto) -> int:
    count = 1
    for d in tensor.dims:
        count *= d
    return count


def _file_bytes(onnx_path: Path, model: onnx.ModelProto) -> int:
    locations = {e.value for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
                 for e in t.external_data if e.key == "location"}
    return onnx_path.stat().st_size + sum((onnx_path.parent / loc).stat().st_size for loc in locations)


def _format_attribute(node: onnx.NodeProto) -> str:
    return next(a.s.decode() for a in node.attribute if a.name == schema.FORMAT_ATTR)


def _prescale(node: onnx.NodeProto | None) -> float:
    """The ``prescale`` attribute of a domain node (1 when absent or not a domain node)."""
    if node is None or node.domain != schema.DOMAIN:
        return 1.0
    return next((a.f for a in node.attribute if a.name == schema.PRESCALE_ATTR), 1.0)


def _prescale_summary(values: list[float]) -> dict:
    scaled = [p for p in values if p != 1.0]
    return {"count": len(scaled), "min": min(scaled), "max": max(scaled)} if scaled else {"count": 0}


def _weight_format(node: onnx.NodeProto, codes: onnx.TensorProto) -> str:
    """The format a weight dequantizer applies: its ``format`` attribute, or for DequantizeLinear int{storage
    bits} with ``-g{block_size}`` when blocked."""
    if node.domain == schema.DOMAIN:
        return _format_attribute(node)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    bits = 4 if codes.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4) else 8
    return f"int{bits}" + (f"-g{attrs['block_size']}" if attrs.get("block_size") else "")


def _linear_name(matmul: onnx.NodeProto, dequantizer: onnx.NodeProto | None) -> str:
    """The structure pass's name of a linear (``layers.3.down_proj``, ``lm_head``): from its weight dequantizer
    (``layers.3.down_proj/MXDequantize``), else from optimum's node name, else the MatMul's own name."""
    if dequantizer is not None and "/" in dequantizer.name and not dequantizer.name.startswith("/"):
        return dequantizer.name.split("/")[0]
    found = _OPTIMUM_LINEAR.search(matmul.name)
    if found:
        return f"layers.{found.group(1)}.{found.group(2)}"
    return "lm_head" if matmul.name.startswith("/lm_head/") else matmul.name


def _act_format(x: str, producers: dict, initializers: dict) -> str:
    """The activation format of a MatMul input: MXQuantizeDequantize's ``format``, ``int8`` for a static
    QuantizeLinear/DequantizeLinear pair, else ``none``."""
    node = producers.get(x)
    if node is None:
        return "none"
    if node.domain == schema.DOMAIN and node.op_type == schema.QUANTIZE_DEQUANTIZE:
        return _format_attribute(node)
    if node.op_type == "DequantizeLinear" and node.domain in ("", "ai.onnx"):
        source = producers.get(node.input[0])
        if source is not None and source.op_type == "QuantizeLinear" and len(source.input) == 3:
            zero = initializers.get(source.input[2])
            if zero is not None and zero.data_type == onnx.TensorProto.INT8:
                return "int8"
    return "none"


def inspect_model(path: Path) -> dict:
    """``{opset, custom_ops, quantized_matmuls, float_matmuls, bits_per_weight, file_bytes, formats, linears,
    kv_cache}`` of the model at ``path`` (folder or .onnx). ``formats`` counts weight and activation formats;
    ``linears`` lists every MatMul with a constant weight: ``{name, weights, acts, bits_per_weight, weights_count}``
    (float ones with weights ``none`` and their storage bits); ``bits_per_weight`` is the quantized decoder linears' average
    weighted by their weight counts (lm_head left out); ``kv_cache`` the formats of the key and value quantizers (``{}``: the cache
    holds floats)."""
    paths = resolve_model(path)
    model = onnx.load(str(paths.onnx), load_external_data=False)
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    readers = collections.defaultdict(list)
    for node in graph.node:
        for index, name in enumerate(node.input):
            readers[name].append((node, index))

    def reads_as_matmul_input(name: str) -> bool:
        return all(node.op_type == "MatMul" and node.domain in ("", "ai.onnx") and index == 0
                   for node, index in readers[name])

    def constant(name: str) -> onnx.TensorProto | None:
        while name not in initializers and name in producers and producers[name].op_type in _PASS_THROUGH:
            name = producers[name].input[0]
        return initializers.get(name)

    quantized = floating = weights = stored_bits = 0
    weight_formats, act_formats, kv_formats = collections.Counter(), collections.Counter(), collections.Counter()
    linears = []
    prescales = {"weights": [], "acts": []}
    for node in graph.node:
        if node.domain == schema.DOMAIN and node.op_type == schema.QUANTIZE_DEQUANTIZE:
            counter = act_formats if reads_as_matmul_input(node.output[0]) else kv_formats
            counter[_format_attribute(node)] += 1
            if counter is act_formats:
                prescales["acts"].append(_prescale(node))
        if node.op_type == "QuantizeLinear" and node.domain in ("", "ai.onnx") and len(node.input) == 3:
            scale, zero = initializers.get(node.input[1]), initializers.get(node.input[2])
            if scale is not None and zero is not None and zero.data_type == onnx.TensorProto.INT8:
                act_formats["int8"] += 1  # static int8 (calibrated scales)
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            continue
        producer = producers.get(node.input[1])
        inputs = [initializers.get(name) for name in producer.input] if producer is not None else []
        if producer is not None and (producer.domain, producer.op_type) in _WEIGHT_DEQUANTIZERS and all(inputs):
            quantized += 1
            count, bits = _numel(inputs[0]), 8 * sum(stored_bytes(t) for t in inputs)
            if _linear_name(node, producer) != "lm_head":  # the average is the decoder's, as --target-bits'
                weights += count
                stored_bits += bits
            fmt = _weight_format(producer, inputs[0])
            weight_formats[fmt] += 1
            prescales["weights"].append(_prescale(producer))
            linears.append({"name": _linear_name(node, producer), "weights": fmt,
                            "acts": _act_format(node.input[0], producers, initializers),
                            "bits_per_weight": bits / count, "weights_count": count,
                            "weights_prescale": _prescale(producer),
                            "acts_prescale": _prescale(producers.get(node.input[0]))})
        elif (weight := constant(node.input[1])) is not None and len(weight.dims) == 2:
            floating += 1
            linears.append({"name": _linear_name(node, None), "weights": "none",
                            "acts": _act_format(node.input[0], producers, initializers),
                            "bits_per_weight": 8 * stored_bytes(weight) / _numel(weight),
                            "weights_count": _numel(weight)})
    summary = {side: _prescale_summary(values) for side, values in prescales.items()}
    if any(d["count"] for d in summary.values()):
        extra = {"prescales": summary}
    else:  # no pre-scale: the report of a plain model, unchanged
        extra = {}
        for linear in linears:
            linear.pop("weights_prescale", None)
            linear.pop("acts_prescale", None)
    return {
        "opset": {(o.domain or "ai.onnx"): o.version for o in model.opset_import},
        "custom_ops": dict(collections.Counter(f"{n.domain}.{n.op_type}" for n in graph.node
                                               if n.domain not in ("", "ai.onnx"))),
        "quantized_matmuls": quantized,
        "float_matmuls": floating,
        "bits_per_weight": stored_bits / weights if weights else None,
        "file_bytes": _file_bytes(paths.onnx, model),
        "formats": {"weights": dict(weight_formats), "acts": dict(act_formats)},
        "linears": linears,
        "kv_cache": dict(kv_formats),
        "rotation": _rotation(model),
        **extra,
    }


def _rotation(model: onnx.ModelProto) -> dict | None:
    """``--rotate``'s blocks ``{block, residual, head, down}`` (the metadata ``mxonnx.rotation``) and ``online``,
    the number of ``BlockHadamard`` nodes; None for a model that is not rotated."""
    recorded = next((p.value for p in model.metadata_props if p.key == schema.ROTATION_METADATA), None)
    if recorded is None:
        return None
    online = sum(1 for n in model.graph.node if n.domain == schema.DOMAIN and n.op_type == schema.BLOCK_HADAMARD)
    return {**json.loads(recorded), "online": online}


def _layer_rows(linears: list[dict]) -> tuple[list[str], list[tuple[str, list[str]]], list[dict], str]:
    """The decoder linears as a table: the roles present, and per run of consecutive layers with the same formats
    ``("layers 0-29", [cell per role])``, a cell ``weights`` or ``weights/acts`` when the acts differ from the most
    common ones of the quantized linears; the linears that are not ``layers.{i}.{role}`` come back as they are."""
    layered: dict[int, dict[str, dict]] = collections.defaultdict(dict)
    others = []
    for linear in linears:
        parts = linear["name"].split(".")
        if len(parts) == 3 and parts[0] == "layers" and parts[1].isdigit() and parts[2] in ROLE_ORDER:
            layered[int(parts[1])][parts[2]] = linear
        else:
            others.append(linear)
    common = collections.Counter(l["acts"] for l in linears if l["weights"] != "none").most_common(1)
    usual = common[0][0] if common else "none"
    roles = [r for r in ROLE_ORDER if any(r in row for row in layered.values())]

    def cell(linear: dict | None) -> str:
        if linear is None:
            return "-"
        return linear["weights"] if linear["acts"] == usual else f"{linear['weights']}/{linear['acts']}"

    runs: list[tuple[int, int, list[str]]] = []
    for index in sorted(layered):
        cells = [cell(layered[index].get(role)) for role in roles]
        if runs and runs[-1][2] == cells and runs[-1][1] == index - 1:
            runs[-1] = (runs[-1][0], index, cells)
        else:
            runs.append((index, index, cells))
    rows = [(f"layer {a}" if a == b else f"layers {a}-{b}", cells) for a, b, cells in runs]
    return roles, rows, others, usual


def format_linears(linears: list[dict]) -> str:
    """The per-linear formats as a compact table: one row per run of layers with equal formats, one column per
    projection (weight format; ``weights/acts`` where the acts differ from the usual ones), then lm_head and
    any other linear."""
    roles, rows, others, usual = _layer_rows(linears)
    lines = []
    if rows:
        header = ["", *[r.removesuffix("_proj") for r in roles]]
        table = [header, *[[label, *cells] for label, cells in rows]]
        widths = [max(len(row[i]) for row in table) for i in range(len(header))]
        lines += ["  ".join(f"{value:<{widths[i]}}" for i, value in enumerate(row)).rstrip() for row in table]
    lines += [f"{l['name']}  {l['weights']}/{l['acts']}" for l in others]
    lines.append(f"(activations {usual} unless shown as weights/acts)")
    return "\n".join(lines)


def format_inspection(d: dict) -> str:
    """A human-readable table of ``inspect_model``'s result."""
    bits = "-" if d["bits_per_weight"] is None else f"{d['bits_per_weight']:.4f}"
    rows = [
        ("opset", ", ".join(f"{domain} {version}" for domain, version in d["opset"].items())),
        ("custom ops", ", ".join(f"{op} x{n}" for op, n in d["custom_ops"].items()) or "none"),
        ("quantized MatMuls", str(d["quantized_matmuls"])),
        ("float MatMuls", str(d["float_matmuls"])),
        ("weight formats", ", ".join(f"{f} x{n}" for f, n in d["formats"]["weights"].items()) or "none"),
        ("activation formats", ", ".join(f"{f} x{n}" for f, n in d["formats"]["acts"].items()) or "none"),
        ("KV cache", ", ".join(f"{f} x{n}" for f, n in d["kv_cache"].items()) or "none"),
        ("rotation", "none" if not (r := d.get("rotation")) else
         f"block Hadamard {r['block']} (residual {r['residual']}, heads {r['head']}, down_proj {r['down']} online x{r['online']})"),
        ("bits per weight", bits),
        ("file size", f"{d['file_bytes'] / 2**20:.1f} MiB ({d['file_bytes']} bytes)"),
    ]
    for side, summary in d.get("prescales", {}).items():
        if summary["count"]:
            p = (f"p = {summary['min']:.6g}" if summary["min"] == summary["max"]
                 else f"p in {summary['min']:.6g}..{summary['max']:.6g}")
            rows.append((f"{side} pre-scale", f"{p} on {summary['count']} (values times 1/p)"))
    width = max(len(name) for name, _ in rows)
    text = "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
    if d.get("linears"):
        text += "\n\nformats per linear (weights, per decoder layer):\n" + format_linears(d["linears"])
    return text
