"""One place that opens onnxruntime sessions, so every session gets the native MX op library when it
is built (``mxonnx.ops.native.native_library_path()``) and runs the ops' ONNX function bodies otherwise. Graphs
run as saved; ``create_session(..., fuse=True)`` (CLI ``--fuse``) is the one switch that fuses them for inference
(quantized linears, attention)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import onnxruntime as ort

_warned = False
EXTERNAL_DATA_FOLDER_CONFIG = "session.model_external_initializers_file_folder_path"  # for models given as bytes


def native_library() -> Path | None:
    try:
        from mxonnx.ops.native import native_library_path
    except ImportError:
        return None
    return native_library_path()


def session_options(threads: int | None = None, use_native: bool = True, optimize: bool = True) -> ort.SessionOptions:
    """SessionOptions with the native MX library registered (when present and ``use_native``)."""
    global _warned
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    # onnxruntime fuses DequantizeLinear(int4, blocked) + MatMul into MatMulNBits and by default computes it with
    # int8-quantized activations (accuracy level 4); level 0 keeps the lowered QDQ graphs exact
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    if use_native and os.environ.get("MXONNX_NO_NATIVE") != "1":
        lib = native_library()
        if lib is not None:
            so.register_custom_ops_library(str(lib))
        elif not _warned:
            _warned = True
            warnings.warn("mxonnx native op library not built: MX ops run as ONNX function bodies (slower)", stacklevel=2)
    return so


def native_enabled(use_native: bool) -> bool:
    """Whether ``session_options(use_native=use_native)`` registers the native library."""
    return use_native and os.environ.get("MXONNX_NO_NATIVE") != "1" and native_library() is not None


def create_session(model: str | os.PathLike | bytes, threads: int | None = None, use_native: bool = True,
                   optimize: bool = True, fuse: bool = False,
                   external_data_folder: str | os.PathLike | None = None) -> ort.InferenceSession:
    """An InferenceSession on the CPU execution provider for a model path or serialized bytes
    (``external_data_folder``: where the external data files of serialized bytes are, ``EXTERNAL_DATA_FOLDER_CONFIG``).

    The graph runs as given unless ``fuse``: then a model file is fused for inference in memory
    (``passes/fuse_inference.py``; the file is not changed): its ``MatMul(MXQuantizeDequantize, MXDequantize)``
    pairs run as the fused ``MXMatMul`` (the native integer kernels when the library is registered, else MXMatMul's
    ONNX function), and with the model's ``config.json`` beside it each attention as onnxruntime's RotaryEmbedding
    + GroupQueryAttention (the native GroupAttention in place of the latter when the library is registered).
    Serialized bytes are never rewritten: fuse them with ``fuse_for_inference`` first."""
    so = session_options(threads=threads, use_native=use_native, optimize=optimize)
    target = model if isinstance(model, bytes) else str(model)
    if fuse and isinstance(model, bytes):
        raise ValueError("create_session(fuse=True) fuses model files; fuse serialized models with fuse_for_inference")
    if fuse:
        from mxonnx.passes.fuse_inference import fused_model_bytes

        fused = fused_model_bytes(model, native_enabled(use_native))
        if fused is not None:  # the fused bytes read the file's external data from its folder
            target, external_data_folder = fused, Path(model).resolve().parent
    if external_data_folder is not None:
        so.add_session_config_entry(EXTERNAL_DATA_FOLDER_CONFIG, str(Path(external_data_folder).resolve()))
    return ort.InferenceSession(target, so, providers=["CPUExecutionProvider"])
