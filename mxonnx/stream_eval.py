"""Logits of an exported Llama computed one decoder block at a time, so that perplexity needs the memory of one block
instead of the whole model (project issue 17).

The graph is cut at the residual stream ``h_0 .. h_L``, found from the graph alone (:func:`residual_stream`): a
*residual Add* is an ``Add(s, f(s))`` whose second input is computed from its first, the *skip* ``s``; in a Llama
they form one chain (the skip of each is the output of the one before), two per decoder block (after attention and
after the MLP). ``h_0`` is the skip of the first Add and ``h_{i+1}`` the output of Add ``2i + 1``. Nothing here
looks at MatMul weights, so float graphs (float32 or 16-bit weights read through Cast), quantized graphs
(``com.mxonnx`` ops, fused or not) and lowered ones (inlined, DequantizeLinear, MatMulNBits) are cut the same way.

:class:`StreamedCausalLM` runs, for a chunk of windows: the *prefix* (embedding, rotary tables, mask: every node that
does not read the data of ``h_0``) once per window; then each block ``i`` over all windows of the chunk in one
session (the window's ``h_i`` replaced by ``h_{i+1}`` as it comes); then the *head* (final norm and lm_head) per
window, whose logits are handed out one window at a time. One session, that is one region's weights, is open at a
time; the hidden states of a chunk take at most ``state_budget`` bytes (more windows make more chunks, each going
through every block again). Every value is the one the whole graph computes, by the same ops; the regions keep the
shapes ONNX infers on the whole graph, so that onnxruntime folds and fuses each the way it does the whole graph
(on the 7B-shaped float16, MXINT4 and lowered graphs the logits are bit-identical to the whole-graph session's).

Which path ``mxonnx eval`` takes: block by block with ``--blockwise``, whole with ``--no-blockwise``, and by default
block by block when :func:`whole_graph_bytes` (the weights a whole-graph session would hold, float32 copies of
16-bit weights included) exceeds :func:`eval_budget` (1 GiB, at most half the available memory;
``MXONNX_EVAL_BUDGET_MB`` overrides it).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from mxonnx.blockwise import decoder_feed, graph_region, prefix_values, subgraph_proto
from mxonnx.errors import InputError

STATE_BUDGET_BYTES = 1 << 30  # hidden states of the windows of one chunk
EVAL_BUDGET_BYTES = 1 << 30  # larger estimated whole-graph sessions are evaluated block by block
BUDGET_ENV = "MXONNX_EVAL_BUDGET_MB"
PASS_THROUGH = ("Cast", "Identity")
EXPANDED_DTYPES = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)


def _is_computed(value: ir.Value | None) -> bool:
    """Whether ``value`` is the output of a node other than ``Constant`` (not an initializer or graph input)."""
    if value is None or value.is_initializer():
        return False
    producer = value.producer()
    return producer is not None and producer.op_type != "Constant"


def _depends_on(value: ir.Value, ancestor: ir.Value, order: dict[int, int]) -> bool:
    """Whether ``value`` is computed from ``ancestor``: a backward walk over producers that skips every node placed
    before ``ancestor``'s producer (graph order is topological, so those cannot read it)."""
    start = order[id(ancestor.producer())]
    stack, seen = [value], set()
    while stack:
        v = stack.pop()
        if v is ancestor:
            return True
        producer = v.producer()
        if producer is None or id(producer) in seen or order.get(id(producer), -1) <= start:
            continue
        seen.add(id(producer))
        stack.extend(i for i in producer.inputs if i is not None)
    return False


def residual_adds(graph: ir.Graph) -> dict[int, tuple[ir.Node, ir.Value]]:
    """Every ``Add(s, f(s))`` of ``graph`` (either input order), by id of the node: ``(node, skip s)``."""
    order = {id(node): i for i, node in enumerate(graph)}
    found = {}
    for node in graph:
        if node.op_type != "Add" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
            continue
        a, b = node.inputs
        if not (_is_computed(a) and _is_computed(b)) or a is b:
            continue
        if _depends_on(b, a, order):
            found[id(node)] = (node, a)
        elif _depends_on(a, b, order):
            found[id(node)] = (node, b)
    return found


def _before_casts(value: ir.Value) -> ir.Value:
    """``value`` followed back through ``Cast`` and ``Identity`` nodes (an RMSNorm may cast the stream to float32
    before the residual Add reads it)."""
    while (producer := value.producer()) is not None and producer.op_type in PASS_THROUGH and _is_computed(
            producer.inputs[0]):
        value = producer.inputs[0]
    return value


def residual_chain(graph: ir.Graph) -> tuple[list[ir.Node], ir.Value]:
    """The longest chain of residual Adds of ``graph`` (each one's skip the previous one's output, maybe through
    Cast/Identity), two per decoder block, and the skip of its first Add."""
    adds = residual_adds(graph)
    following: dict[int, list[ir.Node]] = {}
    for node, skip in adds.values():
        following.setdefault(id(_before_casts(skip)), []).append(node)
    outputs = {id(node.outputs[0]) for node, _ in adds.values()}
    best: list[ir.Node] = []
    for node, skip in adds.values():
        if id(_before_casts(skip)) in outputs:
            continue  # not the head of a chain
        chain = [node]
        while len(nxt := following.get(id(chain[-1].outputs[0]), [])) == 1:
            chain.append(nxt[0])
        if len(chain) > len(best):
            best = chain
    if len(best) < 2 or len(best) % 2:
        raise InputError(f"cannot cut the graph into decoder blocks: its longest chain of residual Adds has "
                         f"{len(best)} (a Llama has two per block)")
    return best, adds[id(best[0])][1]


def residual_stream(graph: ir.Graph) -> list[ir.Value]:
    """``[h_0, ..., h_L]``: ``h_0`` the skip of the first residual Add and ``h_{i+1}`` the output of Add ``2i + 1``
    (block ``i``'s MLP residual)."""
    chain, h0 = residual_chain(graph)
    return [h0, *(node.outputs[0] for node in chain[1::2])]


def _kv_shape(graph: ir.Graph, config) -> tuple[int, int]:
    """``(num_kv_heads, head_dim)`` of the KV-cache inputs, from their static dims or else from the model config."""
    past = [v for v in graph.inputs if v.name.startswith("past_key_values.")]
    if not past:
        return 0, 0
    dims = list(past[0].shape or [])
    if len(dims) == 4 and isinstance(dims[1], int) and isinstance(dims[3], int):
        return dims[1], dims[3]
    if config is None:
        raise InputError(f"{past[0].name} has symbolic head dims and no model config was found to read them from")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return getattr(config, "num_key_value_heads", config.num_attention_heads), head_dim


def _fuse_linears(model: ir.Model) -> None:
    """Fuse the quantized linears into ``MXMatMul`` as ``create_session(fuse=True)`` does for files."""
    from mxonnx.ops import schema
    from mxonnx.passes.fuse_mx_matmul import fuse_mx_matmuls

    if schema.DOMAIN in model.graph.opset_imports:
        fuse_mx_matmuls(model)


def _infer_shapes(model: ir.Model) -> None:
    """Annotate the values of ``model`` with their (symbolic) shapes, as far as ONNX infers them; reads no weight
    data, and leaves the model as it was if inference fails.

    onnxruntime folds shape computations only where it knows the shapes: a block session whose hidden-state input had
    no shape would, e.g., not fold the attention scale computed from ``Shape(q)`` into a ``FusedMatMul`` as the
    whole-graph session does, and would round differently."""
    from onnx_ir.passes.common import ShapeInferencePass

    ShapeInferencePass(strict_mode=False)(model)


def _complete_shapes(boundaries: list[ir.Value]) -> None:
    """A boundary whose shape stays unknown (after an op ONNX cannot infer, e.g. MatMulNBits) takes ``h_0``'s: every
    value of the residual stream has that shape."""
    h0 = boundaries[0]
    for value in boundaries[1:]:
        if value.shape is None and h0.shape is not None:
            value.shape = h0.shape
        if value.type is None and h0.type is not None:
            value.type = h0.type


class Region:
    """Nodes of the graph computing ``outputs`` from ``inputs`` (stop values, graph inputs): one session."""

    def __init__(self, name: str, nodes: list[ir.Node], inputs: list[ir.Value], outputs: list[ir.Value]):
        self.name, self.nodes, self.inputs, self.outputs = name, nodes, inputs, outputs


class StreamedCausalLM:
    """Per-window logits of an optimum Llama graph (``input_ids`` -> ``logits``) computed region by region.

    Windows get the graph inputs of :func:`mxonnx.blockwise.decoder_feed` (all-ones mask, positions ``0..T-1``,
    empty KV past), as the whole-graph evaluation feeds them.
    """

    def __init__(self, onnx_path: Path, config=None, threads: int | None = None, progress: bool = False,
                 state_budget: int = STATE_BUDGET_BYTES, fuse: bool = False):
        self.model = ir.load(os.fspath(onnx_path))
        graph = self.model.graph
        if "input_ids" not in {v.name for v in graph.inputs} or "logits" not in {v.name for v in graph.outputs}:
            raise InputError(f"{onnx_path}: not a causal language model graph (needs input_ids and logits)")
        self.threads, self.progress, self.state_budget = threads, progress, state_budget
        self.kv_shape = _kv_shape(graph, config)
        _infer_shapes(self.model)
        if fuse:
            _fuse_linears(self.model)
        self.boundaries = residual_stream(graph)
        _complete_shapes(self.boundaries)
        self.shared = prefix_values(graph, self.boundaries[0])
        logits = next(v for v in graph.outputs if v.name == "logits")
        self.blocks = [self._region(f"block {i}", [self.boundaries[i + 1]], i) for i in range(self.num_blocks)]
        self.head = self._region("head", [logits], self.num_blocks)
        read = {v for region in (*self.blocks, self.head) for v in region.inputs} & self.shared
        h0 = self.boundaries[0]
        outputs = [h0, *sorted(read - {h0}, key=lambda v: v.name)]
        self.prefix = Region("prefix", *graph_region(graph, outputs, set()), outputs)

    @property
    def num_blocks(self) -> int:
        return len(self.boundaries) - 1

    def _region(self, name: str, outputs: list[ir.Value], start: int) -> Region:
        """The nodes computing ``outputs`` from ``h_start`` and the prefix values; refuses a region that computes
        another boundary (a skip connection across blocks)."""
        stops = self.shared | {self.boundaries[start]}
        nodes, inputs = graph_region(self.model.graph, outputs, stops)
        inner = {id(n) for n in nodes}
        for j, h in enumerate(self.boundaries):
            if j != start + 1 and id(h.producer()) in inner:
                raise InputError(f"cannot run the graph block by block: {name} recomputes {h.name!r}, the input of "
                                 f"block {j}")
        return Region(name, nodes, inputs, outputs)

    def window_logits(self, windows: np.ndarray) -> Iterator[np.ndarray]:
        """``[T, V]`` logits of each window of ``windows`` ``[n, T]``, in order."""
        from tqdm.auto import tqdm

        windows = np.asarray(windows, dtype=np.int64)
        with tqdm(total=len(windows) * (self.num_blocks + 2), desc="perplexity (blockwise)", unit="pass",
                  disable=not self.progress) as bar:
            start = 0
            while start < len(windows):
                states, shared = self._run_prefix(windows, start, bar)
                chunk = windows[start:start + len(states)]
                for block in self.blocks:
                    self._advance(block, chunk, states, shared, bar)
                for i, array in enumerate(self._run(self.head, chunk, states, shared, bar)):
                    states[i] = None  # the head's input is not needed again
                    yield array[0][0]
                start += len(chunk)

    def _run_prefix(self, windows: np.ndarray, start: int, bar) -> tuple[list[np.ndarray], list[dict]]:
        """Hidden states ``h_0`` and prefix values of the windows from ``start`` on, as many as ``state_budget`` holds
        (at least one)."""
        session, names, out_names = self._session(self.prefix, windows[start])
        states: list[np.ndarray] = []
        shared: list[dict[str, np.ndarray]] = []
        used = 0
        for window in windows[start:]:
            arrays = session.run(out_names, self._feeds(names, window, None, None))
            states.append(arrays[0])
            values = zip(self.prefix.outputs[1:], arrays[1:])
            shared.append({v.name: _same_as_first(shared, v.name, a) for v, a in values})
            used += arrays[0].nbytes
            bar.update()
            if used + arrays[0].nbytes > self.state_budget:
                break
        return states, shared

    def _advance(self, block: Region, chunk: np.ndarray, states: list, shared: list[dict], bar) -> None:
        """Replace each window's hidden state by the block's output (one window at a time)."""
        for i, arrays in enumerate(self._run(block, chunk, states, shared, bar)):
            states[i] = arrays[0]

    def _run(self, region: Region, chunk: np.ndarray, states: list, shared: list[dict], bar) -> Iterator[list]:
        """Open ``region``'s session and yield its outputs for every window of the chunk; the session is closed when
        the last window is done."""
        session, names, out_names = self._session(region, chunk[0], states[0], shared[0])
        for i, window in enumerate(chunk):
            arrays = session.run(out_names, self._feeds(names, window, states[i], shared[i]))
            bar.update()
            yield arrays
        del session

    def _session(self, region: Region, window: np.ndarray, state=None, shared=None):
        """``(session, input names, output names)`` of ``region``, its initializers read by onnxruntime from the
        model's external data file."""
        names = [v.name for v in region.inputs]
        proto, folder = subgraph_proto(self.model, region.nodes, region.inputs, region.outputs,
                                       self._feeds(names, window, state, shared))
        session = open_region_session(proto.SerializeToString(), folder, self.threads)
        del proto
        return session, names, [v.name for v in region.outputs]

    def _feeds(self, names: list[str], window: np.ndarray, state, shared) -> dict[str, np.ndarray]:
        """The arrays named ``names`` for one window: graph inputs, the window's hidden state, its prefix values."""
        graph_feed = decoder_feed(list(self.model.graph.inputs), window[None], *self.kv_shape)
        feeds = {}
        for name in names:
            if name in graph_feed:
                feeds[name] = graph_feed[name]
            elif shared is not None and name in shared:
                feeds[name] = shared[name]
            else:
                feeds[name] = state
        return feeds


def open_region_session(model: bytes, folder: str | None, threads: int | None = None):
    """An onnxruntime session on a region's serialized model, with the options of ``mxonnx.session`` (native library
    registered) but no memory arena and no memory pattern: intermediates (a 2048-token window's attention scores are
    512 MB each) are freed as soon as they are dead, and everything when the session closes. With them, one block of
    a 7B-shaped model held 4.1 GB of activations at 2048 tokens instead of 2.3 GB, and the memory that closed
    sessions left behind grew with the number of blocks run."""
    import onnxruntime as ort

    from mxonnx.session import EXTERNAL_DATA_FOLDER_CONFIG, session_options

    so = session_options(threads=threads)
    so.enable_cpu_mem_arena = False
    so.enable_mem_pattern = False
    if folder is not None:
        so.add_session_config_entry(EXTERNAL_DATA_FOLDER_CONFIG, str(Path(folder).resolve()))
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def _same_as_first(shared: list[dict[str, np.ndarray]], name: str, array: np.ndarray) -> np.ndarray:
    """``array``, or the equal array of the chunk's first window (masks and rotary tables of windows of one length
    are the same: one copy for the chunk)."""
    first = shared[0][name] if shared else None
    return first if first is not None and np.array_equal(first, array) else array


def whole_graph_bytes(onnx_path: Path, native: bool | None = None) -> int:
    """Estimated weight memory of one onnxruntime session on the whole graph, read without loading weight data:
    the graph file and the external data it reads, plus a float32 copy of each float16/bfloat16 initializer
    (onnxruntime constant-folds their Cast) and, without the native library, of each packed MX weight (its ONNX
    function body is folded too)."""
    from mxonnx.inspect import stored_bytes
    from mxonnx.session import native_enabled

    native = native_enabled(True) if native is None else native
    model = onnx.load(os.fspath(onnx_path), load_external_data=False)
    total = Path(onnx_path).stat().st_size
    for tensor in model.graph.initializer:
        numel = int(np.prod(tensor.dims, dtype=np.int64))
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            total += stored_bytes(tensor)  # embedded ones are in the graph file's size
        if tensor.data_type in EXPANDED_DTYPES or (not native and len(tensor.dims) == 2 and tensor.data_type in (
                onnx.TensorProto.INT4, onnx.TensorProto.UINT4, onnx.TensorProto.INT8, onnx.TensorProto.UINT8)):
            total += 4 * numel
    return total


def eval_budget() -> int:
    """Bytes of whole-graph session allowed: ``MXONNX_EVAL_BUDGET_MB`` if set, else ``EVAL_BUDGET_BYTES`` but at most
    half the memory available now."""
    value = os.environ.get(BUDGET_ENV)
    if value:
        try:
            return int(float(value) * 2**20)
        except ValueError:
            raise InputError(f"{BUDGET_ENV}={value!r} is not a number of megabytes") from None
    available = _available_bytes()
    return EVAL_BUDGET_BYTES if available is None else min(EVAL_BUDGET_BYTES, available // 2)


def _available_bytes() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def choose_blockwise(onnx_path: Path, requested: bool | None) -> bool:
    """Whether to evaluate block by block: as ``requested``, or (None) when :func:`whole_graph_bytes` exceeds
    :func:`eval_budget`."""
    if requested is not None:
        return requested
    return whole_graph_bytes(onnx_path) > eval_budget()
