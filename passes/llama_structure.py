"""Find the Llama decoder structure in an exported ONNX graph, from its topology rather than node names.

A *linear* is a ``MatMul(X, W)`` whose ``W`` is a constant rank-2 initializer ``[K, N]``, possibly read through
``Identity``, ``Transpose`` and float ``Cast`` nodes (a weight stored in float16/bfloat16 and cast to float32 is read
as float32), optionally followed by a bias ``Add(b, X W)`` with a constant 1-D ``b [N]`` (``attention_bias`` /
``mlp_bias`` Llamas, Qwen2's q/k/v): the linear's output is then the Add's. For each decoder block we find

- the attention RMSNorm and the three linears reading its output, told apart by where they lead:
  q reaches input 0 and k input 1 of the score ``MatMul`` (Q K^T), v reaches input 1 of the ``MatMul`` of
  the softmax weights with V; o_proj is the first linear after that product;
- the MLP RMSNorm and its two linears: gate passes through the SiLU (a ``Sigmoid``), up goes straight into
  the product; down_proj is the first linear after the product;
- the key and value tensors entering the KV cache (:class:`KVCacheEntry`), ``[batch, kv_heads, seq, head_dim]``:
  with past, optimum writes ``present.N.key = Concat(past_key_values.N.key, k_new)`` on the path from k_proj to the
  score ``MatMul``, and ``k_new`` is that Concat's other input (values likewise). Without past the same tensors are
  found as cuts of that path (values every path from the projection to its attention ``MatMul`` goes through):
  the key is the output of the rotary embedding, the first cut whose producer joins two branches of the path
  (``k cos + rotate_half(k) sin``), and the value the output of the path's first ``Transpose`` (the head split,
  ``[batch, seq, heads, head_dim] -> [batch, heads, seq, head_dim]``).

RMSNorm is recognised as optimum exports it (``Pow/ReduceMean/Add/Sqrt/Div/Mul`` followed by
``Mul(weight, .)``), as ``SimplifiedLayerNormalization`` and as opset-23 ``RMSNormalization``.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from typing import Iterable, Mapping

import numpy as np
import onnx_ir as ir

from mxonnx.errors import InputError

ROLES = ("q", "k", "v", "o", "gate", "up", "down")
# smoothing folds (passes.smoothing): v_proj's and up_proj's columns are scaled (o, down) before their rows (qkv,
# gate_up), so the scales of the norm-side groups are computed on the weights they will really have
FOLD_ORDER = ("o", "down", "qkv", "gate_up")
_SHAPE_OPS = ("Shape", "Size")
_NORM_OPS = ("SimplifiedLayerNormalization", "RMSNormalization")
_ROLE_NAME = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
              "down": "down_proj"}


@dataclasses.dataclass
class Linear:
    """One ``MatMul(X, W)`` with a constant weight ``W [K, N]`` (K = reduction axis)."""

    name: str  # e.g. "layers.3.q_proj"
    role: str  # one of ROLES, or "lm_head"
    node: ir.Node

    @property
    def weight(self) -> ir.Value:
        return self.node.inputs[1]

    @property
    def input(self) -> ir.Value:
        return self.node.inputs[0]

    @property
    def bias_add(self) -> ir.Node | None:
        """The ``Add(b, X W)`` adding the constant bias ``b [N]``, or None."""
        return bias_add(self.node)

    @property
    def output(self) -> ir.Value:
        """``X W + b`` (the bias Add's output), or ``X W`` without a bias."""
        return linear_output(self.node)

    @property
    def shape(self) -> tuple[int, int]:
        k, n = constant_shape(self.weight)
        return k, n

    @property
    def weight_array(self) -> np.ndarray:
        """A copy of W [K, N] (read through Identity/Transpose/Cast, e.g. lm_head's tied embedding, a float16 weight
        read as float32); weights kept in
        memory-mapped external data are unmapped again after the copy, so reading every weight once does not
        leave the whole file mapped."""
        read = constant_reader(self.weight)
        array = np.array(read())
        read.release()
        return array


@dataclasses.dataclass
class RMSNorm:
    """An RMSNorm ``y = x / sqrt(mean(x^2) + eps) * weight``; ``weight`` is its 1-D initializer value."""

    kind: str  # "decomposed" | "SimplifiedLayerNormalization" | "RMSNormalization"
    node: ir.Node  # the node that applies the weight
    weight: ir.Value  # the node's weight input: an initializer, or an Identity of a shared one
    output: ir.Value

    @property
    def weight_array(self):
        return constant_array(self.weight)


@dataclasses.dataclass
class KVCacheEntry:
    """Where one of a block's key or value tensors enters the KV cache: ``tensor`` ``[batch, kv_heads, seq,
    head_dim]`` (keys after the rotary embedding), and ``concat``, the node ``present = Concat(past, tensor)`` (None
    in a graph exported without past)."""

    tensor: ir.Value
    concat: ir.Node | None


@dataclasses.dataclass
class DecoderBlock:
    index: int
    attn_norm: RMSNorm
    mlp_norm: RMSNorm
    q: Linear
    k: Linear
    v: Linear
    o: Linear
    gate: Linear
    up: Linear
    down: Linear
    head_dim: int
    key: KVCacheEntry | None = None
    value: KVCacheEntry | None = None
    down_rotation: ir.Node | None = None  # a com.mxonnx BlockHadamard between the gate*up product and down_proj

    def smoothable_groups(self) -> tuple[str, ...]:
        """The groups whose smoothing scales fold into weights, in ``FOLD_ORDER``: down's fold into
        up_proj's columns, which an online rotation of down's input (``--rotate``) no longer allows."""
        return tuple(g for g in FOLD_ORDER if not (g == "down" and self.down_rotation is not None))

    @property
    def num_heads(self) -> int:
        return self.q.shape[1] // self.head_dim

    @property
    def num_kv_heads(self) -> int:
        return self.k.shape[1] // self.head_dim

    def linears(self) -> list[Linear]:
        return [self.q, self.k, self.v, self.o, self.gate, self.up, self.down]

    def groups(self) -> dict[str, list[Linear]]:
        """Linears that read the same input (and so share activation statistics and a GPTQ Hessian)."""
        return {"qkv": [self.q, self.k, self.v], "o": [self.o], "gate_up": [self.gate, self.up], "down": [self.down]}


def is_linear(node: ir.Node) -> bool:
    if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return False
    shape = constant_shape(node.inputs[1])
    return shape is not None and len(shape) == 2


def bias_add(node: ir.Node) -> ir.Node | None:
    """The ``Add`` that is the only reader of the MatMul ``node``'s output and adds to it a constant 1-D vector as wide
    as the weight's output (a linear's bias ``b [N]``; any width once the weight is no longer a constant, as after
    the MX rewrite), else None."""
    readers = list(node.outputs[0].uses())
    if len(readers) != 1 or node.outputs[0].is_graph_output():
        return None
    add, _ = readers[0]
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.inputs) != 2:
        return None
    other = bias_index(add, node.outputs[0])
    bias, weight = (None if other is None else constant_shape(add.inputs[other])), constant_shape(node.inputs[1])
    if bias is None or len(bias) != 1 or (weight is not None and bias[0] != weight[-1]):
        return None
    return add


def bias_index(add: ir.Node, product: ir.Value) -> int | None:
    """The input index of the ``Add`` that is not ``product`` (None if both are)."""
    others = [i for i, v in enumerate(add.inputs) if v is not product]
    return others[0] if len(others) == 1 else None


def linear_output(node: ir.Node) -> ir.Value:
    """The output of the linear whose MatMul is ``node``: its bias Add's output, else the MatMul's."""
    add = bias_add(node)
    return (add or node).outputs[0]


def _consumers(value: ir.Value) -> list[ir.Node]:
    return list(value.consumers())


def _reach(start: ir.Value, stop) -> list[tuple[ir.Node, int]]:
    """Breadth-first walk forward from ``start``; return ``(node, input index)`` for every node where
    ``stop(node)`` holds (the walk does not continue past those nodes). Shape computations are not followed:
    they carry no data (the key length reaches the attention mask only through ``Shape``)."""
    found, seen, queue = [], set(), deque([start])
    while queue:
        value = queue.popleft()
        for node in _consumers(value):
            if node.op_type in _SHAPE_OPS:
                continue
            if stop(node):
                for i, inp in enumerate(node.inputs):
                    if inp is value:
                        found.append((node, i))
                continue
            if id(node) in seen:
                continue
            seen.add(id(node))
            queue.extend(node.outputs)
    return found


def _is_attention_matmul(node: ir.Node) -> bool:
    return node.op_type == "MatMul" and not is_linear(node)


def _first_linear_after(value: ir.Value) -> ir.Node | None:
    hits = [n for n, _ in _reach(value, lambda n: is_linear(n) or _is_attention_matmul(n)) if is_linear(n)]
    return hits[0] if len(hits) == 1 else None


def _is_float_cast(node: ir.Node) -> bool:
    """A ``Cast`` to a float type (e.g. the ``Cast(to=FLOAT)`` reading a weight stored in float16 or bfloat16)."""
    return node.op_type == "Cast" and "to" in node.attributes and ir.DataType(node.attributes["to"].as_int()).is_floating_point()


def _constant_source(value: ir.Value | None) -> tuple[ir.Value | ir.Node | None, list[ir.Node]]:
    """Follow ``Identity``/``Transpose``/float ``Cast`` producers back to an initializer value or a ``Constant`` node.
    Returns (source or None, the Transpose and Cast nodes passed, outermost first)."""
    passed = []
    while value is not None:
        if value.const_value is not None:
            return _float_if_cast(value, passed), passed
        node = value.producer()
        if node is None:
            return None, passed
        if node.op_type == "Constant" and "value" in node.attributes:
            return _float_if_cast(node, passed), passed
        if node.op_type == "Transpose" or _is_float_cast(node):
            passed.append(node)
        elif node.op_type != "Identity":
            return None, passed
        value = node.inputs[0]
    return None, passed


def _float_if_cast(source: ir.Value | ir.Node, passed: list[ir.Node]) -> ir.Value | ir.Node | None:
    """``source``, or None when a Cast was passed and the source is not a float (an integer constant cast)."""
    if any(node.op_type == "Cast" for node in passed) and not _source_tensor(source).dtype.is_floating_point():
        return None
    return source


def _source_tensor(source: ir.Value | ir.Node):
    return source.const_value if isinstance(source, ir.Value) else source.attributes["value"].value


def _perm(node: ir.Node, rank: int) -> list[int]:
    return list(node.attributes["perm"].as_ints()) if "perm" in node.attributes else list(range(rank))[::-1]


def constant_shape(value: ir.Value | None) -> tuple[int, ...] | None:
    """The shape of a constant seen through ``Identity``/``Transpose``/float ``Cast`` (no data is read), else None."""
    source, passed = _constant_source(value)
    if source is None:
        return None
    shape = tuple(int(d) for d in _source_tensor(source).shape)
    for node in reversed(passed):
        if node.op_type == "Transpose":
            shape = tuple(shape[p] for p in _perm(node, len(shape)))
    return shape


def constant_dtype(value: ir.Value | None) -> ir.DataType | None:
    """The data type a constant reads as through ``Identity``/``Transpose``/float ``Cast`` (the outermost Cast's
    ``to``, else the source's type; float32 for a float16 weight behind ``Cast(to=FLOAT)``), else None."""
    source, passed = _constant_source(value)
    if source is None:
        return None
    casts = [node for node in passed if node.op_type == "Cast"]
    return ir.DataType(casts[0].attributes["to"].as_int()) if casts else _source_tensor(source).dtype


class ConstantReader:
    """Reads the numpy value of an initializer or ``Constant`` seen through ``Identity``/``Transpose``/float ``Cast``
    as they were when it was made: it holds the source tensor, not its data, and keeps reading it if the graph changes
    later. ``steps`` are applied in order, innermost first: a permutation (list) or a numpy dtype to cast to (a
    float16/bfloat16 weight read through ``Cast(to=FLOAT)`` reads as float32)."""

    def __init__(self, tensor: ir.TensorProtocol, steps: list):
        self.tensor, self.steps = tensor, steps

    @property
    def perms(self) -> list[list[int]]:
        return [step for step in self.steps if isinstance(step, list)]

    def __call__(self) -> np.ndarray:
        array = self.tensor.numpy()
        for step in self.steps:
            array = array.transpose(step) if isinstance(step, list) else array.astype(step)
        return array

    def release(self) -> None:
        """Unmap the source when it is memory-mapped external data (its pages leave the process; the next read maps
        it again). Arrays read before stay valid: while one is alive the mapping stays, and goes with the last."""
        if isinstance(self.tensor, ir.ExternalTensor):
            try:
                self.tensor.release()
            except BufferError:  # an array read earlier still uses the mapping: it goes when that array does
                self.tensor.raw = None


def constant_reader(value: ir.Value | None) -> ConstantReader | None:
    """A :class:`ConstantReader` of ``value``, or None when it is not such a constant."""
    source, passed = _constant_source(value)
    if source is None:
        return None
    tensor = _source_tensor(source)
    steps = [_perm(node, len(tensor.shape)) if node.op_type == "Transpose"
             else ir.DataType(node.attributes["to"].as_int()).numpy() for node in reversed(passed)]
    return ConstantReader(tensor, steps)


def constant_array(value: ir.Value | None):
    """The numpy value of an initializer or ``Constant``, seen through ``Identity``/``Transpose``/float ``Cast``;
    else None."""
    read = constant_reader(value)
    return None if read is None else read()


def _is_vector(value: ir.Value | None) -> bool:
    """A 1-D constant (told from its shape: no weight data is read, so no external data gets mapped)."""
    shape = constant_shape(value)
    return shape is not None and len(shape) == 1


def _match_rmsnorm(value: ir.Value) -> RMSNorm | None:
    """The RMSNorm producing ``value``, or None."""
    node = value.producer()
    if node is None:
        return None
    if node.op_type in _NORM_OPS and len(node.inputs) >= 2 and _is_vector(node.inputs[1]):
        return RMSNorm(node.op_type, node, node.inputs[1], value)
    if node.op_type != "Mul":
        return None
    consts = [v for v in node.inputs if v is not None and _is_vector(v)]
    others = [v for v in node.inputs if v is not None and constant_shape(v) is None]
    if len(consts) != 1 or len(others) != 1:
        return None
    # the normalised input: walk back a few producers looking for the mean of squares
    frontier, ops = [others[0]], set()
    for _ in range(8):
        nxt = []
        for v in frontier:
            p = v.producer()
            if p is not None:
                ops.add(p.op_type)
                nxt.extend(i for i in p.inputs if i is not None)
        frontier = nxt
    if {"ReduceMean", "Pow"} <= ops or {"ReduceMean", "Mul"} <= ops and ("Sqrt" in ops or "Reciprocal" in ops):
        return RMSNorm("decomposed", node, consts[0], value)
    return None


def _head_dim_from_reshape(linear: ir.Node) -> int | None:
    """optimum reshapes q/k/v to ``[batch, seq, -1, head_dim]``: read the constant last dimension."""
    for node in _consumers(linear_output(linear)):
        if node.op_type != "Reshape":
            continue
        shape = node.inputs[1]
        last = constant_array(shape)
        if last is None and shape.producer() is not None and shape.producer().op_type == "Concat":
            last = constant_array(shape.producer().inputs[-1])
        if last is not None and last.size and int(last.reshape(-1)[-1]) > 0:
            return int(last.reshape(-1)[-1])
    return None


def _leads_to_softmax(matmul: ir.Node) -> bool:
    return any(n.op_type == "Softmax" for n, _ in _reach(matmul.outputs[0], lambda n: n.op_type in ("Softmax", "MatMul")))


def _attention(linears: list[ir.Node]) -> tuple[tuple[ir.Node, ir.Node, ir.Node, ir.Node], ir.Node, ir.Node] | None:
    """((q, k, v, o), score MatMul, MatMul of the weights with V) among the three linears reading one norm; None
    when the attention pattern does not match."""
    roles: dict[str, ir.Node] = {}
    weights_times_v = scores = None
    for lin in linears:
        hits = [(n, i) for n, i in _reach(linear_output(lin), lambda n: is_linear(n) or _is_attention_matmul(n))
                if _is_attention_matmul(n)]
        if len(hits) != 1:
            return None
        matmul, idx = hits[0]
        if _leads_to_softmax(matmul):
            role = "q" if idx == 0 else "k"
            scores = matmul
        elif idx == 1:
            role, weights_times_v = "v", matmul
        else:
            return None
        if role in roles:
            return None
        roles[role] = lin
    if len(roles) != 3:
        return None
    o = _first_linear_after(weights_times_v.outputs[0])
    return None if o is None else ((roles["q"], roles["k"], roles["v"], o), scores, weights_times_v)


def _path_nodes(start: ir.Value, end: ir.Node) -> list[ir.Node]:
    """The nodes on data paths from ``start`` to ``end`` (``end`` included), in graph order; shape computations
    are not followed."""
    forward: set[int] = set()
    queue = deque([start])
    while queue:
        for node in _consumers(queue.popleft()):
            if node.op_type in _SHAPE_OPS or id(node) in forward:
                continue
            forward.add(id(node))
            if node is not end:
                queue.extend(node.outputs)
    on_path, stack = {id(end)}, [end]
    while stack:
        for value in stack.pop().inputs:
            producer = value.producer() if value is not None else None
            if producer is not None and id(producer) in forward and id(producer) not in on_path:
                on_path.add(id(producer))
                stack.append(producer)
    return [node for node in end.graph if id(node) in on_path]


def _path_cuts(start: ir.Value, path: list[ir.Node]) -> list[ir.Value]:
    """The values every path from ``start`` through ``path`` (graph order) goes through, in order: before each node,
    the values computed so far that still have consumers on the path; when only one is left, it is a cut."""
    on_path = {id(node) for node in path}

    def path_uses(value: ir.Value) -> int:
        return sum(1 for node, _ in value.uses() if id(node) in on_path)

    pending = {start: path_uses(start)}
    cuts = []
    for node in path:
        live = [value for value, uses in pending.items() if uses]
        if len(live) == 1 and (not cuts or cuts[-1] is not live[0]):
            cuts.append(live[0])
        for value in node.inputs:
            if value in pending:
                pending[value] -= 1
        pending.update({out: path_uses(out) for out in node.outputs})
    return cuts


def _cache_concat(path: list[ir.Node]) -> tuple[ir.Node, ir.Value] | None:
    """(node, its input on the path) for ``present = Concat(past, new)`` on ``path``: a Concat reading a graph input
    and producing a graph output."""
    on_path = {id(node) for node in path}
    for node in path:
        if node.op_type != "Concat" or not any(out.is_graph_output() for out in node.outputs):
            continue
        from_path = [v for v in node.inputs if v is not None and v.producer() is not None and id(v.producer()) in on_path]
        if len(from_path) == 1 and any(v is not None and v.is_graph_input() for v in node.inputs):
            return node, from_path[0]
    return None


def _joins_two_branches(node: ir.Node, path: list[ir.Node]) -> bool:
    on_path = {id(n) for n in path}
    return sum(1 for v in node.inputs if v is not None and v.producer() is not None and id(v.producer()) in on_path) >= 2


def _kv_cache_entry(linear: ir.Node, attention: ir.Node, rotary: bool) -> KVCacheEntry | None:
    """Where the output of the k (``rotary``) or v projection ``linear`` enters the cache before ``attention`` (the
    score MatMul or the MatMul of the weights with V); see the module docstring."""
    path = _path_nodes(linear.outputs[0], attention)
    concat = _cache_concat(path)
    if concat is not None:
        return KVCacheEntry(concat[1], concat[0])
    cuts = _path_cuts(linear.outputs[0], path)[1:]
    if rotary:
        found = [v for v in cuts if _joins_two_branches(v.producer(), path)]
    else:
        found = [v for v in cuts if v.producer().op_type == "Transpose"]
    return KVCacheEntry(found[0], None) if found else None


def _mlp(linears: list[ir.Node]) -> tuple[ir.Node, ir.Node, ir.Node] | None:
    """(gate, up, down) among the two linears reading the MLP norm."""
    def through_sigmoid(node: ir.Node) -> bool:
        return any(c.op_type in ("Sigmoid", "Silu", "Swish") for c in _consumers(linear_output(node)))

    gates = [n for n in linears if through_sigmoid(n)]
    ups = [n for n in linears if not through_sigmoid(n)]
    if len(gates) != 1 or len(ups) != 1:
        return None
    down = _first_linear_after(linear_output(ups[0]))
    if down is None or down is not _first_linear_after(linear_output(gates[0])):
        return None
    return gates[0], ups[0], down


def _norm_reading_linears(graph: ir.Graph) -> list[tuple[RMSNorm, list[ir.Node]]]:
    """Every RMSNorm output read by linears, in graph order."""
    result, seen = [], set()
    for node in graph:
        if not is_linear(node):
            continue
        value = node.inputs[0]
        if id(value) in seen:
            continue
        seen.add(id(value))
        norm = _match_rmsnorm(value)
        if norm is not None:
            result.append((norm, [n for n in _consumers(value) if is_linear(n) and n.inputs[0] is value]))
    return result


def find_decoder_blocks(model: ir.Model, config: Mapping | None = None) -> list[DecoderBlock]:
    """All decoder blocks of ``model`` in order. ``config`` (the HF config dict) supplies ``head_dim`` when the
    graph does not show it. Raises ``InputError`` when no block matches or a block is incomplete."""
    pairs = _norm_reading_linears(model.graph)
    blocks: list[DecoderBlock] = []
    pending_attn = None
    for norm, linears in pairs:
        if len(linears) == 3:
            attn = _attention(linears)
            if attn is None:
                raise InputError(f"norm {norm.node.name!r} feeds three MatMuls that are not a Llama attention (q, k, v)")
            pending_attn = (norm, attn)
        elif len(linears) == 2 and pending_attn is not None:
            mlp = _mlp(linears)
            if mlp is None:
                raise InputError(f"norm {norm.node.name!r} feeds two MatMuls that are not a Llama MLP (gate, up)")
            attn_norm, ((q, k, v, o), scores, weights_times_v) = pending_attn
            pending_attn = None
            index = len(blocks)
            head_dim = _head_dim_from_reshape(q) or _config_head_dim(config)
            if head_dim is None:
                raise InputError("cannot tell the attention head size from the graph; pass the model's config.json")
            named = {role: Linear(f"layers.{index}.{_ROLE_NAME[role]}", role, node)
                     for role, node in zip(ROLES, (q, k, v, o, *mlp))}
            blocks.append(DecoderBlock(index, attn_norm, norm, head_dim=head_dim, **named,
                                       key=_kv_cache_entry(k, scores, rotary=True),
                                       value=_kv_cache_entry(v, weights_times_v, rotary=False),
                                       down_rotation=_online_rotation(mlp[2].inputs[0])))
    if not blocks:
        raise InputError("no Llama decoder block found in the graph (RMSNorm -> q/k/v ... gate/up -> down)")
    for b in blocks:
        if b.q.shape[1] % b.head_dim or b.k.shape[1] % b.head_dim or b.num_heads % b.num_kv_heads:
            raise InputError(f"decoder block {b.index}: head sizes do not divide the projection widths")
    return blocks


def _online_rotation(value: ir.Value) -> ir.Node | None:
    """The ``com.mxonnx`` ``BlockHadamard`` producing ``value``, or None."""
    node = value.producer()
    return node if node is not None and (node.domain, node.op_type) == ("com.mxonnx", "BlockHadamard") else None


def rmsnorm_producing(value: ir.Value) -> RMSNorm | None:
    """The RMSNorm whose output is ``value`` (e.g. the final norm read by lm_head), or None."""
    return _match_rmsnorm(value)


def _config_head_dim(config: Mapping | None) -> int | None:
    if not config:
        return None
    if config.get("head_dim"):
        return int(config["head_dim"])
    if config.get("hidden_size") and config.get("num_attention_heads"):
        return int(config["hidden_size"]) // int(config["num_attention_heads"])
    return None


def find_lm_head(model: ir.Model, blocks: Iterable[DecoderBlock] | None = None) -> Linear | None:
    """The linear producing the ``logits`` output, maybe through its bias (or the last linear outside the decoder
    blocks)."""
    taken = {id(lin.node) for b in (blocks or []) for lin in b.linears()}
    candidates = [n for n in model.graph if is_linear(n) and id(n) not in taken]
    for node in candidates:
        if linear_output(node).is_graph_output():
            return Linear("lm_head", "lm_head", node)
    return Linear("lm_head", "lm_head", candidates[-1]) if candidates else None
