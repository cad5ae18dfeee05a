"""The L-layer ONNX graph built from optimum's export of a small copy of the model, the weights streamed in after.

1. *Template*: the source's causal LM class (``mxonnx.architectures``) with its config but ``min(L, 2)`` layers,
   ``TEMPLATE_VOCAB`` tokens and ``TEMPLATE_INTERMEDIATE`` MLP channels (vocabulary and MLP width only size weights:
   no constant of the graph depends on them), every parameter filled with distinct seeded random numbers, is exported by optimum.
2. *Weights by value*: each float initializer of the template export is matched to the parameter whose values it holds,
   as is or transposed (optimum stores ``q_proj.weight`` [N, K] as ``onnx::MatMul_123`` [K, N]); every parameter must be
   found. Matched initializers are renamed ``<param>`` or ``<param>_transposed`` and lose their data.
3. *Layers by topology*: the last template block's own nodes are those on a path from its residual input (the output
   of the residual Add after block 0's down_proj) or its KV-cache inputs to its residual output or present outputs,
   plus the constants and helpers only they read. Layers 2..L-1 are copies of them with renamed nodes and values
   (``/model/layers.1/...`` -> ``/model/layers.k/...``), their own ``past_key_values.k.*`` / ``present.k.*`` and
   initializers of ``model.layers.k.*``; nodes after the last block (final norm, lm_head) read the last copy.
4. *Storage dtype*: float16/bfloat16 weights are stored as such, each read through one ``Cast(to=FLOAT)``, so the
   graph computes in float32 exactly as the float32 export does.

:func:`write_weights` then writes every weight, one checkpoint tensor at a time, into ``model.onnx_data``.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import re
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx

TEMPLATE_LAYERS = 2
TEMPLATE_VOCAB = 24
TEMPLATE_INTERMEDIATE = 16
DTYPES = {"float32": onnx.TensorProto.FLOAT, "float16": onnx.TensorProto.FLOAT16,
          "bfloat16": onnx.TensorProto.BFLOAT16}
WRITE_CHUNK_BYTES = 64 << 20  # a transposed weight is converted and written this many bytes at a time
ALIGN_LARGE, LARGE_TENSOR = 65536, 1 << 20  # tensors of 1 MiB and more start at multiples of 64 KiB
_PER_LAYER_IO = re.compile(r"^(past_key_values|present)\.(\d+)\.(key|value)$")


@dataclasses.dataclass(frozen=True)
class Weight:
    """The checkpoint parameter an initializer holds (``transposed``: it holds param.T)."""

    param: str
    transposed: bool


@dataclasses.dataclass
class Template:
    """optimum's export of the small model, weights without data, and where its last decoder block is."""

    model: onnx.ModelProto
    weights: dict[str, Weight]  # initializer name -> parameter
    layers: int
    block_nodes: list[int]  # indices (graph order) of the last block's own nodes
    tail_nodes: list[int]  # nodes reading the last block's output, directly or not (final norm, lm_head)
    block_input: str  # the residual stream entering the last block
    block_output: str  # and leaving it


def template_config(config, layers: int):
    """``config`` with ``layers`` decoder layers and the small vocabulary and MLP width of the template."""
    cfg = copy.deepcopy(config)
    cfg.num_hidden_layers, cfg.vocab_size, cfg.intermediate_size = layers, TEMPLATE_VOCAB, TEMPLATE_INTERMEDIATE
    cfg.pad_token_id = None  # an embedding's padding index must lie inside the small vocabulary
    return cfg


def export_template(config, past: bool, folder: Path) -> Template:
    """Export the template of ``config`` with optimum into ``folder`` (removed afterwards) and analyse it."""
    import torch
    from optimum.exporters.onnx import onnx_export_from_model

    from mxonnx.architectures import causal_lm_class

    layers = min(config.num_hidden_layers, TEMPLATE_LAYERS)
    cfg = template_config(config, layers)
    cfg.use_cache = past
    model = causal_lm_class(cfg)(cfg).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-1.0, 1.0, generator=generator)
    try:
        onnx_export_from_model(model, folder, task="text-generation-with-past" if past else "text-generation",
                               do_validation=False)
        proto = onnx.load(str(folder / "model.onnx"))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    weights = match_weights(proto.graph, model)
    del model
    block_input, block_output = _residual_stream(proto, layers)
    for t in proto.graph.initializer:
        if t.name in weights:
            t.ClearField("raw_data")
            t.ClearField("float_data")
    block, tail = _block_nodes(proto.graph, layers - 1, block_input, block_output) if layers > 1 else ([], [])
    return Template(proto, weights, layers, block, tail, block_input, block_output)


def _digest(array: np.ndarray) -> tuple:
    return array.shape, array.dtype.str, hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def match_weights(graph: onnx.GraphProto, model) -> dict[str, Weight]:
    """Initializer name -> the parameter of ``model`` whose values it holds, as is or transposed. Raises when a
    parameter is held by no initializer or two parameters have the same values (the match would be ambiguous)."""
    from onnx import numpy_helper

    by_digest: dict[tuple, Weight] = {}
    params = []
    for name, p in model.named_parameters():  # tied parameters once
        params.append(name)
        a = p.detach().numpy()
        for key, weight in [(_digest(a), Weight(name, False))] + ([(_digest(a.T), Weight(name, True))] if a.ndim == 2 else []):
            if key in by_digest:
                raise RuntimeError(f"template export: {name} and {by_digest[key].param} hold the same values")
            by_digest[key] = weight
    found = {}
    for t in graph.initializer:
        if t.data_type == onnx.TensorProto.FLOAT:
            weight = by_digest.get(_digest(numpy_helper.to_array(t)))
            if weight is not None:
                found[t.name] = weight
    missing = sorted(set(params) - {w.param for w in found.values()})
    if missing:
        raise RuntimeError(f"template export: no initializer holds {', '.join(missing)}")
    return found


def _residual_stream(proto: onnx.ModelProto, layers: int) -> tuple[str, str]:
    """Names of the residual stream entering and leaving the last decoder block: the outputs of the residual Adds
    after the down_proj of the last two blocks (found by ``find_decoder_blocks``)."""
    import onnx_ir as ir

    from mxonnx.passes.llama_structure import find_decoder_blocks

    blocks = find_decoder_blocks(ir.from_proto(proto))
    if len(blocks) != layers:
        raise RuntimeError(f"template export: found {len(blocks)} decoder blocks, expected {layers}")

    def after(block) -> str:
        adds = [n for n in block.down.output.consumers() if n.op_type == "Add"]
        if len(adds) != 1:
            raise RuntimeError(f"template export: no residual Add after the down_proj of block {block.index}")
        return adds[0].outputs[0].name

    return (after(blocks[-2]) if layers > 1 else ""), after(blocks[-1])


def _block_nodes(graph: onnx.GraphProto, index: int, block_input: str, block_output: str) -> tuple[list[int], list[int]]:
    """(the nodes of decoder block ``index`` of its own, the nodes after it), as indices in graph order."""
    nodes = graph.node
    producer = {out: i for i, n in enumerate(nodes) for out in n.output}
    consumers = defaultdict(list)
    for i, n in enumerate(nodes):
        for name in n.input:
            consumers[name].append(i)
    per_layer = {v.name for v in list(graph.input) + list(graph.output)
                 if (m := _PER_LAYER_IO.match(v.name)) and int(m.group(2)) == index}
    starts = [block_input] + [name for name in per_layer if name not in producer]
    ends = [block_output] + [name for name in per_layer if name in producer]
    forward, stack = set(), [i for name in starts for i in consumers[name]]
    while stack:
        i = stack.pop()
        if i not in forward:
            forward.add(i)
            stack.extend(j for out in nodes[i].output for j in consumers[out])
    def upstream(names) -> set[int]:
        found, stack = set(), [producer[name] for name in names if name in producer]
        while stack:
            i = stack.pop()
            if i not in found:
                found.add(i)
                stack.extend(producer[name] for name in nodes[i].input if name in producer)
        return found

    own = forward & upstream(ends)
    before = upstream([block_input])  # the earlier blocks and what they share with this one
    outputs = {o.name for o in graph.output}
    for i in reversed(range(len(nodes))):  # constants and helpers read by this block alone are its own
        uses = [j for out in nodes[i].output for j in consumers[out]]
        if i not in own and i not in forward and i not in before and uses and all(j in own for j in uses) \
                and not any(out in outputs for out in nodes[i].output):
            own.add(i)
    tail, stack = set(), [j for i in own for out in nodes[i].output for j in consumers[out] if j not in own]
    while stack:
        i = stack.pop()
        if i not in tail:
            tail.add(i)
            stack.extend(j for out in nodes[i].output for j in consumers[out])
    leaving = {out for i in own for out in nodes[i].output if any(j not in own for j in consumers[out])}
    if leaving - {block_output} or tail & own or any(j not in own for j in consumers[block_input]):
        raise RuntimeError(f"template export: decoder block {index} is not self-contained "
                           f"(values {sorted(leaving - {block_output})[:3]} are read outside it)")
    return sorted(own), sorted(tail)


class _Names:
    """Unique names: ``take(name)`` returns ``name`` or ``name_<n>`` not taken before."""

    def __init__(self, taken):
        self.taken = set(taken)

    def take(self, name: str) -> str:
        base, n = name, 1
        while name in self.taken:
            name, n = f"{base}_{n}", n + 1
        self.taken.add(name)
        return name


def _layer_name(name: str, source: int, k: int) -> str:
    """The name in layer ``k`` of a name of layer ``source`` (optimum's ``/model/layers.<i>/`` scope, else prefixed)."""
    m = _PER_LAYER_IO.match(name)
    if m:
        return f"{m.group(1)}.{k}.{m.group(3)}"
    scope = f"/layers.{source}/"
    return name.replace(scope, f"/layers.{k}/") if scope in name else f"/model/layers.{k}/{name}"


def _layer_param(param: str, source: int, k: int) -> str:
    prefix = f"model.layers.{source}."
    if not param.startswith(prefix):
        raise RuntimeError(f"template export: decoder block {source} reads {param}, not one of its own parameters")
    return f"model.layers.{k}." + param[len(prefix):]


def build_model(template: Template, layers: int, shapes: dict[str, tuple[int, ...]], vocab_size: int,
                dtype: str = "float32") -> tuple[onnx.ModelProto, dict[str, Weight]]:
    """The ``layers``-layer model: the template with its last block copied for layers ``template.layers..layers-1``;
    weight initializers get the real shapes (``shapes``: parameter -> shape) and no data. Returns the model (its
    graph in topological order) and its weights (initializer name -> parameter)."""
    if layers < template.layers or (layers > template.layers and template.layers < 2):
        raise ValueError(f"a {template.layers}-layer template cannot make {layers} layers")
    model = copy.deepcopy(template.model)
    graph = model.graph
    weights = dict(template.weights)
    nodes = list(graph.node)
    source = template.layers - 1
    block, tail = set(template.block_nodes), set(template.tail_nodes)
    initializers = {t.name: t for t in graph.initializer}
    readers = defaultdict(set)
    for i, n in enumerate(nodes):
        for name in n.input:
            readers[name].add(i)
    own_inits = [name for name in initializers if readers[name] and readers[name] <= block]
    values = _Names([v for n in nodes for v in list(n.input) + list(n.output)] + [v.name for v in graph.input])
    node_names = _Names(n.name for n in nodes)
    inputs = {v.name: v for v in graph.input}
    outputs = {v.name: v for v in graph.output}
    copies, new_inits, new_inputs, new_outputs = [], [], [], []
    previous_output = template.block_output
    for k in range(template.layers, layers):
        rename = {template.block_input: previous_output}
        for name in own_inits:
            t = onnx.TensorProto()
            t.CopyFrom(initializers[name])
            t.name = rename[name] = values.take(_layer_name(name, source, k))
            if name in weights:
                weights[t.name] = Weight(_layer_param(weights[name].param, source, k), weights[name].transposed)
            new_inits.append(t)
        for i in template.block_nodes:
            for out in nodes[i].output:
                if out:
                    rename[out] = values.take(_layer_name(out, source, k))
        for name in inputs:
            if (m := _PER_LAYER_IO.match(name)) and int(m.group(2)) == source:
                rename[name] = _layer_name(name, source, k)
                v = copy.deepcopy(inputs[name])
                v.name = rename[name]
                new_inputs.append(v)
        for name in outputs:
            if (m := _PER_LAYER_IO.match(name)) and int(m.group(2)) == source:
                v = copy.deepcopy(outputs[name])
                v.name = rename[name]
                new_outputs.append(v)
        for i in template.block_nodes:
            n = copy.deepcopy(nodes[i])
            n.name = node_names.take(_layer_name(n.name, source, k)) if n.name else ""
            n.input[:] = [rename.get(name, name) for name in n.input]
            n.output[:] = [rename.get(name, name) for name in n.output]
            copies.append(n)
        previous_output = rename[template.block_output]
    for i in template.tail_nodes:
        nodes[i].input[:] = [previous_output if name == template.block_output else name for name in nodes[i].input]
    _replace(graph.node, [n for i, n in enumerate(nodes) if i not in tail] + copies + [nodes[i] for i in sorted(tail)])
    graph.initializer.extend(new_inits)
    _insert_after_last(graph.input, new_inputs)
    _insert_after_last(graph.output, new_outputs)
    weights = _name_weights(graph, weights, shapes)
    del graph.value_info[:]
    for v in graph.output:
        if v.name == "logits":
            v.type.tensor_type.shape.dim[-1].dim_value = vocab_size
    if dtype != "float32":
        store_weights_as(graph, weights, DTYPES[dtype])
    _check_order(graph)
    return model, weights


def _insert_after_last(values, new) -> None:
    """Insert ``new`` value infos after the last per-layer one of ``values`` (the KV-cache inputs or outputs)."""
    if not new:
        return
    items = list(values)
    last = max(i for i, v in enumerate(items) if _PER_LAYER_IO.match(v.name))
    items[last + 1:last + 1] = new
    _replace(values, items)


def _name_weights(graph: onnx.GraphProto, weights: dict[str, Weight], shapes) -> dict[str, Weight]:
    """Rename weight initializers ``<param>`` / ``<param>_transposed`` and give them their real shapes."""
    others = _Names([t.name for t in graph.initializer if t.name not in weights] + [o for n in graph.node for o in n.output]
                    + [v.name for v in graph.input])
    rename, named = {}, {}
    for t in graph.initializer:
        if t.name in weights:
            w = weights[t.name]
            rename[t.name] = t.name = others.take(w.param + ("_transposed" if w.transposed else ""))
            shape = tuple(shapes[w.param])
            t.dims[:] = shape[::-1] if w.transposed else shape
            named[t.name] = w
    for n in graph.node:
        n.input[:] = [rename.get(name, name) for name in n.input]
    return named


def store_weights_as(graph: onnx.GraphProto, weights: dict[str, Weight], data_type: int) -> None:
    """Declare every weight initializer of ``graph`` as ``data_type`` (data written later) and have its readers read
    ``Cast(to=FLOAT)`` of it, one Cast per weight placed before its first reader."""
    cast_of = {}
    for t in graph.initializer:
        if t.name in weights:
            t.data_type = data_type
            cast_of[t.name] = f"{t.name}_float32"
    nodes, done = [], set()
    for n in graph.node:
        for name in n.input:
            if name in cast_of and name not in done:
                done.add(name)
                nodes.append(onnx.helper.make_node("Cast", [name], [cast_of[name]], name=f"{name}_Cast",
                                                   to=onnx.TensorProto.FLOAT))
        n.input[:] = [cast_of.get(name, name) for name in n.input]
        nodes.append(n)
    _replace(graph.node, nodes)


def _check_order(graph: onnx.GraphProto) -> None:
    """Raise unless every node input is a graph input, an initializer or the output of an earlier node."""
    known = {v.name for v in graph.input} | {t.name for t in graph.initializer} | {""}
    for n in graph.node:
        missing = [name for name in n.input if name not in known]
        if missing:
            raise RuntimeError(f"built graph: node {n.name!r} reads {missing[0]!r} before it is computed")
        known.update(n.output)


def _point_to(t: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    """Make ``t`` read its data from ``location`` (beside the model) at ``offset``, ``length`` bytes."""
    del t.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    t.data_location = onnx.TensorProto.EXTERNAL


def point_like(graph: onnx.GraphProto, written: onnx.GraphProto) -> None:
    """Point every data-less initializer of ``graph`` at the external data of the same-named one in ``written``."""
    external = {t.name: t for t in written.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    for t in graph.initializer:
        if t.name in external:
            del t.external_data[:]
            t.external_data.extend(external[t.name].external_data)
            t.data_location = onnx.TensorProto.EXTERNAL


def _replace(field, items) -> None:
    """Make the repeated message ``field`` hold copies of ``items`` (which may be its own elements)."""
    copies = []
    for item in items:
        c = type(item)()
        c.CopyFrom(item)
        copies.append(c)
    del field[:]
    field.extend(copies)


def _tensor_bytes(tensor) -> memoryview:
    import torch

    return memoryview(tensor.contiguous().view(-1).view(torch.uint8).numpy())


def write_weights(graph: onnx.GraphProto, weights: dict[str, Weight], source, path: Path, progress=None) -> None:
    """Write the data of every weight initializer of ``graph`` into the file ``path``, reading one checkpoint tensor
    at a time from ``source`` (``mxonnx.checkpoint.TensorSource``): transposed, converted to the initializer's data
    type ``WRITE_CHUNK_BYTES`` at a time, and pointed to by the initializer as external data."""
    import torch

    from mxonnx.errors import InputError

    torch_dtype = {onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.FLOAT16: torch.float16,
                   onnx.TensorProto.BFLOAT16: torch.bfloat16}
    offset = 0
    with open(path, "wb") as f:
        for t in graph.initializer:
            if t.name not in weights:
                continue
            w = weights[t.name]
            tensor = source.read(w.param)
            view = tensor.t() if w.transposed else tensor
            if tuple(view.shape) != tuple(t.dims):
                raise InputError(f"{source.where}: tensor {w.param!r} has shape {list(tensor.shape)}, the config "
                                 f"expects {list(t.dims)[::-1] if w.transposed else list(t.dims)}")
            dtype = torch_dtype[t.data_type]
            length = view.numel() * dtype.itemsize
            align = ALIGN_LARGE if length >= LARGE_TENSOR else 64
            pad = -offset % align
            f.write(b"\0" * pad)
            offset += pad
            rows = max(1, WRITE_CHUNK_BYTES // max(1, (view.numel() // max(1, view.shape[0])) * dtype.itemsize))
            for start in range(0, max(1, view.shape[0]), rows):
                f.write(_tensor_bytes(view[start:start + rows].to(dtype)))
            del tensor, view
            _point_to(t, path.name, offset, length)
            offset += length
            if progress is not None:
                progress.update()
