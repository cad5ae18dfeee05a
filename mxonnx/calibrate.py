"""Calibration statistics of the linear inputs, collected by running onnxruntime over calibration windows.

Every decoder block has four linear inputs (one per group of linears reading the same tensor):
``layers.{i}.qkv`` (attention norm output), ``layers.{i}.o``, ``layers.{i}.gate_up`` (MLP norm output) and
``layers.{i}.down``. For each, over all calibration tokens ``x_t [K]``:

    max_abs_j = max_t |x_tj|   (SmoothQuant, paper Eq. 3)      mean_abs_j = mean_t |x_tj|   (AWQ, paper Eq. 5)
    xtx = sum_t x_t^T x_t  (float64; the GPTQ Hessian is H = 2/n xtx, paper Eq. 7)

plus, on request, a bounded random sample of raw input rows (for AWQ's search).

The inputs are exposed as the outputs of a pruned view of the graph (only the nodes they depend on), serialized
without weight data: the weights become graph inputs bound to the numpy arrays of the ``ir.Model``, so the model
is never copied. The per-channel reductions run inside onnxruntime; windows run one at a time (batch 1, empty KV
past) and are folded into running statistics at once.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import onnx
import onnx.numpy_helper
import onnx_ir as ir
import onnxruntime as ort

from mxonnx.config import QuantizeConfig, default_calib_text
from mxonnx.errors import InputError
from mxonnx.gptq import HessianAccumulator
from mxonnx.passes.llama_structure import DecoderBlock, Linear

INLINE_ELEMENTS = 1024  # tensors smaller than this are embedded in the serialized graph


@dataclasses.dataclass(frozen=True)
class ActivationStats:
    """Per-channel statistics of one linear input ``x [tokens, K]``."""

    max_abs: np.ndarray  # [K] float32
    mean_abs: np.ndarray  # [K] float32
    count: int  # tokens seen
    xtx: np.ndarray | None = None  # [K, K] float64, sum_t x_t^T x_t
    sample: np.ndarray | None = None  # [n, K] float32 rows drawn at random from the calibration tokens

    @property
    def hessian(self) -> np.ndarray:
        """GPTQ's ``H = 2/n sum_t x_t^T x_t`` (paper Eq. 7)."""
        if self.xtx is None:
            raise ValueError("statistics were collected without hessians=True")
        return self.xtx * (2.0 / self.count)


class _Accumulator:
    """Running reductions of one linear input, fed one window at a time."""

    def __init__(self, k: int, hessian: bool, sample_tokens: int):
        self.max_abs = np.zeros(k, np.float32)
        self.sum_abs = np.zeros(k, np.float64)
        self.count = 0
        self.gram = HessianAccumulator(k) if hessian else None
        self.rows: list[np.ndarray] = []
        self.sample_tokens = sample_tokens

    def add(self, tokens: int, max_abs: np.ndarray, sum_abs: np.ndarray, rows: np.ndarray | None,
            x: np.ndarray | None) -> None:
        """One window of ``tokens`` tokens: its per-channel max and sum of |x|, sampled rows ``[r, K]`` and, for
        the Hessian, all its rows ``x [tokens, K]``."""
        np.maximum(self.max_abs, max_abs, out=self.max_abs)
        self.sum_abs += sum_abs
        self.count += tokens
        if rows is not None and len(rows):
            self.rows.append(np.asarray(rows, np.float32))
        if self.gram is not None:
            self.gram.add_batch(x)

    def result(self) -> ActivationStats:
        mean_abs = (self.sum_abs / max(self.count, 1)).astype(np.float32)
        sample = np.concatenate(self.rows) if self.sample_tokens else None
        xtx = self.gram.xtx if self.gram is not None else None
        return ActivationStats(self.max_abs, mean_abs, self.count, xtx, sample)


def load_tokenizer(folder: str | os.PathLike | None):
    """The Hugging Face tokenizer saved in a model folder."""
    from transformers import AutoTokenizer

    from mxonnx.export import quiet_libraries

    if folder is None or not Path(folder).is_dir():
        raise InputError("calibration needs the model folder with its tokenizer, not a bare .onnx file")
    try:
        with quiet_libraries():
            return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError):
        raise InputError(f"{folder}: no tokenizer found in the model folder") from None


def calibration_windows(text_path: str | os.PathLike, tokenizer, n: int, seqlen: int, seed: int) -> np.ndarray:
    """``[n, seqlen]`` int64 token windows starting at ``n`` offsets drawn uniformly with ``seed`` from the
    tokenized text (the whole file, tokenized once with the tokenizer's default special tokens)."""
    from mxonnx.export import quiet_libraries

    path = Path(text_path)
    if not path.is_file():
        raise InputError(f"{path}: no such calibration text (set --calib or MXONNX_DATA)")
    with quiet_libraries():  # hides "sequence longer than the model's maximum length"
        ids = np.asarray(tokenizer(path.read_text(encoding="utf-8"))["input_ids"], dtype=np.int64)
    if len(ids) < seqlen:
        raise InputError(f"{path}: {len(ids)} tokens, fewer than one calibration window of {seqlen}")
    starts = np.random.default_rng(seed).integers(0, len(ids) - seqlen + 1, size=n)
    return ids[starts[:, None] + np.arange(seqlen)]


def group_key(block: DecoderBlock, group: str) -> str:
    """``layers.{i}.{group}``: the key of a linear group's statistics (and of its GPTQ Hessian)."""
    return f"layers.{block.index}.{group}"


def linear_groups(blocks: Iterable[DecoderBlock]) -> dict[str, list[Linear]]:
    """The linears of every decoder block grouped by shared input, keyed by ``group_key``."""
    return {group_key(b, group): linears for b in blocks for group, linears in b.groups().items()}


def _dependencies(outputs: list[ir.Value]) -> tuple[list[ir.Node], set[int]]:
    """The nodes the ``outputs`` depend on (in no order) and the ids of the values those nodes read."""
    nodes, read, stack = {}, set(), [v.producer() for v in outputs if v.producer() is not None]
    while stack:
        node = stack.pop()
        if id(node) in nodes:
            continue
        nodes[id(node)] = node
        for value in node.inputs:
            if value is not None:
                read.add(id(value))
                if value.producer() is not None:
                    stack.append(value.producer())
    return list(nodes.values()), read


def _weight_input(value: ir.Value) -> onnx.ValueInfoProto:
    tensor = value.const_value
    return onnx.helper.make_tensor_value_info(value.name, tensor.dtype.value, list(tensor.shape.numpy()))


def _embedded(value: ir.Value) -> onnx.TensorProto:
    """The tensor with its data in the proto (also when the model keeps it in an external file)."""
    tensor = value.const_value
    return ir.serde.serialize_tensor(ir.Tensor(tensor.numpy(), dtype=tensor.dtype, name=value.name))


def _shares_numpy(value: ir.Value) -> bool:
    tensor = value.const_value
    return tensor.size >= INLINE_ELEMENTS and tensor.dtype.numpy().kind in "fiub" and tensor.dtype.numpy().isbuiltin


class ExposedSession:
    """An onnxruntime session computing ``values`` (any values of ``model``) as its outputs, in that order.

    The graph is pruned to what the values depend on. Large weights are not serialized: they become graph inputs
    bound once to the model's own arrays (``OrtValue``s share numpy memory), so the model is not copied and no
    optimizer or weight pre-packing duplicates them. ``head(graph_proto, opset)`` may rewrite the serialized
    graph's outputs (``output_names`` follows it)."""

    def __init__(self, model: ir.Model, values: list[ir.Value], threads: int | None = None,
                 head: Callable[[onnx.GraphProto, int], None] | None = None):
        from mxonnx.session import session_options

        graph = model.graph
        needed, read = _dependencies(values)
        order = {id(node): i for i, node in enumerate(graph)}
        inputs = [v for v in graph.inputs if id(v) in read]
        initializers = [v for v in graph.initializers.values() if id(v) in read]
        bound = [v for v in initializers if _shares_numpy(v)]
        view = ir.GraphView(inputs, values, nodes=sorted(needed, key=lambda n: order[id(n)]),
                            opset_imports=graph.opset_imports, name=graph.name)
        proto = onnx.ModelProto(ir_version=model.ir_version)
        ir.serde.serialize_graph_into(proto.graph, view, model_ir_version=model.ir_version)
        proto.graph.initializer.extend(_embedded(v) for v in initializers if not _shares_numpy(v))
        proto.graph.input.extend(_weight_input(v) for v in bound)
        for domain, version in graph.opset_imports.items():
            proto.opset_import.add(domain=domain, version=version)
        proto.functions.extend(ir.serde.serialize_function(f) for f in model.functions.values())
        if head is not None:
            head(proto.graph, graph.opset_imports.get("", 1))
        options = session_options(threads=threads)
        options.enable_mem_pattern = False  # the planned block would come on top of the arena: ~2x activations
        self.session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        self.binding = self.session.io_binding()
        self.weights = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v.const_value.numpy())) for v in bound]
        for value, weight in zip(bound, self.weights):  # self.weights keeps the arrays alive for the session
            self.binding.bind_ortvalue_input(value.name, weight)
        self.inputs = inputs
        self.output_names = [o.name for o in proto.graph.output]

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The outputs for ``feed`` (the graph's data inputs; the weights are bound already)."""
        for name, array in feed.items():
            self.binding.bind_cpu_input(name, array)
        self.binding.clear_binding_outputs()  # output shapes change between runs: let onnxruntime allocate
        for name in self.output_names:
            self.binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(self.binding)
        return [value.numpy() for value in self.binding.get_outputs()]


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


SAMPLE_ROWS = "mxonnx_sample_rows"  # extra int64 input of the calibration graph: token rows to sample
_AXES = "mxonnx_batch_and_time_axes"


def _reduce(op: str, x: str, out: str, opset: int) -> onnx.NodeProto:
    """``op`` over axes 0 and 1 (batch, time) without keeping them, for the graph's opset."""
    if opset >= (13 if op == "ReduceSum" else 18):
        return onnx.helper.make_node(op, [x, _AXES], [out], keepdims=0)
    return onnx.helper.make_node(op, [x], [out], axes=[0, 1], keepdims=0)


def statistics_head(sample: bool, raw: bool) -> Callable[[onnx.GraphProto, int], None]:
    """A rewrite of the calibration graph: each output ``x [B, T, K]`` becomes ``x.max_abs`` and ``x.sum_abs``
    (``[K]``, over B and T), plus ``x.rows`` (``x[:, rows]``, rows the extra input ``SAMPLE_ROWS``) when
    ``sample`` and ``x`` itself when ``raw``. Reducing inside onnxruntime keeps the fetched outputs small."""

    def rewrite(graph: onnx.GraphProto, opset: int) -> None:
        names = [o.name for o in graph.output]
        del graph.output[:]
        graph.initializer.append(onnx.numpy_helper.from_array(np.array([0, 1], np.int64), _AXES))
        if sample:
            graph.input.append(onnx.helper.make_tensor_value_info(SAMPLE_ROWS, onnx.TensorProto.INT64, ["rows"]))
        for x in names:
            suffixes = ["max_abs", "sum_abs"] + ["rows"] * sample
            graph.node.extend([onnx.helper.make_node("Abs", [x], [f"{x}.abs"]),
                               _reduce("ReduceMax", f"{x}.abs", f"{x}.max_abs", opset),
                               _reduce("ReduceSum", f"{x}.abs", f"{x}.sum_abs", opset)])
            if sample:
                graph.node.append(onnx.helper.make_node("Gather", [x, SAMPLE_ROWS], [f"{x}.rows"], axis=1))
            graph.output.extend(onnx.ValueInfoProto(name=f"{x}.{suffix}") for suffix in suffixes)
            if raw:
                graph.output.append(onnx.ValueInfoProto(name=x))

    return rewrite


def collect_statistics(model: ir.Model, blocks: list[DecoderBlock], tokenizer_folder: str | os.PathLike | None,
                       config: QuantizeConfig, hessians: bool = False, sample_tokens: int = 0,
                       groups: Iterable[str] | None = None, threads: int | None = None) -> dict[str, ActivationStats]:
    """Statistics of the linear inputs of ``blocks`` (found on ``model``) over ``config.calib_samples`` windows of
    ``config.calib_seqlen`` tokens of ``config.calib_path`` (default: WikiText-2 validation).

    ``hessians`` adds ``xtx`` (each window's inputs are then fetched whole); ``sample_tokens`` keeps that many
    random input rows per group (the same tokens for every group, spread evenly over the windows); ``groups``
    restricts the work to some keys of ``linear_groups(blocks)``."""
    from tqdm import tqdm

    exposed = linear_groups(blocks)
    if groups is not None:
        unknown = sorted(set(groups) - set(exposed))
        if unknown:
            raise InputError(f"no linear group {unknown[0]!r} in the model")
        exposed = {key: exposed[key] for key in groups}
    windows = calibration_windows(config.calib_path or default_calib_text(), load_tokenizer(tokenizer_folder),
                                  config.calib_samples, config.calib_seqlen, config.seed)
    session = ExposedSession(model, [linears[0].input for linears in exposed.values()], threads=threads,
                             head=statistics_head(sample=sample_tokens > 0, raw=hessians))
    accumulators = [_Accumulator(linears[0].shape[0], hessians, sample_tokens) for linears in exposed.values()]
    per_group = 2 + (sample_tokens > 0) + hessians
    rng = np.random.default_rng(config.seed)
    rows_per_window, sampled = -(-sample_tokens // len(windows)), 0
    kv_heads, head_dim = blocks[0].num_kv_heads, blocks[0].head_dim
    for ids in tqdm(windows, desc="calibrate", unit="window", disable=not config.progress, leave=False):
        feed = decoder_feed(session.inputs, ids[None], kv_heads, head_dim)
        if sample_tokens:
            take = min(rows_per_window, sample_tokens - sampled, len(ids))
            feed[SAMPLE_ROWS] = np.sort(rng.choice(len(ids), size=take, replace=False)).astype(np.int64)
            sampled += take
        outputs = session.run(feed)
        for i, accumulator in enumerate(accumulators):
            got = iter(outputs[i * per_group : (i + 1) * per_group])
            max_abs, sum_abs = next(got), next(got)
            rows = next(got)[0] if sample_tokens else None
            x = next(got).reshape(-1, max_abs.shape[0]) if hessians else None
            accumulator.add(len(ids), max_abs, sum_abs, rows, x)
        del outputs
    return {key: acc.result() for key, acc in zip(exposed, accumulators)}
