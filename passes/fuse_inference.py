"""The in-memory fusions that ``create_session(fuse=True)`` (CLI ``--fuse``) applies to a saved graph before
onnxruntime opens it; the file on disk is not changed and the model's inputs and outputs stay the same:

- each quantized linear -> one ``com.mxonnx.MXMatMul`` (``fuse_mx_matmul.py``, the native integer kernels);
- each decoder block's attention (head split, rotary embedding, KV-cache Concat, repeat_kv, masked softmax
  attention, head merge) -> ``com.microsoft.RotaryEmbedding`` + ``GroupQueryAttention``, or
  ``com.mxonnx.GroupAttention`` when the session has the native library (``fuse_attention.py``), when the model's
  config (``config.json`` next to the file) gives the head counts; then what the blocks computed each for itself
  (the mask, shapes) once (``merge_common_subexpressions``).

Both are exact up to float reassociation (see each pass). onnxruntime's own ORT_ENABLE_ALL fusions
(SimplifiedLayerNormalization for the RMSNorms, QuickGelu for SiLU, ...) still run on the result.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import onnx_ir as ir
import onnx_ir.passes.common

from mxonnx.ops import schema
from mxonnx.passes.fuse_attention import AttentionDims, fuse_attention
from mxonnx.passes.fuse_mx_matmul import fuse_mx_matmuls


def model_config(onnx_path: str | os.PathLike) -> dict | None:
    """The Hugging Face ``config.json`` next to ``onnx_path``, or None."""
    path = Path(onnx_path).resolve().parent / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _native(native: bool | None) -> bool:
    if native is not None:
        return native
    from mxonnx.session import native_enabled

    return native_enabled(True)


def fuse_for_inference(model: ir.Model, config: dict | None = None, native: bool | None = None) -> dict[str, int]:
    """Both fusions of the module docstring on ``model``, in place; returns ``{"mx_matmuls": n, "attentions": m}``
    (attention only with a ``config`` giving ``num_attention_heads``). ``native``: whether the session that runs
    the model has the native library (default: whether ``mxonnx.session`` registers it)."""
    counts = {"mx_matmuls": 0, "attentions": 0}
    if schema.DOMAIN in model.graph.opset_imports:
        counts["mx_matmuls"] = fuse_mx_matmuls(model)
    if config and "num_attention_heads" in config:
        counts["attentions"] = fuse_attention(model, AttentionDims.from_config(config),
                                              int(config.get("max_position_embeddings") or 0) or None,
                                              _native(native))
    if counts["attentions"]:
        merge_common_subexpressions(model)
    return counts


def merge_common_subexpressions(model: ir.Model) -> None:
    """One node for each computation the graph repeats (the fused blocks' masks, their shapes; the same op on the
    same inputs, small constants compared by value), then a topological order. Exact: the same numbers."""
    ir.passes.common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=16)(model)
    ir.passes.common.DeduplicateInitializersPass(size_limit=16)(model)
    ir.passes.common.CommonSubexpressionEliminationPass()(model)
    ir.passes.common.RemoveUnusedNodesPass()(model)
    ir.passes.common.TopologicalSortPass()(model)


def fused_model_bytes(path: str | os.PathLike, native: bool | None = None) -> bytes | None:
    """The ONNX file at ``path`` fused for inference (``native`` as ``fuse_for_inference``), serialized; None when
    nothing fuses.

    Weights stored as external data stay on disk, referenced by their relative location: open the bytes with the
    session config entry ``mxonnx.session.EXTERNAL_DATA_FOLDER_CONFIG`` set to ``path``'s folder."""
    model = ir.load(os.fspath(path))
    if not any(fuse_for_inference(model, model_config(path), native).values()):
        return None
    return ir.serde.serialize_model(model).SerializeToString()
