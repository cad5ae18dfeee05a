"""Calibration statistics of the linear inputs, collected by running onnxruntime over calibration windows.

Every decoder block has four linear inputs (one per group of linears reading the same tensor):
``layers.{i}.qkv`` (attention norm output), ``layers.{i}.o``, ``layers.{i}.gate_up`` (MLP norm output) and
``layers.{i}.down``. For each, over all calibration tokens ``x_t [K]``:

    max_abs_j = max_t |x_tj|   (SmoothQuant, paper Eq. 3)      mean_abs_j = mean_t |x_tj|   (AWQ, paper Eq. 5)
    xtx = sum_t x_t^T x_t  (float64; the GPTQ Hessian is H = 2/n xtx, paper Eq. 7)

plus, on request, a bounded random sample of raw input rows (for AWQ's search).

The inputs are exposed as the outputs of a pruned view of the graph (only the nodes they depend on), serialized
without weight data: the weights are handed to onnxruntime as external initializers that share the numpy
arrays of the ``ir.Model``, so the model is never copied. Windows run one at a time (batch 1, empty KV past) and
are reduced at once; only the running statistics stay in memory.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from mxonnx.config import QuantizeConfig, default_calib_text
from mxonnx.errors import InputError
from mxonnx.passes.llama_structure import DecoderBlock, Linear

PLACEHOLDER_FILE = "weights-given-by-session"  # an empty file: every tensor pointing to it is supplied by the session
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
    """Running reductions of one linear input; ``add`` takes one window's rows ``[T, K]``."""

    def __init__(self, k: int, hessian: bool, sample_rows: int, rows_per_window: int, rng: np.random.Generator):
        self.max_abs = np.zeros(k, np.float32)
        self.sum_abs = np.zeros(k, np.float64)
        self.count = 0
        self.xtx = np.zeros((k, k), np.float64) if hessian else None
        self.sample = np.empty((sample_rows, k), np.float32)
        self.sampled = 0
        self.rows_per_window, self.rng = rows_per_window, rng

    def add(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float32)
        magnitude = np.abs(x)
        np.maximum(self.max_abs, magnitude.max(axis=0), out=self.max_abs)
        self.sum_abs += magnitude.sum(axis=0, dtype=np.float64)
        self.count += x.shape[0]
        if self.xtx is not None:
            self.xtx += x.T @ x
        take = min(self.rows_per_window, len(self.sample) - self.sampled, x.shape[0])
        if take:
            rows = self.rng.choice(x.shape[0], size=take, replace=False)
            self.sample[self.sampled : self.sampled + take] = x[np.sort(rows)]
            self.sampled += take

    def result(self) -> ActivationStats:
        mean_abs = (self.sum_abs / max(self.count, 1)).astype(np.float32)
        sample = self.sample[: self.sampled] if len(self.sample) else None
        return ActivationStats(self.max_abs, mean_abs, self.count, self.xtx, sample)


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


def _placeholder(value: ir.Value) -> onnx.TensorProto:
    tensor = value.const_value
    proto = onnx.TensorProto(name=value.name, data_type=tensor.dtype.value, dims=list(tensor.shape.numpy()))
    proto.data_location = onnx.TensorProto.EXTERNAL
    proto.external_data.add(key="location", value=PLACEHOLDER_FILE)
    return proto


def _embedded(value: ir.Value) -> onnx.TensorProto:
    """The tensor with its data in the proto (also when the model keeps it in an external file)."""
    tensor = value.const_value
    return ir.serde.serialize_tensor(ir.Tensor(tensor.numpy(), dtype=tensor.dtype, name=value.name))


def _shares_numpy(value: ir.Value) -> bool:
    tensor = value.const_value
    return tensor.size >= INLINE_ELEMENTS and tensor.dtype.numpy().kind in "fiub" and tensor.dtype.numpy().isbuiltin


class ExposedSession:
    """An onnxruntime session computing ``values`` (any values of ``model``) as its outputs, in that order.

    The graph is pruned to what the values depend on. Large weights are not serialized: the graph names them
    as external data in an empty placeholder file and the session options supply the model's own arrays
    (``add_initializer`` shares the memory; ``keep`` holds the arrays for the session's lifetime). Weight
    pre-packing is off, as it would copy every MatMul weight."""

    def __init__(self, model: ir.Model, values: list[ir.Value], threads: int | None = None):
        from mxonnx.session import session_options

        graph = model.graph
        needed, read = _dependencies(values)
        order = {id(node): i for i, node in enumerate(graph)}
        inputs = [v for v in graph.inputs if id(v) in read]
        initializers = [v for v in graph.initializers.values() if id(v) in read]
        shared = [v for v in initializers if _shares_numpy(v)]
        view = ir.GraphView(inputs, values, nodes=sorted(needed, key=lambda n: order[id(n)]),
                            opset_imports=graph.opset_imports, name=graph.name)
        proto = onnx.ModelProto(ir_version=model.ir_version)
        ir.serde.serialize_graph_into(proto.graph, view, model_ir_version=model.ir_version)
        proto.graph.initializer.extend(_embedded(v) for v in initializers if not _shares_numpy(v))
        proto.graph.initializer.extend(_placeholder(v) for v in shared)
        for domain, version in graph.opset_imports.items():
            proto.opset_import.add(domain=domain, version=version)
        proto.functions.extend(ir.serde.serialize_function(f) for f in model.functions.values())
        self.keep = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v.const_value.numpy())) for v in shared]
        options = session_options(threads=threads)
        options.add_session_config_entry("session.disable_prepacking", "1")
        for value, array in zip(shared, self.keep):
            options.add_initializer(value.name, array)
        with tempfile.TemporaryDirectory(prefix="mxonnx-calib-") as folder:
            (Path(folder) / PLACEHOLDER_FILE).touch()
            onnx.save(proto, Path(folder) / "graph.onnx")
            self.session = ort.InferenceSession(str(Path(folder) / "graph.onnx"), options,
                                                providers=["CPUExecutionProvider"])
        self.inputs = inputs
        self.output_names = [v.name for v in values]

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(self.output_names, feed)


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


def collect_statistics(model: ir.Model, blocks: list[DecoderBlock], tokenizer_folder: str | os.PathLike | None,
                       config: QuantizeConfig, hessians: bool = False, sample_tokens: int = 0,
                       groups: Iterable[str] | None = None, threads: int | None = None) -> dict[str, ActivationStats]:
    """Statistics of the linear inputs of ``blocks`` (found on ``model``) over ``config.calib_samples`` windows of
    ``config.calib_seqlen`` tokens of ``config.calib_path`` (default: WikiText-2 validation).

    ``hessians`` adds ``xtx``; ``sample_tokens`` keeps that many random input rows per group (spread evenly over
    the windows); ``groups`` restricts the work to some keys of ``linear_groups(blocks)``."""
    from tqdm import tqdm

    exposed = linear_groups(blocks)
    if groups is not None:
        unknown = sorted(set(groups) - set(exposed))
        if unknown:
            raise InputError(f"no linear group {unknown[0]!r} in the model")
        exposed = {key: exposed[key] for key in groups}
    tokenizer = load_tokenizer(tokenizer_folder)
    windows = calibration_windows(config.calib_path or default_calib_text(), tokenizer, config.calib_samples,
                                  config.calib_seqlen, config.seed)
    session = ExposedSession(model, [linears[0].input for linears in exposed.values()], threads=threads)
    rng = np.random.default_rng(config.seed)
    rows_per_window = -(-sample_tokens // len(windows))
    accumulators = [_Accumulator(linears[0].shape[0], hessians, sample_tokens, rows_per_window, rng)
                    for linears in exposed.values()]
    kv_heads, head_dim = blocks[0].num_kv_heads, blocks[0].head_dim
    for ids in tqdm(windows, desc="calibrate", unit="window", disable=not config.progress, leave=False):
        outputs = session.run(decoder_feed(session.inputs, ids[None], kv_heads, head_dim))
        for accumulator, x in zip(accumulators, outputs):
            accumulator.add(x.reshape(-1, x.shape[-1]))
        del outputs
    return {key: acc.result() for key, acc in zip(exposed, accumulators)}
