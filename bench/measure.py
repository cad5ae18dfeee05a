"""Measurements shared by every benchmark row: a child process's wall time and peak resident memory,
the bytes and bits per weight of a model folder, the machine the numbers were taken on and how busy it was."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import onnx

MODEL_FILE_SUFFIXES = (".onnx", ".onnx_data", ".onnx.data", ".data")
LINEAR_OP_TYPES = {"MatMul", "Gemm", "MatMulNBits", "MatMulInteger", "QLinearMatMul", "DynamicQuantizeMatMul"}
_4BIT_TYPES = {onnx.TensorProto.INT4, onnx.TensorProto.UINT4} | (
    {onnx.TensorProto.FLOAT4E2M1} if hasattr(onnx.TensorProto, "FLOAT4E2M1") else set())


@dataclasses.dataclass(frozen=True)
class ChildRun:
    """Outcome of one child process: exit status, output, wall seconds and peak RSS (``ru_maxrss``) in MB."""

    returncode: int
    stdout: str
    stderr: str
    seconds: float
    peak_rss_mb: float

    def json(self) -> dict:
        """The last line of stdout parsed as JSON (``--json`` commands print one object)."""
        lines = [line for line in self.stdout.strip().splitlines() if line.strip()]
        return json.loads(lines[-1])

    def failure(self) -> str:
        """One line saying why the child failed: the last line of its stderr."""
        lines = [line.strip() for line in self.stderr.strip().splitlines() if line.strip()]
        return lines[-1] if lines else f"exit status {self.returncode}"


def _peak_rss_kib(pid: int) -> int | None:
    """``VmHWM`` (peak resident set, KiB) of a live process, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def run_child(cmd: list[str], env: dict[str, str] | None = None, cwd: Path | None = None,
              poll_seconds: float = 0.05) -> ChildRun:
    """Run ``cmd`` to completion; its peak RSS is the last ``VmHWM`` read from ``/proc`` while it runs (a high-water
    mark of that process image alone: ``ru_maxrss`` would also count the parent's pages at fork time), read every
    ``poll_seconds``, so memory taken in the last poll interval before the child exits is missed.
    Files a child leaves in its working directory land in ``cwd``."""
    full_env = {**os.environ, **(env or {})}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=full_env, cwd=cwd)
        peak_kib = 0
        while proc.poll() is None:
            peak_kib = max(peak_kib, _peak_rss_kib(proc.pid) or 0)
            time.sleep(poll_seconds)
        seconds = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        return ChildRun(proc.returncode, out.read(), err.read(), seconds, peak_kib / 1024)


class LoadSampler:
    """The machine's 1-minute load average, sampled every ``interval`` seconds while the ``with`` block runs and
    once at its end: ``mean`` and ``peak``. Far above the CPU count, other jobs were sharing the CPUs."""

    def __init__(self, interval: float = 15.0):
        self.interval = interval
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(os.getloadavg()[0])

    @property
    def mean(self) -> float:
        return sum(self.samples) / len(self.samples)

    @property
    def peak(self) -> float:
        return max(self.samples)


def model_file_bytes(folder: Path) -> int:
    """Bytes of the ONNX graph and its external data in ``folder`` (config and tokenizer files excluded)."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and p.name.endswith(MODEL_FILE_SUFFIXES))


def _tensor_bytes(t: onnx.TensorProto) -> int:
    """Stored bytes of a tensor: external length, raw bytes, or element count x element size (4-bit packed)."""
    for entry in t.external_data:
        if entry.key == "length":
            return int(entry.value)
    if t.raw_data:
        return len(t.raw_data)
    count = 1
    for d in t.dims:
        count *= d
    if t.data_type in _4BIT_TYPES:
        return (count + 1) // 2
    return count * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def decoder_linear_weight_count(config: dict) -> int:
    """Weights of the decoder linear layers of a Llama config: per layer q, o (h x h), k, v (h x kv_heads*head_dim)
    and gate, up, down (h x intermediate). The lm_head is not counted."""
    h, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or h // heads
    kv = config.get("num_key_value_heads", heads) * head_dim
    return layers * (2 * h * h + 2 * h * kv + 3 * h * inter)


def linear_weight_bits(onnx_path: Path, config: dict) -> float:
    """Stored bits per weight of the decoder linear layers: ``8 * bytes / weights``.

    ``bytes`` sums every constant tensor that feeds a linear node's weight input (input 1 of MatMul-like nodes,
    input 1-3 of MatMulNBits: codes, scales, zero points), following constant-only producer nodes backwards, each
    tensor once; ``weights`` comes from the Llama config. The lm_head (the node producing ``logits``) is skipped.
    """
    model = onnx.load(str(onnx_path), load_external_data=False)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    outputs = {o.name for o in graph.output}
    constant = set(inits) | {""}
    for node in graph.node:  # nodes are in topological order
        if all(i in constant for i in node.input):
            constant.update(node.output)

    weight_tensors: set[str] = set()  # initializers and Constant outputs feeding linear weights
    for node in graph.node:
        if node.op_type not in LINEAR_OP_TYPES or any(o in outputs for o in node.output) or len(node.input) < 2:
            continue
        weight_inputs = node.input[1:4] if node.op_type == "MatMulNBits" else node.input[1:2]
        if not all(name in constant for name in weight_inputs):
            continue
        stack, seen = [n for n in weight_inputs if n], set()
        while stack:
            name = stack.pop()
            if name in seen:
                continue
            seen.add(name)
            source = producer.get(name)
            if name in inits or source.op_type == "Constant":
                weight_tensors.add(name)
            else:
                stack.extend(i for i in source.input if i)
    total = 0
    for name in weight_tensors:
        if name in inits:
            total += _tensor_bytes(inits[name])
        else:
            total += sum(_tensor_bytes(a.t) for a in producer[name].attribute if a.type == onnx.AttributeProto.TENSOR)
    return 8.0 * total / decoder_linear_weight_count(config)


def machine() -> dict:
    """Where the numbers come from: CPU model, logical CPUs, memory, OS, Python."""
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpu": cpu, "nproc": os.cpu_count(), "memory_gb": round(mem_gb, 1), "os": platform.platform(),
            "python": platform.python_version()}


def git_commit(repo: Path) -> str:
    """``HEAD`` of ``repo`` with ``+dirty`` when the work tree has changes outside ``bench/results`` (the benchmark's
    own output); ``unknown`` outside git."""
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        return "unknown"
    dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no", "--", ".",
                            ":(exclude)bench/results"],
                           capture_output=True, text=True).stdout.strip()
    return head.stdout.strip() + ("+dirty" if dirty else "")
