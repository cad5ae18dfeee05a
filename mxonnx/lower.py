"""``mxonnx lower``: an MX model folder -> a folder for stock runtimes and compilers (``passes/lower.py``)."""

from __future__ import annotations

import time
from pathlib import Path

import onnx_ir as ir

from mxonnx.modelio import EXTERNAL_DATA_NAME, ONNX_NAME, atomic_output_dir, copy_model_assets, resolve_model
from mxonnx.passes.lower import lower


def lower_model(model: Path, out: Path, target: str) -> dict:
    """Write ``model`` lowered to ``target`` (``inline``, ``qdq`` or ``matmulnbits``) into the new folder ``out``."""
    start = time.perf_counter()
    paths = resolve_model(model)
    with atomic_output_dir(out, paths.folder or paths.onnx) as tmp:
        graph, counts = lower(ir.load(paths.onnx), target)
        ir.save(graph, tmp / ONNX_NAME, external_data=EXTERNAL_DATA_NAME)
        copy_model_assets(paths.folder, tmp)
    return {"output": str(out), "target": target, "seconds": time.perf_counter() - start, **counts}
