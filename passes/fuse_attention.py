"""Fuse each decoder block's attention of an optimum Llama graph into onnxruntime's contrib ops, for inference:

    q = RotaryEmbedding(Q, position_ids, cos_cache, sin_cache; num_heads=H)
    k = RotaryEmbedding(K, position_ids, cos_cache, sin_cache; num_heads=KV)   [-> MXQuantizeDequantize(k)]
    v = V                                                                       [-> MXQuantizeDequantize(v)]
    O, present.N.key, present.N.value = GroupQueryAttention(q, k, v, past.N.key, past.N.value, seqlens_k, T,
                                                            attention_bias=B; causal=0, scale=c_q c_k)

or, for sessions with the native library (``native``), ``com.mxonnx.GroupAttention(q, k, v, past.N.key, past.N.value,
B; num_heads=H, kv_num_heads=KV, scale=c_q c_k)`` in place of GroupQueryAttention (``mxonnx.ops.attention``: the
same attention, its ONNX function body added to the model; an empty past ``[batch, KV, 0, head_dim]`` for graphs
without one), which applies the export's guard itself; a graph without the guard keeps GroupQueryAttention.

replacing what the export spells out: the head split (Reshape, Transpose), ``q cos + rotate_half(q) sin`` on q
and k, ``present = Concat(past, new)``, repeat_kv (Unsqueeze, Expand, Reshape), ``softmax((q c_q)(k^T c_k) + B) v``
(with its IsNaN guard), and the head merge; the export's guard ``Where(IsNaN(w), 0, w)`` on the softmax weights ``w`` becomes the same
guard on O (a query row whose keys are all masked by ``-inf``, a left-padded position, gets NaN weights, so output
0, in both). Q, K, V (``[batch, seq, heads * head_dim]``) are the projections'
outputs, O replaces the o_proj input, and ``B`` is the block's own additive mask ``[batch, 1, seq, T]`` (causal,
padding and any sliding window as the export computes them), so GroupQueryAttention runs with ``causal=0`` and
masks nothing itself; ``seqlens_k = T - 1`` for every batch entry, T the mask's last dim (no padding is told to
the op: the mask carries it).

Exactness: the same operations in another order. The rotary caches are the graph's own cos/sin subgraph evaluated
by onnxruntime for positions ``0 .. max_positions - 1`` (the same kernels, so the same numbers); RotaryEmbedding
computes ``x1 cos - x2 sin, x2 cos + x1 sin``, the export ``x cos + rotate_half(x) sin`` (equal up to rounding of
the sum); the scale ``c_q c_k`` is applied once to ``q k^T`` instead of to each factor; the softmax and the
products with V are summed in another order. A quantized KV cache stays exact: the export quantizes the rotated
keys and the values ``[batch, kv_heads, seq, head_dim]`` along head_dim, and the same quantizer on
``[batch, seq, kv_heads * head_dim]`` along the last axis makes the same blocks (its block size divides head_dim),
which GroupQueryAttention then appends to the cache and attends to, as the export's Concat does.

A block whose attention does not match this pattern exactly is left as it is. Positions at or beyond
``max_positions`` are outside the caches: onnxruntime's RotaryEmbedding then fails the run (it does not compute a
wrong number). The model's inputs and outputs do not change.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common
from onnx import helper

from mxonnx.ops import attention as attention_op
from mxonnx.ops import schema

MS_DOMAIN = "com.microsoft"
DATA_MOVES = ("Reshape", "Expand", "Unsqueeze")  # repeat_kv
MAX_POSITIONS = 8192


@dataclasses.dataclass
class AttentionDims:
    num_heads: int
    kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, config: dict) -> "AttentionDims":
        heads = int(config["num_attention_heads"])
        head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
        return cls(heads, int(config.get("num_key_value_heads") or heads), head_dim)


@dataclasses.dataclass
class Rotary:
    """``x cos + rotate_half(x) sin`` on ``x = Transpose(Reshape(projection))``."""

    projection: ir.Value  # [batch, seq, heads * head_dim]
    cos: ir.Value  # [batch, seq, head_dim] before the Unsqueeze over heads
    sin: ir.Value
    output: ir.Value


@dataclasses.dataclass
class Attention:
    q: Rotary
    k: Rotary
    v: ir.Value  # the v projection [batch, seq, kv_heads * head_dim]
    k_quantizer: ir.Node | None  # MXQuantizeDequantize of the rotated keys entering the cache
    v_quantizer: ir.Node | None
    key_concat: ir.Node | None  # present.N.key = Concat(past, new), None without past
    value_concat: ir.Node | None
    bias: ir.Value  # additive mask [batch, 1, seq, T]
    scale: float
    output: ir.Value  # [batch, seq, heads * head_dim], the o_proj input
    nan_guard: bool  # the export zeroes NaN softmax weights (rows whose keys are all masked by -inf)
    caches: tuple[ir.Value, ir.Value]  # the key and value caches [batch, kv_heads, T, head_dim] the export attends to
    repeats: tuple[ir.Value, ir.Value]  # the same repeated over the query heads [batch, heads, T, head_dim]


def _producer(value: ir.Value | None, *op_types: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    if node is None or node.op_type not in op_types or node.domain not in ("", "ai.onnx"):
        return None
    return node


def _const(value: ir.Value | None) -> np.ndarray | None:
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    return None if tensor is None else tensor.numpy()


def _scalar(value: ir.Value | None) -> float | None:
    array = _const(value)
    return float(array) if array is not None and array.size == 1 else None


def _ints(node: ir.Node, name: str) -> list[int] | None:
    attr = node.attributes.get(name)
    return None if attr is None else list(attr.as_ints())


def _int(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_int()


def _head_split(x: ir.Value) -> ir.Value | None:
    """The ``[batch, seq, heads * head_dim]`` value that ``x = Transpose(Reshape(.), perm=0,2,1,3)`` splits."""
    transpose = _producer(x, "Transpose")
    if transpose is None or _ints(transpose, "perm") != [0, 2, 1, 3]:
        return None
    reshape = _producer(transpose.inputs[0], "Reshape")
    return None if reshape is None else reshape.inputs[0]


def _unsqueezed_over_heads(value: ir.Value) -> ir.Value | None:
    node = _producer(value, "Unsqueeze")
    if node is None or len(node.inputs) < 2 or _const(node.inputs[1]) is None:
        return None
    return node.inputs[0] if _const(node.inputs[1]).tolist() in ([1], 1) else None


def _is_rotate_half(value: ir.Value, x: ir.Value) -> bool:
    """``value = Concat(-x[..., d/2:], x[..., :d/2], axis=-1)``."""
    concat = _producer(value, "Concat")
    if concat is None or len(concat.inputs) != 2 or _int(concat, "axis", 0) not in (-1, 3):
        return False
    neg = _producer(concat.inputs[0], "Neg")
    second = _producer(neg.inputs[0], "Slice") if neg is not None else None
    first = _producer(concat.inputs[1], "Slice")
    if second is None or first is None or second.inputs[0] is not x or first.inputs[0] is not x:
        return False
    for node in (first, second):
        axes = _const(node.inputs[3]) if len(node.inputs) > 3 else None
        if axes is None or axes.tolist() not in ([3], [-1]) or (len(node.inputs) > 4 and _const(node.inputs[4]) is not None
                                                                  and _const(node.inputs[4]).tolist() != [1]):
            return False
    start, end = _const(first.inputs[1]), _const(second.inputs[2])
    return start is not None and start.tolist() == [0] and end is not None and int(end.reshape(-1)[0]) >= 2**31


def _match_rotary(value: ir.Value) -> tuple[Rotary, list[ir.Node]] | None:
    add = _producer(value, "Add")
    if add is None:
        return None
    for plain_index in (0, 1):
        plain, rotated = (_producer(add.inputs[i], "Mul") for i in (plain_index, 1 - plain_index))
        if plain is None or rotated is None:
            continue
        for x_index in (0, 1):
            x, cos = plain.inputs[x_index], _unsqueezed_over_heads(plain.inputs[1 - x_index])
            projection = _head_split(x) if cos is not None else None
            if projection is None:
                continue
            for half_index in (0, 1):
                sin = _unsqueezed_over_heads(rotated.inputs[1 - half_index])
                if sin is not None and _is_rotate_half(rotated.inputs[half_index], x):
                    return Rotary(projection, cos, sin, add.outputs[0]), [add, plain, rotated]
    return None


def _scaled(value: ir.Value) -> tuple[ir.Value, float]:
    """``(x, c)`` for ``value = Mul(x, c)`` with a scalar constant ``c``, else ``(value, 1)``."""
    mul = _producer(value, "Mul")
    if mul is not None:
        for i in (0, 1):
            c = _scalar(mul.inputs[1 - i])
            if c is not None:
                return mul.inputs[i], c
    return value, 1.0


def _repeated(value: ir.Value) -> ir.Value:
    """The cache tensor that repeat_kv (Unsqueeze, Expand, Reshape) repeats into ``value``."""
    while (node := _producer(value, *DATA_MOVES)) is not None:
        value = node.inputs[0]
    return value


def _cache_entry(cache: ir.Value) -> tuple[ir.Value, ir.Node | None]:
    """``(new, concat)`` for ``cache = Concat(past, new, axis=2)`` read from a graph input into a graph output;
    ``(cache, None)`` when ``cache`` is not such a Concat (a graph without past)."""
    concat = _producer(cache, "Concat")
    if (concat is not None and len(concat.inputs) == 2 and _int(concat, "axis", 0) in (-2, 2)
            and concat.inputs[0].is_graph_input() and cache.is_graph_output()):
        return concat.inputs[1], concat
    return cache, None


def _kv_quantizer(value: ir.Value, head_dim: int) -> tuple[ir.Value, ir.Node | None] | None:
    """``(x, quantizer)`` for ``value = MXQuantizeDequantize(x, axis=-1)`` with a block dividing head_dim,
    ``(value, None)`` for a value that is no MX op's output, None for anything else from the MX domain."""
    node = value.producer()
    if node is None or node.domain != schema.DOMAIN:
        return value, None
    if node.op_type != schema.QUANTIZE_DEQUANTIZE or _int(node, schema.AXIS_ATTR, -1) not in (-1, 3):
        return None
    fmt = schema.mx_format(node.attributes[schema.FORMAT_ATTR].as_string())
    return (node.inputs[0], node) if head_dim % fmt.block_size == 0 else None


def match_attention(softmax: ir.Node, dims: AttentionDims) -> Attention | None:
    """The attention around ``softmax`` (module docstring), or None when any part differs from the pattern."""
    add = _producer(softmax.inputs[0], "Add")
    if add is None or _int(softmax, "axis", -1) not in (-1, 3):
        return None
    scores = next((_producer(v, "MatMul") for v in add.inputs if _producer(v, "MatMul") is not None), None)
    if scores is None:
        return None
    bias = add.inputs[1] if add.inputs[0] is scores.outputs[0] else add.inputs[0]
    q_rot, c_q = _scaled(scores.inputs[0])
    k_t, c_k = _scaled(scores.inputs[1])
    transpose = _producer(k_t, "Transpose")
    if transpose is None or _ints(transpose, "perm") != [0, 1, 3, 2]:
        return None
    weights = softmax.outputs[0]
    users = list(weights.uses())
    guard = None
    if len(users) == 2 and {n.op_type for n, _ in users} == {"IsNaN", "Where"}:  # Where(IsNaN(w), 0, w)
        guard = next(n for n, _ in users if n.op_type == "Where")
        weights = guard.outputs[0]
        users = list(weights.uses())
    if len(users) != 1 or users[0][0].op_type != "MatMul" or users[0][1] != 0:
        return None
    context = users[0][0]
    merge = [n for n, _ in context.outputs[0].uses()]
    if len(merge) != 1 or merge[0].op_type != "Transpose" or _ints(merge[0], "perm") != [0, 2, 1, 3]:
        return None
    reshape = [n for n, _ in merge[0].outputs[0].uses()]
    if len(reshape) != 1 or reshape[0].op_type != "Reshape":
        return None
    q = _match_rotary(q_rot)
    k_cache, v_cache = _repeated(transpose.inputs[0]), _repeated(context.inputs[1])
    k_new, key_concat = _cache_entry(k_cache)
    v_new, value_concat = _cache_entry(v_cache)
    k_quantized, v_quantized = _kv_quantizer(k_new, dims.head_dim), _kv_quantizer(v_new, dims.head_dim)
    if q is None or k_quantized is None or v_quantized is None or (key_concat is None) != (value_concat is None):
        return None
    k = _match_rotary(k_quantized[0])
    v = _head_split(v_quantized[0])
    if k is None or v is None or k[0].cos is not q[0].cos or k[0].sin is not q[0].sin:
        return None
    return Attention(q[0], k[0], v, k_quantized[1], v_quantized[1], key_concat, value_concat, bias, c_q * c_k,
                     reshape[0].outputs[0], guard is not None, (k_cache, v_cache),
                     (transpose.inputs[0], context.inputs[1]))


def rotary_caches(graph: ir.Graph, cos: ir.Value, sin: ir.Value, positions: int) -> tuple[np.ndarray, np.ndarray] | None:
    """``(cos_cache, sin_cache)`` ``[positions, head_dim / 2]``: the graph's subgraph computing ``cos``/``sin``
    ``[1, seq, head_dim]`` from ``position_ids`` alone, run by onnxruntime on ``position_ids = 0 .. positions - 1``;
    None when it reads anything else or its two halves differ (not a rotate_half rotary)."""
    import onnxruntime as ort

    nodes, seen, stack, initializers = [], set(), [cos.producer(), sin.producer()], {}
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        nodes.append(node)
        for value in node.inputs:
            if value is None:
                continue
            if value.is_graph_input() and value.name != "position_ids":
                return None
            if value.is_initializer():
                initializers[value.name] = value.const_value
            stack.append(value.producer())
    order = {id(node): i for i, node in enumerate(graph)}
    nodes.sort(key=lambda node: order[id(node)])
    proto = helper.make_model(
        helper.make_graph([ir.serde.serialize_node(node) for node in nodes], "rotary",
                          [helper.make_tensor_value_info("position_ids", onnx.TensorProto.INT64, [1, None])],
                          [helper.make_empty_tensor_value_info(cos.name), helper.make_empty_tensor_value_info(sin.name)],
                          initializer=[ir.serde.serialize_tensor(t) for t in initializers.values()]),
        opset_imports=[helper.make_opsetid("", graph.opset_imports[""])], ir_version=schema.IR_VERSION)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    cos_full, sin_full = session.run(None, {"position_ids": np.arange(positions, dtype=np.int64)[None]})
    half = cos_full.shape[-1] // 2
    for full in (cos_full, sin_full):
        if full.shape[:2] != (1, positions) or not np.array_equal(full[..., :half], full[..., half:]):
            return None
    return (np.ascontiguousarray(cos_full[0, :, :half], dtype=np.float32),
            np.ascontiguousarray(sin_full[0, :, :half], dtype=np.float32))


def _node(op: str, inputs, domain: str = "", outputs: int = 1, **attributes) -> ir.Node:
    """One new node (the ``ir.node`` argument order of this module's many small builders)."""
    return ir.node(op, inputs, attributes=attributes, domain=domain, num_outputs=outputs)


class _Shared:
    """Values every fused attention reads, built once before the first one (the export builds them per block; all
    blocks' caches have one length, the model's own past + seq):

    - ``positions``, ``cos_cache``, ``sin_cache``: RotaryEmbedding's inputs;
    - ``cache_shape(heads)``: ``[batch, heads, past + seq, head_dim]`` from the graph inputs (batch and seq from the
      first block's k projection, past from its ``past_key_values``), standing in for the export's
      ``Shape`` of a cache: its mask's length is computed so, and reading the fused op's present outputs would
      make a cycle;
    - ``seqlens_k = T - 1`` per batch entry and ``total_sequence_length = T``, T the first block's mask length.
    """

    def __init__(self, graph: ir.Graph, first: Attention, dims: AttentionDims, positions: ir.Value,
                 caches: tuple[np.ndarray, np.ndarray]):
        self.graph, self.dims, self.positions, self.anchor = graph, dims, positions, first.q.projection.producer()
        self.cos_cache, self.sin_cache = (self._initializer(f"mxonnx.rotary.{name}_cache", array)
                                          for name, array in zip(("cos", "sin"), caches))
        self.new: list[ir.Node] = []
        self.batch = self._add("Shape", [first.k.projection], start=0, end=1)
        self.length = self._add("Shape", [first.k.projection], start=1, end=2)
        if first.key_concat is not None:
            past = self._add("Shape", [first.key_concat.inputs[0]], start=2, end=3)
            self.length = self._add("Add", [past, self.length])
        self._cache_shapes: dict[int, ir.Value] = {}
        total = self._add("Cast", [self._add("Shape", [first.bias], start=-1)], to=ir.DataType.INT32)  # [T]
        self.total = self._add("Squeeze", [total])
        self.seqlens = self._add("Expand", [self._add("Sub", [total, self.constant(1, np.int32)]), self.batch])
        self._empty_cache: ir.Value | None = None

    def _initializer(self, name: str, array: np.ndarray) -> ir.Value:
        value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.FLOAT),
                         const_value=ir.tensor(array, name=name))
        self.graph.register_initializer(value)
        return value

    def _add(self, op: str, inputs, **attributes) -> ir.Value:
        node = _node(op, inputs, **attributes)
        self.graph.insert_after(self.anchor, node)
        self.anchor = node
        return node.outputs[0]

    def constant(self, number: int, dtype=np.int64) -> ir.Value:
        return self._add("Constant", [], value=ir.tensor(np.array([number], dtype=dtype)))

    def empty_cache(self) -> ir.Value:
        """``[batch, kv_heads, 0, head_dim]`` zeros: the past of a graph without one."""
        if self._empty_cache is None:
            empty = np.zeros((1, self.dims.kv_heads, 0, self.dims.head_dim), np.float32)
            ones = self._add("Constant", [], value=ir.tensor(np.ones(3, np.int64)))
            shape = self._add("Concat", [self.batch, ones], axis=0)
            self._empty_cache = self._add("Expand", [self._add("Constant", [], value=ir.tensor(empty)), shape])
        return self._empty_cache

    def cache_shape(self, heads: int) -> ir.Value:
        if heads not in self._cache_shapes:
            self._cache_shapes[heads] = self._add("Concat", [self.batch, self.constant(heads), self.length,
                                                             self.constant(self.dims.head_dim)], axis=0)
        return self._cache_shapes[heads]


class FuseAttentionPass(ir.passes.InPlacePass):
    """Replace every matching attention of the main graph by RotaryEmbedding + GroupQueryAttention, or
    GroupAttention when ``native`` (module docstring); ``self.fused`` is the number of attentions fused. ``dims``
    are the model's head counts and size; ``max_positions`` the length of the rotary caches."""

    def __init__(self, dims: AttentionDims, max_positions: int | None = None, native: bool = False):
        super().__init__()
        self.dims, self.max_positions, self.native, self.fused = dims, max_positions or MAX_POSITIONS, native, 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        self.fused = 0
        found = [a for n in list(graph) if n.op_type == "Softmax" and n.domain in ("", "ai.onnx")
                 if (a := match_attention(n, self.dims)) is not None]
        positions = next((v for v in graph.inputs if v.name == "position_ids"), None)
        if not found or positions is None:
            return ir.passes.PassResult(model, modified=False)
        found = [a for a in found if a.q.cos is found[0].q.cos and a.q.sin is found[0].q.sin]
        caches = rotary_caches(graph, found[0].q.cos, found[0].q.sin, self.max_positions)
        if caches is None:
            return ir.passes.PassResult(model, modified=False)
        shared = _Shared(graph, found[0], self.dims, positions, caches)
        opset = graph.opset_imports.get("", 0)
        native = self.native and opset >= attention_op.OLDEST_OPSET
        for attention in found:
            self._replace(graph, attention, shared, native and attention.nan_guard)
        graph.opset_imports.setdefault(MS_DOMAIN, 1)
        if any(n.domain == schema.DOMAIN and n.op_type == schema.GROUP_ATTENTION for n in graph):
            graph.opset_imports[schema.DOMAIN] = schema.DOMAIN_VERSION
            function = ir.serde.deserialize_function(attention_op.function_proto(opset))
            model.functions.setdefault(function.identifier(), function)
        ir.passes.common.RemoveUnusedNodesPass()(model)
        self.fused = len(found)
        return ir.passes.PassResult(model, modified=True)

    def _replace(self, graph: ir.Graph, a: Attention, shared: _Shared, native: bool) -> None:
        d = self.dims
        rotary = [a.q.projection, shared.positions, shared.cos_cache, shared.sin_cache]
        q = _node("RotaryEmbedding", rotary, MS_DOMAIN, num_heads=d.num_heads)
        k = _node("RotaryEmbedding", [a.k.projection, *rotary[1:]], MS_DOMAIN, num_heads=d.kv_heads)
        new, kv = [q, k], [k.outputs[0], a.v]
        for i, quantizer in enumerate((a.k_quantizer, a.v_quantizer)):
            if quantizer is not None:  # the same quantizer on [batch, seq, kv_heads * head_dim]: the same blocks
                new.append(ir.node(quantizer.op_type, [kv[i]], domain=quantizer.domain, overload=quantizer.overload,
                                   attributes={schema.FORMAT_ATTR: quantizer.attributes[schema.FORMAT_ATTR].as_string(),
                                               schema.AXIS_ATTR: -1}))
                kv[i] = new[-1].outputs[0]
        past = [c.inputs[0] if c is not None else None for c in (a.key_concat, a.value_concat)]
        if native:  # GroupAttention zeroes a row with every key masked itself
            past = [p if p is not None else shared.empty_cache() for p in past]
            gqa = _node(schema.GROUP_ATTENTION, [q.outputs[0], *kv, *past, a.bias], schema.DOMAIN, outputs=3,
                        num_heads=d.num_heads, kv_num_heads=d.kv_heads, scale=float(a.scale))
        else:
            gqa = _node("GroupQueryAttention", [q.outputs[0], *kv, *past, shared.seqlens, shared.total, None, None,
                                                None, a.bias], MS_DOMAIN, outputs=3,
                        num_heads=d.num_heads, kv_num_heads=d.kv_heads, scale=float(a.scale), causal=0)
        new.append(gqa)
        output = gqa.outputs[0]
        if a.nan_guard and not native:  # a row with every key masked: NaN weights, which the export zeroes: output 0
            zero = _node("Constant", [], value=ir.tensor(np.array(0.0, dtype=np.float32)))
            new += [zero, nan := _node("IsNaN", [output])]
            new.append(_node("Where", [nan.outputs[0], zero.outputs[0], output]))
            output = new[-1].outputs[0]
        anchor = a.output.producer()
        for node in new:
            graph.insert_before(anchor, node)
        a.output.replace_all_uses_with(output)
        for value, heads in zip((*a.caches, *a.repeats), (d.kv_heads, d.kv_heads, d.num_heads, d.num_heads)):
            for node, _ in list(value.uses()):
                if node.op_type == "Shape":
                    self._replace_shape(graph, node, shared.cache_shape(heads), shared)
        for concat, present in ((a.key_concat, gqa.outputs[1]), (a.value_concat, gqa.outputs[2])):
            if concat is None:
                continue
            old = concat.outputs[0]
            index = list(graph.outputs).index(old)
            name, old.name = old.name, None
            present.name, present.shape, present.type = name, old.shape, old.type
            graph.outputs[index] = present
            old.replace_all_uses_with(present)

    @staticmethod
    def _replace_shape(graph: ir.Graph, node: ir.Node, shape: ir.Value, shared: _Shared) -> None:
        """Replace ``Shape(cache, start, end)`` by the same piece of ``shape``."""
        start, end = _int(node, "start", 0), node.attributes.get("end")
        if start != 0 or end is not None:
            piece = _node("Slice", [shape, shared.constant(start), shared.constant(end.as_int() if end is not None
                                                                                    else 2**62)])
            graph.insert_before(node, piece)
            shape = piece.outputs[0]
        node.outputs[0].replace_all_uses_with(shape)


def fuse_attention(model: ir.Model, dims: AttentionDims, max_positions: int | None = None,
                   native: bool = False) -> int:
    """Run ``FuseAttentionPass`` on ``model`` in place; returns the number of attentions fused."""
    fuse = FuseAttentionPass(dims, max_positions, native)
    fuse(model)
    return fuse.fused
