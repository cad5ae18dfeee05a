"""Read a checkpoint's tensors one at a time: a Hugging Face folder's safetensors files (one file, or shards listed by
``model.safetensors.index.json``), a GGUF file (each tensor dequantized to float32 when read), or a model already in
memory (``pytorch_model.bin`` folders).

A source answers for the parameter names of transformers' ``LlamaForCausalLM`` (``model.layers.3.mlp.up_proj.weight``):
a checkpoint saved from the bare ``LlamaModel`` (no ``model.`` prefix) is read too, and a missing ``lm_head.weight``
is the embedding when the config ties them. Every read opens the file for that one tensor, whose bytes stay mapped only
while the returned tensor lives, so no page of the checkpoint stays mapped between reads (mapped pages count in RSS).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

from mxonnx.errors import InputError

SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
EMBEDDING, LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"


class TensorSource:
    """Tensors by checkpoint key; subclasses give ``keys`` and ``_read``."""

    def __init__(self, keys: Mapping[str, object], tied: bool, where: str):
        self.keys, self.tied, self.where = keys, tied, where

    def key(self, param: str) -> str:
        """The checkpoint key holding the ``LlamaForCausalLM`` parameter ``param``; ``InputError`` if none does."""
        if param in self.keys:
            return param
        if param.startswith("model.") and param[len("model."):] in self.keys:  # saved from the bare LlamaModel
            return param[len("model."):]
        if param == LM_HEAD and self.tied:
            return self.key(EMBEDDING)
        raise InputError(f"{self.where}: checkpoint holds no tensor {param!r}")

    def read(self, param: str):
        """The torch tensor of ``param`` in the checkpoint's own dtype (contiguous, on the CPU; do not modify it)."""
        tensor = self._read(self.key(param))
        if not tensor.is_floating_point():
            raise InputError(f"{self.where}: tensor {param!r} is {tensor.dtype}, not a float type")
        return tensor

    def check(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Raise ``InputError`` unless every parameter of ``shapes`` (name -> shape the config gives) is in the
        checkpoint with that shape (read from the headers: no tensor data is read)."""
        for param, shape in shapes.items():
            found = tuple(self._shape(self.key(param)))
            if found != tuple(shape):
                raise InputError(f"{self.where}: tensor {param!r} has shape {list(found)}, the config expects {list(shape)}")

    def _read(self, key: str):
        raise NotImplementedError

    def _shape(self, key: str) -> tuple[int, ...]:
        raise NotImplementedError


class SafetensorsSource(TensorSource):
    """The safetensors file(s) of a Hugging Face folder: ``model.safetensors`` or the shards of its index."""

    def __init__(self, folder: Path, tied: bool):
        from safetensors import safe_open

        folder = Path(folder)
        index = folder / SAFETENSORS_INDEX_NAME
        try:
            if index.is_file():
                weight_map = json.loads(index.read_text())["weight_map"]
                files = {key: folder / name for key, name in weight_map.items()}
            else:
                with safe_open(folder / SAFETENSORS_NAME, framework="pt") as f:
                    files = dict.fromkeys(f.keys(), folder / SAFETENSORS_NAME)
        except (OSError, ValueError, KeyError, TypeError) as exc:  # unreadable index, header or shard
            raise InputError(f"{folder}: unreadable safetensors checkpoint ({' '.join(str(exc).split())})") from None
        missing = sorted({str(p.name) for p in files.values() if not p.is_file()})
        if missing:
            raise InputError(f"{folder}: safetensors shard(s) listed in {SAFETENSORS_INDEX_NAME} are missing: {', '.join(missing)}")
        super().__init__(files, tied, str(folder))

    def _read(self, key: str):
        from safetensors import safe_open

        try:
            with safe_open(self.keys[key], framework="pt") as f:
                return f.get_tensor(key)  # maps the tensor's bytes of the file; unmapped when the tensor goes
        except Exception as exc:  # noqa: BLE001 - a truncated or corrupt shard, whatever the library raises
            raise InputError(f"{self.keys[key]}: cannot read tensor {key!r} ({' '.join(str(exc).split())})") from None

    def _shape(self, key: str) -> tuple[int, ...]:
        from safetensors import safe_open

        try:
            with safe_open(self.keys[key], framework="pt") as f:
                return tuple(f.get_slice(key).get_shape())
        except Exception as exc:  # noqa: BLE001 - as in _read
            raise InputError(f"{self.keys[key]}: cannot read tensor {key!r} ({' '.join(str(exc).split())})") from None


class GGUFSource(TensorSource):
    """The tensors of a GGUF file under transformers' parameter names, dequantized one at a time.

    The file is memory-mapped once by ``gguf.GGUFReader`` (its header, with the tokenizer arrays, is slow to parse);
    a read dequantizes one tensor with ``gguf.dequantize`` and applies transformers' per-architecture fix-ups
    (``TENSOR_PROCESSORS``: llama.cpp stores q/k rows permuted for its rotary layout, W_gguf = P W), exactly as
    ``from_pretrained(gguf_file=...)`` does for the whole model, so the values are those transformers loads. After
    each read the mapped pages are released (``MADV_DONTNEED``), so no page of the file stays in RSS between reads."""

    def __init__(self, path: Path, config):
        import gguf
        import torch
        from transformers import AutoModelForCausalLM
        from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map, load_gguf_checkpoint

        self.path = Path(path)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
        to_hf = get_gguf_hf_weights_map(skeleton)
        self._gguf_config = load_gguf_checkpoint(str(self.path), return_tensors=False).get("config", {})
        self._reader = gguf.GGUFReader(self.path)
        self.architecture = str(self._reader.fields["general.architecture"].contents())
        self._tensors = {t.name: t for t in self._reader.tensors}
        keys = {to_hf[name]: name for name in self._tensors if name in to_hf}
        super().__init__(keys, bool(config.tie_word_embeddings), str(self.path))

    def _read(self, key: str):
        import numpy as np
        import torch
        from gguf import dequantize
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

        tensor = self._tensors[self.keys[key]]
        weights = dequantize(tensor.data, tensor.tensor_type)
        processor = TENSOR_PROCESSORS.get(self.architecture, TensorProcessor)(config=self._gguf_config)
        weights = processor.process(weights=weights, name=tensor.name, tensor_key_mapping={},
                                    parsed_parameters={}).weights
        array = np.array(weights, dtype=np.float32, copy=True)
        del weights
        self._release_pages()
        return torch.from_numpy(array)

    def _release_pages(self) -> None:
        import mmap

        mapped = getattr(self._reader.data, "_mmap", None)
        if mapped is not None and hasattr(mmap, "MADV_DONTNEED"):
            mapped.madvise(mmap.MADV_DONTNEED)

    def _shape(self, key: str) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(self._tensors[self.keys[key]].shape))


class StateDictSource(TensorSource):
    """The parameters of a torch model in memory (the whole model is loaded: no memory bound)."""

    def __init__(self, model, where: str):
        super().__init__(model.state_dict(), bool(model.config.tie_word_embeddings), where)

    def _read(self, key: str):
        return self.keys[key].detach().contiguous()

    def _shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.keys[key].shape)


def has_safetensors(folder: Path) -> bool:
    folder = Path(folder)
    return (folder / SAFETENSORS_INDEX_NAME).is_file() or (folder / SAFETENSORS_NAME).is_file()
