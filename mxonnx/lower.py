"""``mxonnx lower``: an MX model folder -> a folder for stock runtimes and compilers (``passes/lower.py``), with a
``genai_config.json`` (``mxonnx.genai_config``) so that onnxruntime-genai generates from it when the graph has a KV
cache."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import onnx_ir as ir

from mxonnx.genai_config import GENAI_CONFIG_NAME, NATIVE_LIBRARY_NAME, GenaiUnsupportedError, write_genai_config
from mxonnx.modelio import EXTERNAL_DATA_NAME, ONNX_NAME, atomic_output_dir, copy_model_assets, resolve_model
from mxonnx.passes.lower import lower


def lower_model(model: Path, out: Path, target: str) -> dict:
    """Write ``model`` lowered to ``target`` (``inline``, ``qdq`` or ``matmulnbits``) into the new folder ``out``,
    with the source folder's config and tokenizer and a new ``genai_config.json`` (a warning instead when the graph
    has no KV cache, and then none: a source folder's is not copied)."""
    start = time.perf_counter()
    paths = resolve_model(model)
    with atomic_output_dir(out, paths.folder or paths.onnx) as tmp:
        graph, counts = lower(ir.load(paths.onnx), target)
        ir.save(graph, tmp / ONNX_NAME, external_data=EXTERNAL_DATA_NAME)
        copy_model_assets(paths.folder, tmp)
        for name in (GENAI_CONFIG_NAME, NATIVE_LIBRARY_NAME):  # an MX folder's: the lowered graph needs no library
            (tmp / name).unlink(missing_ok=True)
        if paths.folder is not None:
            try:
                write_genai_config(tmp, ONNX_NAME)
            except GenaiUnsupportedError as exc:
                warnings.warn(f"{out}: no {GENAI_CONFIG_NAME} written: {exc}", stacklevel=2)
    return {"output": str(out), "target": target, "seconds": time.perf_counter() - start, **counts}
