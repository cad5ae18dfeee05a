"""Run an exported Llama one decoder block at a time, for sequential GPTQ (project issue 7).

GPTQ calibrates block ``i`` on the inputs produced by blocks ``0..i-1`` *after* they were quantized, as the GPTQ
reference's ``llama_sequential`` does. Running the whole graph for each block would cost O(blocks^2); instead the
graph is cut at the residual stream:

- ``h_0`` is the residual value entering block 0 (the input of its attention residual ``Add``), and ``h_{i+1}``
  the output of block ``i``'s MLP residual ``Add`` (after ``down_proj``);
- the *prefix* is every node that does not depend on the data of ``h_0`` (the embedding lookup, rotary cos/sin,
  the attention mask, which may read ``Shape(h_0)``: every ``h_i`` has that shape). It runs once per window;
- block ``i`` is every node ``h_{i+1}`` depends on, back to ``h_i``, the prefix values and the initializers.

Each :meth:`BlockwiseRunner.capture` / :meth:`BlockwiseRunner.advance` call serialises the block in its
*current* state in the model (with the model's functions and opset imports, so blocks rewritten to
``com.mxonnx`` ops run) and opens one session for all windows: cost stays linear in the number of blocks, and
memory holds one hidden state per window plus the prefix values the blocks read (one copy of those equal in
every window, such as the attention mask).
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
import onnx
import onnx.numpy_helper
import onnx_ir as ir
import onnxruntime as ort

from mxonnx import formats
from mxonnx.errors import InputError
from mxonnx.ops import schema
from mxonnx.passes.llama_structure import DecoderBlock, Linear
from mxonnx.session import create_session

SHAPE_OPS = ("Shape", "Size")  # read a value's shape, not its data


class BlockwiseRunner:
    """Streams calibration windows through the decoder blocks of ``model`` one block at a time.

    ``model`` is the float model the ``blocks`` were found in (``find_decoder_blocks``); it may be modified
    between calls (weights replaced, a block rewritten) and every call runs the current state. ``windows`` are
    token ids ``[n, seqlen]``, run one window per session call with the graph inputs of
    :func:`decoder_feed` (all-ones attention mask, positions ``0..seqlen-1``, empty KV past).
    The stored :attr:`hidden_states` (one ``[1, seqlen, hidden]`` array per window) are the inputs of block
    :attr:`position`; after the last block they are the residual stream entering the final norm.
    """

    def __init__(self, model: ir.Model, blocks: Sequence[DecoderBlock], windows: np.ndarray, progress: bool = False,
                 threads: int | None = None):
        self.model = model
        self.windows = _checked_windows(windows)
        self.progress = progress
        self.threads = threads
        self.boundaries = residual_boundaries(blocks)
        self._kv_shape = (blocks[0].num_kv_heads, blocks[0].head_dim)
        self.group_inputs = [_group_inputs(block) for block in blocks]
        self.group_widths = [{group: linears[0].shape[0] for group, linears in block.groups().items()}
                             for block in blocks]
        self._shared = prefix_values(model.graph, self.boundaries[0])
        read = {v for i in range(self.num_blocks) for v in self._block_region(i, [self.boundaries[i + 1]])[1]}
        # what the prefix computes per window: h_0 and the prefix values some block reads
        self._prefix_outputs = [self.boundaries[0], *sorted((read & self._shared) - {self.boundaries[0]},
                                                            key=lambda v: v.name)]
        self.position: int | None = 0
        self.hidden_states: list[np.ndarray] = []
        self._shared_arrays: list[dict[str, np.ndarray]] = []
        self._run_prefix()

    @property
    def num_blocks(self) -> int:
        return len(self.boundaries) - 1

    def restore(self, position: int, hidden_states: Sequence[np.ndarray]) -> None:
        """Take ``hidden_states`` (one ``[1, seqlen, hidden]`` array per window, e.g. saved by an interrupted run) as
        the inputs of block ``position``."""
        if not 0 <= position <= self.num_blocks or len(hidden_states) != len(self.windows):
            raise ValueError(f"cannot restore {len(hidden_states)} hidden states at block {position}")
        expected, expected_dtype = self.hidden_states[0].shape, self.hidden_states[0].dtype
        if any(h.shape != expected for h in hidden_states):
            raise ValueError(f"restored hidden states are not shaped {expected}")
        self.hidden_states = [np.array(h, expected_dtype) for h in hidden_states]
        self.position = position

    def block_inputs(self, index: int) -> Iterator[dict[str, np.ndarray]]:
        """Per window, the feeds of block ``index`` (its hidden state, prefix values and graph inputs it reads)."""
        self._check_position(index)
        _, external = self._block_region(index, [self.boundaries[index + 1]])
        names = [v.name for v in external]
        return (self._feeds(w, names) for w in range(len(self.windows)))

    def capture(self, index: int, callback: Callable[[str, np.ndarray], None], advance: bool = False) -> None:
        """Run block ``index`` on every window and call ``callback(group, x)`` with the input ``x [tokens, K]`` of
        each linear group (``qkv``, ``o``, ``gate_up``, ``down``), windows in order; nothing is stored unless
        ``advance``: the same run then also gives the next block's inputs, as :meth:`advance` would."""
        groups = self.group_inputs[index]

        def each(arrays: list[np.ndarray]) -> None:
            for name, x in zip(groups, arrays):
                callback(name, x.reshape(-1, x.shape[-1]))

        self._pass(index, list(groups.values()), each, advance)

    def capture_grams(self, index: int, acts: formats.MXFormat, callback: Callable[[str, np.ndarray, int], None],
                      advance: bool = False, group_scales: Mapping[str, np.ndarray] | None = None) -> None:
        """As :meth:`capture`, but ``callback(group, xtx, tokens)`` gets ``xtx = A^T A`` (float32 ``[K, K]``) of the
        window's ``A = Q_acts(x)`` (``x`` for ``acts`` none; ``Q_acts`` the ``com.mxonnx`` MXQuantizeDequantize
        along K; for static ``int8`` acts, QuantizeLinear/DequantizeLinear with the per-channel scales
        ``group_scales[group]``): both computed by onnxruntime in the block's run, so only K x K values per group
        come back."""
        groups = self.group_inputs[index]
        self.capture_gram_sets(index, {group: [acts] for group in groups},
                               lambda group, fmt, xtx, n: callback(group, xtx, n), advance, group_scales)

    def capture_gram_sets(self, index: int, acts: Mapping[str, Sequence[formats.MXFormat]],
                          callback: Callable[[str, formats.MXFormat, np.ndarray, int], None], advance: bool = False,
                          group_scales: Mapping[str, np.ndarray] | None = None) -> None:
        """:meth:`capture_grams` with several activation formats per group (linears of one input quantized in
        different formats, ``--override``): ``callback(group, fmt, xtx, tokens)`` for every ``fmt`` in
        ``acts[group]`` (every group of the block must be there), in one run of the block."""
        groups = self.group_inputs[index]
        if set(acts) != set(groups):
            raise ValueError(f"activation formats for groups {sorted(acts)}, the block has {list(groups)}")
        int_groups = [group for group in groups if any(fmt.kind == "int" for fmt in acts[group])]
        if not all(group in (group_scales or {}) for group in int_groups):
            raise ValueError(f"int8 activations need the scales of every group: {int_groups}")
        tokens = self.windows.shape[1]
        order = [(group, fmt) for group in groups for fmt in acts[group]]

        def each(arrays: list[np.ndarray]) -> None:
            for (group, fmt), xtx in zip(order, arrays):
                callback(group, fmt, xtx, tokens)

        widths = {value.name: self.group_widths[index][group] for group, value in groups.items()}
        sets = {groups[group].name: list(acts[group]) for group in groups}
        scales = {groups[group].name: group_scales[group] for group in int_groups}
        self._pass(index, list(groups.values()), each, advance, head=gram_sets_head(sets, widths, scales))

    def open_block(self, index: int, head: Head | None = None) -> RegionSession:
        """One session of block ``index`` as it now is in the model (``head`` may rewrite its proto, e.g.
        :func:`weights_as_inputs`), run on hidden states the caller holds, not the stored ones."""
        nodes, external = self._block_region(index, [self.boundaries[index + 1]])
        return self._open(nodes, external, [self.boundaries[index + 1]], self.boundaries[index], head)

    def open_capture(self, index: int) -> tuple[list[str], RegionSession]:
        """One session of block ``index`` whose outputs are the inputs of its linear groups (names returned, in
        order) followed by the block's output, run on hidden states the caller holds (e.g. a second stream). The
        runner must be at block ``index`` (its stored states are the other stream)."""
        self._check_position(index)
        groups = self.group_inputs[index]
        outputs = [*groups.values(), self.boundaries[index + 1]]
        nodes, external = self._block_region(index, outputs)
        return list(groups), self._open(nodes, external, outputs, self.boundaries[index], None)

    def advance_states(self, index: int, states: list[np.ndarray]) -> None:
        """Move ``states`` (one ``[1, T, hidden]`` array per window, a stream the caller holds) past block ``index``
        as it now is in the model, in place."""
        session = self.open_block(index)
        for window in range(len(states)):
            states[window] = session.run(window, states[window])[0]

    def open_tail(self, outputs: Sequence[ir.Value]) -> RegionSession:
        """One session of what ``outputs`` (e.g. the logits) compute from the last block's output ``h_L`` (the final
        norm and lm_head), run on hidden states the caller holds."""
        nodes, external = graph_region(self.model.graph, list(outputs), self._shared | {self.boundaries[-1]})
        return self._open(nodes, external, list(outputs), self.boundaries[-1], None)

    def _open(self, nodes: list[ir.Node], external: list[ir.Value], outputs: list[ir.Value], hidden: ir.Value,
              head: Head | None) -> RegionSession:
        names = [v.name for v in external]
        missing = [v.name for v in external if v in self._shared and v not in self._prefix_outputs]
        if missing:
            raise InputError(f"a region reads {missing[0]!r}, a prefix value not computed up front")
        graph_feed = decoder_feed(list(self.model.graph.inputs), self.windows[0][None], *self._kv_shape)
        sample = {**graph_feed, **self._shared_arrays[0], hidden.name: self.hidden_states[0]}
        proto, folder = subgraph_proto(self.model, nodes, external, outputs, {n: sample[n] for n in names})
        if head is not None:
            head(proto)
        session = create_session(proto.SerializeToString(), threads=self.threads, external_data_folder=folder)

        def feeds(window: int) -> dict[str, np.ndarray]:
            graph = decoder_feed(list(self.model.graph.inputs), self.windows[window][None], *self._kv_shape)
            return {n: graph[n] if n in graph else self._shared_arrays[window][n] for n in names if n != hidden.name}

        return RegionSession(session, hidden.name, feeds, [o.name for o in proto.graph.output])

    def advance(self, index: int) -> None:
        """Run block ``index`` on every window and store its outputs as the next block's inputs."""
        self._pass(index, [], lambda arrays: None, advance=True)

    def _pass(self, index: int, outputs: list[ir.Value], each: Callable[[list[np.ndarray]], None],
              advance: bool, head: Head | None = None) -> None:
        """Run block ``index`` over every window, calling ``each`` with the window's ``outputs``; with ``advance``
        the block's output replaces the window's hidden state as soon as the window is done (one set of hidden
        states in memory, not two)."""
        wanted = [*outputs, *([self.boundaries[index + 1]] if advance else [])]
        replaced = 0
        try:
            for window, arrays in enumerate(self._run_block(index, wanted, f"block {index}", head)):
                each(arrays[:len(arrays) - 1] if advance else arrays)  # a head may turn one output into several
                if advance:
                    self.hidden_states[window] = arrays[-1]
                    replaced += 1
        except BaseException:
            if replaced:
                self.position = None  # the hidden states are now a mix of two blocks' inputs
            raise
        if advance:
            self.position = index + 1

    def _check_position(self, index: int) -> None:
        if self.position is None:
            raise ValueError("an interrupted pass left the stored hidden states unusable")
        if index != self.position:
            raise ValueError(f"the stored hidden states are the inputs of block {self.position}, not block {index}")

    def _block_region(self, index: int, outputs: list[ir.Value]) -> tuple[list[ir.Node], list[ir.Value]]:
        """Nodes of block ``index`` that ``outputs`` need, and their external inputs; refuses a block that reads
        another block's hidden state."""
        nodes, external = graph_region(self.model.graph, outputs, self._shared | {self.boundaries[index]})
        inner = {id(n) for n in nodes}
        for j, h in enumerate(self.boundaries):
            if j not in (index, index + 1) and id(h.producer()) in inner:
                raise InputError(f"decoder block {index} reads {h.name!r}, the hidden state of block {j}")
        return nodes, external

    def _run_prefix(self) -> None:
        nodes, external = graph_region(self.model.graph, self._prefix_outputs, set())
        for arrays in self._stream(nodes, external, self._prefix_outputs, "prefix"):
            self.hidden_states.append(arrays[0])
            self._shared_arrays.append({v.name: self._deduplicated(v.name, a)
                                        for v, a in zip(self._prefix_outputs[1:], arrays[1:])})

    def _deduplicated(self, name: str, array: np.ndarray) -> np.ndarray:
        """``array``, or the equal array of the first window (the attention mask and rotary tables of windows of
        one length are the same: one copy instead of one per window)."""
        first = self._shared_arrays[0][name] if self._shared_arrays else None
        return first if first is not None and np.array_equal(first, array) else array

    def _run_block(self, index: int, outputs: list[ir.Value], desc: str,
                   head: Head | None = None) -> Iterator[list[np.ndarray]]:
        self._check_position(index)
        nodes, external = self._block_region(index, outputs)
        missing = [v.name for v in external if v in self._shared and v not in self._prefix_outputs]
        if missing:
            raise InputError(f"decoder block {index} now reads {missing[0]!r}, a prefix value not computed up front")
        return self._stream(nodes, external, outputs, desc, head)

    def _stream(self, nodes: list[ir.Node], inputs: list[ir.Value], outputs: list[ir.Value],
                desc: str, head: Head | None = None) -> Iterator[list[np.ndarray]]:
        """Serialise ``nodes`` once (``head`` may replace some of its outputs by computations on them), open one
        session, and yield its outputs for every window."""
        names = [v.name for v in inputs]
        session, out_names = self._session(nodes, inputs, outputs, head, self._feeds(0, names))
        for window in _progress(range(len(self.windows)), desc, self.progress):
            yield session.run(out_names, self._feeds(window, names))

    def _session(self, nodes: list[ir.Node], inputs: list[ir.Value], outputs: list[ir.Value], head: Head | None,
                 sample_feeds: dict[str, np.ndarray]) -> tuple[ort.InferenceSession, list[str]]:
        """The session of the region and its output names. The proto and its serialized bytes (which embed the
        weights the model holds in memory, e.g. folded ones: 0.35 GB for a 7B block in float16) are dropped as
        soon as the session has its own copy, not held through the windows."""
        proto, folder = subgraph_proto(self.model, nodes, inputs, outputs, sample_feeds)
        if head is not None:
            head(proto)
        out_names = [o.name for o in proto.graph.output]
        serialized = proto.SerializeToString()
        del proto
        return create_session(serialized, threads=self.threads, external_data_folder=folder), out_names

    def _feeds(self, window: int, names: list[str]) -> dict[str, np.ndarray]:
        """The arrays named ``names`` for one window: graph inputs, the stored hidden state, prefix values."""
        graph_feed = decoder_feed(list(self.model.graph.inputs), self.windows[window][None], *self._kv_shape)
        hidden = self.boundaries[self.position].name
        feeds = {}
        for name in names:
            if name in graph_feed:
                feeds[name] = graph_feed[name]
            elif name == hidden:
                feeds[name] = self.hidden_states[window]
            else:
                feeds[name] = self._shared_arrays[window][name]
        return feeds


class RegionSession:
    """A region of the graph (a block, the tail) opened once: :meth:`run` takes one window's hidden state and extra
    feeds (e.g. weights made inputs) and returns the region's outputs."""

    def __init__(self, session, hidden_name: str, feeds: Callable[[int], dict[str, np.ndarray]], outputs: list[str]):
        self.session, self.hidden_name, self._feeds, self.outputs = session, hidden_name, feeds, outputs

    def run(self, window: int, hidden: np.ndarray, extra: Mapping[str, np.ndarray] | None = None) -> list[np.ndarray]:
        return self.session.run(self.outputs, {**self._feeds(window), self.hidden_name: hidden, **(extra or {})})


def weights_as_inputs(weights: Mapping[str, str]) -> Head:
    """A rewrite of a region's proto: every ``MatMul`` whose B is the value ``w`` of ``weights`` (weight value name
    -> input name) reads the float32 graph input ``weights[w]`` instead; what only fed the old weights goes."""

    def rewrite(proto: onnx.ModelProto) -> None:
        graph = proto.graph
        fed = []
        for node in graph.node:
            if node.op_type == "MatMul" and node.input[1] in weights:
                node.input[1] = weights[node.input[1]]
                fed.append(node.input[1])
        for name in dict.fromkeys(fed):
            graph.input.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
        _prune(graph)

    return rewrite


def _prune(graph: onnx.GraphProto) -> None:
    """Drop the nodes and initializers no graph output depends on."""
    while True:
        used = {o.name for o in graph.output} | {i for n in graph.node for i in n.input}
        dead = [i for i, n in enumerate(graph.node) if not any(o in used for o in n.output)]
        for i in reversed(dead):
            del graph.node[i]
        if not dead:
            break
    used = {i for n in graph.node for i in n.input}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def residual_boundaries(blocks: Sequence[DecoderBlock]) -> list[ir.Value]:
    """``[h_0, ..., h_L]``: the residual stream entering block 0 (the other input of the ``Add`` after its
    o_proj) and the output of each block's ``Add`` after down_proj."""
    if not blocks:
        raise InputError("no decoder blocks to run")
    first = _residual_add(blocks[0].o)
    h0 = [v for v in first.inputs if not _downstream_of(v, blocks[0].o.node)]
    if len(h0) != 1:
        raise InputError(f"block 0: cannot tell the residual input of {first.name!r}")
    return [h0[0], *(_residual_add(block.down).outputs[0] for block in blocks)]


def _residual_add(linear: Linear) -> ir.Node:
    """The first ``Add`` of two computed values after ``linear`` (after its bias Add), following at most four
    single-consumer nodes."""
    value = linear.output
    for _ in range(4):
        consumers = list(value.consumers())
        if len(consumers) != 1:
            break
        node = consumers[0]
        if node.op_type == "Add" and all(v is not None and not v.is_initializer() for v in node.inputs):
            return node
        value = node.outputs[0]
    raise InputError(f"{linear.name}: no residual Add follows it")


def _downstream_of(value: ir.Value, node: ir.Node) -> bool:
    """Whether ``value`` is computed from ``node``'s outputs (a backward walk over producers)."""
    stack, seen = [value], set()
    while stack:
        v = stack.pop()
        producer = v.producer()
        if producer is None or id(producer) in seen:
            continue
        if producer is node:
            return True
        seen.add(id(producer))
        stack.extend(i for i in producer.inputs if i is not None)
    return False


def _group_inputs(block: DecoderBlock) -> dict[str, ir.Value]:
    groups = {}
    for name, linears in block.groups().items():
        inputs = {id(lin.input) for lin in linears}
        if len(inputs) != 1:
            raise InputError(f"decoder block {block.index}: the {name} linears do not read one input")
        groups[name] = linears[0].input
    return groups


def prefix_values(graph: ir.Graph, h0: ir.Value) -> set[ir.Value]:
    """The values of the prefix of a graph cut at ``h0``: outputs of nodes that depend on a graph input but not on the
    data of ``h0`` (its ``Shape`` is allowed); what :class:`BlockwiseRunner` computes once per window."""
    tainted: set[int] = set()
    stack = [n for n in h0.consumers() if n.op_type not in SHAPE_OPS]
    while stack:
        node = stack.pop()
        if id(node) in tainted:
            continue
        tainted.add(id(node))
        stack.extend(c for out in node.outputs for c in out.consumers())
    dynamic: set[int] = set()
    shared: set[ir.Value] = set()
    for node in graph:  # graph order is topological
        if any(v is not None and (v.is_graph_input() or id(v.producer()) in dynamic) for v in node.inputs):
            dynamic.add(id(node))
            if id(node) not in tainted:
                shared.update(node.outputs)
    return shared


def graph_region(graph: ir.Graph, outputs: Sequence[ir.Value],
                 stops: set[ir.Value]) -> tuple[list[ir.Node], list[ir.Value]]:
    """The nodes ``outputs`` depend on, walking back to values in ``stops``, graph inputs and initializers.

    Returns the nodes in graph order and the external inputs (stop values and graph inputs they read, by name).
    """
    region: set[int] = set()
    external: dict[str, ir.Value] = {}
    stack = list(outputs)
    seen: set[ir.Value] = set()
    while stack:
        value = stack.pop()
        if value in seen:
            continue
        seen.add(value)
        if value.is_initializer():
            continue
        producer = value.producer()
        if value in stops or producer is None:
            external[value.name] = value
            continue
        if id(producer) not in region:
            region.add(id(producer))
            stack.extend(v for v in producer.inputs if v is not None)
    nodes = [n for n in graph if id(n) in region]
    return nodes, [external[name] for name in sorted(external)]


def decoder_feed(inputs: list[ir.Value], ids: np.ndarray, num_kv_heads: int, head_dim: int) -> dict[str, np.ndarray]:
    """Inputs of an optimum decoder graph for token ids ``[B, T]``: ``attention_mask`` ones, ``position_ids``
    0..T-1, and an empty KV past ``[B, num_kv_heads, 0, head_dim]``."""
    batch, length = ids.shape
    feed = {}
    for value in inputs:
        if value.name == "input_ids":
            feed[value.name] = ids
        elif value.name == "attention_mask":
            feed[value.name] = np.ones((batch, length), np.int64)
        elif value.name == "position_ids":
            feed[value.name] = np.broadcast_to(np.arange(length, dtype=np.int64), (batch, length)).copy()
        elif value.name.startswith("past_key_values."):
            feed[value.name] = np.zeros((batch, num_kv_heads, 0, head_dim), value.dtype.numpy())
        else:
            raise InputError(f"calibration cannot feed the graph input {value.name!r}")
    return feed


def embedded_tensor(value: ir.Value) -> onnx.TensorProto:
    """The initializer's tensor with its data in the proto (also when the model keeps it in an external file)."""
    tensor = value.const_value
    return ir.serde.serialize_tensor(ir.Tensor(tensor.numpy(), dtype=tensor.dtype, name=value.name))


def reference_folder(tensor: ir.ExternalTensor) -> str | None:
    """The folder from which onnxruntime can read ``tensor`` by its location, or None: onnxruntime refuses absolute
    locations and files that resolve outside the folder (e.g. a Hugging Face cache's symlinks into ``../../blobs``)."""
    location = str(tensor.location)
    if os.path.isabs(location):
        return None
    folder = os.path.realpath(tensor.base_dir or ".")
    return folder if os.path.realpath(os.path.join(folder, location)).startswith(folder + os.sep) else None


def subgraph_proto(model: ir.Model, nodes: list[ir.Node], inputs: list[ir.Value], outputs: list[ir.Value],
                   sample_feeds: dict[str, np.ndarray]) -> tuple[onnx.ModelProto, str | None]:
    """A model of ``nodes`` (a region of ``model.graph``) with the initializers they read and the model's
    functions and opset imports, and the folder its external data is read from (or None); inputs without a type in
    the graph take the dtype of ``sample_feeds``.

    Initializers the model keeps in an external file stay references to that file (onnxruntime reads them itself:
    no copy of them in the serialized bytes); when they come from several folders, those outside the folder holding
    most of their bytes, or that onnxruntime would refuse (:func:`reference_folder`), are embedded."""
    initializers = {id(v): v for n in nodes for v in n.inputs if v is not None and v.is_initializer()}
    view = ir.GraphView(inputs, outputs, nodes=nodes, initializers=list(initializers.values()),
                        opset_imports=dict(model.graph.opset_imports), name="region")
    proto = ir.to_proto(ir.Model(view, ir_version=model.ir_version, functions=list(model.functions.values())))
    external = {v.name: v for v in initializers.values() if isinstance(v.const_value, ir.ExternalTensor)}
    readable_from = {name: reference_folder(v.const_value) for name, v in external.items()}
    folder_bytes = collections.Counter()
    for name, value in external.items():
        if readable_from[name] is not None:
            folder_bytes[readable_from[name]] += value.const_value.nbytes
    folder = folder_bytes.most_common(1)[0][0] if folder_bytes else None
    for i, tensor in enumerate(proto.graph.initializer):
        if tensor.name in external and (folder is None or readable_from[tensor.name] != folder):
            proto.graph.initializer[i].CopyFrom(embedded_tensor(external[tensor.name]))
    for info in proto.graph.input:
        if not info.type.tensor_type.elem_type:
            dtype = onnx.helper.np_dtype_to_tensor_dtype(sample_feeds[info.name].dtype)
            info.type.CopyFrom(onnx.helper.make_tensor_type_proto(dtype, None))
    return proto, folder


Head = Callable[[onnx.ModelProto], None]


def gram_head(acts: formats.MXFormat, widths: dict[str, int], scales: dict[str, np.ndarray] | None = None) -> Head:
    """A rewrite of a region's proto: each output ``x [..., K]`` named in ``widths`` (name -> K) becomes
    ``x.xtx = A^T A`` with ``A = reshape(Q_acts(x), [-1, K])`` (Gemm, transA), in place in the output list;
    static ``int8`` acts quantize with ``scales[x]`` (per channel, zero point 0), as the rewritten graph will."""
    return gram_sets_head({name: [acts] for name in widths}, widths, scales)


def gram_sets_head(acts: Mapping[str, Sequence[formats.MXFormat]], widths: dict[str, int],
                   scales: Mapping[str, np.ndarray] | None = None) -> Head:
    """:func:`gram_head` with a list of activation formats per output: ``x`` is replaced, in place in the output
    list, by one ``A^T A`` per format of ``acts[x]``, in that order."""

    def rewrite(proto: onnx.ModelProto) -> None:
        graph = proto.graph
        mx = [f for fmts in acts.values() for f in fmts if f.kind == "mx"]
        for name in dict.fromkeys(f.name for f in mx):
            _declare_quantize_dequantize(proto, formats.parse_format(name), any(f.prescaled for f in mx if f.name == name))
        outputs = list(graph.output)
        del graph.output[:]
        for out in outputs:
            if out.name not in widths:
                graph.output.append(out)
                continue
            graph.initializer.append(onnx.numpy_helper.from_array(np.array([-1, widths[out.name]], np.int64),
                                                                  f"{out.name}.rows_shape"))
            for i, fmt in enumerate(acts[out.name]):
                x, tag = out.name, out.name if i == 0 else f"{out.name}.{i}"
                if fmt.kind == "mx":
                    qdq = onnx.helper.make_node(schema.QUANTIZE_DEQUANTIZE, [x], [f"{tag}.qdq"], domain=schema.DOMAIN,
                                                **schema.format_attributes(fmt, -1))
                    qdq.overload = schema.overload(fmt)
                    graph.node.append(qdq)
                    x = qdq.output[0]
                elif fmt.kind == "int":
                    x = _append_static_int8(graph, x, scales[x])
                graph.node.extend([
                    onnx.helper.make_node("Reshape", [x, f"{out.name}.rows_shape"], [f"{tag}.rows"]),
                    onnx.helper.make_node("Gemm", [f"{tag}.rows", f"{tag}.rows"], [f"{tag}.xtx"], transA=1),
                ])
                graph.output.append(onnx.ValueInfoProto(name=f"{tag}.xtx"))

    return rewrite


def _append_static_int8(graph: onnx.GraphProto, x: str, scales: np.ndarray) -> str:
    """Append ``DequantizeLinear(QuantizeLinear(x, s, 0), s, 0)`` (int8, last axis) to ``graph``; its output name.
    The proto twin of ``passes.mx_matmul._insert_static_int8``, which puts the same pair in the rewritten graph."""
    scales = np.asarray(scales, np.float32).reshape(-1)
    graph.initializer.extend([onnx.numpy_helper.from_array(scales, f"{x}.act_scales"),
                              onnx.numpy_helper.from_array(np.zeros(scales.shape, np.int8), f"{x}.act_zero_points")])
    graph.node.extend([
        onnx.helper.make_node("QuantizeLinear", [x, f"{x}.act_scales", f"{x}.act_zero_points"], [f"{x}.int8"], axis=-1),
        onnx.helper.make_node("DequantizeLinear", [f"{x}.int8", f"{x}.act_scales", f"{x}.act_zero_points"],
                              [f"{x}.qdq"], axis=-1),
    ])
    return f"{x}.qdq"


def _declare_quantize_dequantize(proto: onnx.ModelProto, fmt: formats.MXFormat, prescaled: bool = False) -> None:
    """Make ``MXQuantizeDequantize`` of ``fmt`` usable in ``proto``: domain import and its function body (the one
    taking ``prescale`` when ``prescaled``)."""
    from mxonnx.ops.functions import function_proto

    if not any(op.domain == schema.DOMAIN for op in proto.opset_import):
        proto.opset_import.add(domain=schema.DOMAIN, version=schema.DOMAIN_VERSION)
    proto.ir_version = max(proto.ir_version, schema.IR_VERSION)
    held = [i for i, f in enumerate(proto.functions) if f.domain == schema.DOMAIN
            and f.name == schema.QUANTIZE_DEQUANTIZE and f.overload == schema.overload(fmt)]
    if held and (not prescaled or any(a.name == schema.PRESCALE_ATTR for a in proto.functions[held[0]].attribute_proto)):
        return
    if held:
        del proto.functions[held[0]]
    proto.functions.append(function_proto(schema.QUANTIZE_DEQUANTIZE, fmt, prescaled=prescaled))


def _checked_windows(windows: np.ndarray) -> np.ndarray:
    windows = np.asarray(windows)
    if windows.ndim != 2 or 0 in windows.shape or not np.issubdtype(windows.dtype, np.integer):
        raise InputError(f"calibration windows must be a non-empty [n, seqlen] integer array, "
                         f"got shape {windows.shape} of {windows.dtype}")
    return windows.astype(np.int64)


def _progress(items, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="window", disable=not enabled, leave=False)
