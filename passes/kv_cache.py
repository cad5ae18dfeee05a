"""MX-quantize the KV cache of a Llama graph (W4A8KV8 in arXiv 2601.09555): the keys (after the rotary embedding)
and values of every decoder block are quantized along head_dim where they enter the cache,

    present.N.key   = Concat(past_key_values.N.key,   MXQuantizeDequantize(k_new))
    present.N.value = Concat(past_key_values.N.value, MXQuantizeDequantize(v_new))

(``com.mxonnx.MXQuantizeDequantize``, ``axis=-1``), so the cache holds MX-representable values only and the
attention reads them, in prefill and in every decode step alike. A graph exported without past quantizes the same
tensors (``passes.llama_structure.KVCacheEntry``) before its attention MatMuls.

Decode reads back what the cache holds: ``Q(Q(x)) = Q(x)`` for every MX format, so quantizing again (as a full
recomputation of the sequence does) changes nothing. For a block ``x = q * 2^E`` of MX values, the largest
``|q| < 2^(emax+1)``, so the recomputed shared exponent ``E' = floor(log2 max|x|) - emax <= E``; the elements
``q * 2^(E - E')`` are then integers (MXINT) or still on the minifloat grid (MXFP: scaling by a power of two keeps
a value a multiple of the finer step of its new binade), below the format's largest value: rounding is exact.
Each token's block of ``b | head_dim`` values stays within one head.
"""

from __future__ import annotations

from collections.abc import Sequence

import onnx_ir as ir

from mxonnx import formats
from mxonnx.config import QuantizeConfig
from mxonnx.errors import InputError
from mxonnx.ops import schema
from mxonnx.passes.llama_structure import DecoderBlock, KVCacheEntry, find_decoder_blocks
from mxonnx.passes.mx_matmul import add_mx_functions, insert_quantize_dequantize


def check_kv_format(fmt: str | formats.MXFormat, blocks: Sequence[DecoderBlock] = ()) -> formats.MXFormat:
    """The parsed KV-cache format: ``none`` or an MX format whose block size divides every block's head_dim."""
    parsed = formats.parse_format(fmt)
    if parsed.kind not in ("none", "mx"):
        raise InputError(f"KV-cache format {parsed.name!r} is not supported: use an MX format (e.g. mxint8-64, "
                         "mxfp8e4m3-32) or none")
    for block in blocks if parsed.kind == "mx" else ():
        if block.head_dim % parsed.block_size:
            raise InputError(f"KV-cache format {parsed.name}: block size {parsed.block_size} does not divide the "
                             f"attention head size {block.head_dim} (decoder block {block.index}); use a block size "
                             f"dividing {block.head_dim}")
    return parsed


def _entries(block: DecoderBlock) -> list[tuple[str, KVCacheEntry]]:
    entries = [("keys", block.key), ("values", block.value)]
    missing = [kind for kind, entry in entries if entry is None]
    if missing:
        raise InputError(f"decoder block {block.index}: cannot tell where its {missing[0]} enter the KV cache")
    return entries


class KvCachePass(ir.passes.InPlacePass):
    """Insert ``MXQuantizeDequantize(fmt, axis=-1)`` on the key and value tensors entering each block's cache; every
    reader of a tensor (the ``present`` Concat, or the attention without past) reads the quantized one."""

    def __init__(self, blocks: Sequence[DecoderBlock], fmt: str | formats.MXFormat):
        super().__init__()
        self.blocks = list(blocks)
        self.fmt = check_kv_format(fmt, self.blocks)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if self.fmt.kind == "none":
            return ir.passes.PassResult(model, modified=False)
        for block in self.blocks:
            for _, entry in _entries(block):
                readers = list(entry.tensor.uses())
                quantized = insert_quantize_dequantize(model.graph, entry.tensor, self.fmt)
                for node, index in readers:
                    node.replace_input_with(index, quantized)
        add_mx_functions(model, {(schema.QUANTIZE_DEQUANTIZE, self.fmt)})
        return ir.passes.PassResult(model, modified=True)


def quantize_kv_cache(model: ir.Model, config: QuantizeConfig,
                      blocks: Sequence[DecoderBlock] | None = None) -> ir.Model:
    """The pass ``model, config -> model``: quantize the KV cache with ``config.kv`` (in place). ``blocks`` are the
    model's decoder blocks, found in its float graph (``find_decoder_blocks``) when not given."""
    KvCachePass(find_decoder_blocks(model) if blocks is None else blocks, config.kv)(model)
    return model
