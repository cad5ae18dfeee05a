"""Synthetic big Llamas: seeded random ``LlamaForCausalLM`` weights with the layer shapes of real models, written as
a Hugging Face folder one tensor at a time (project issue 17: measuring 7B-class models on one 24 GiB machine).

The folder holds ``config.json``, ``generation_config.json``, ``model.safetensors`` (or shards of at most
``shard_bytes`` with ``model.safetensors.index.json``), a word-level tokenizer of exactly ``vocab_size`` entries
(the specials, the words of WikiText-2 validation by frequency, then ``<extra_i>`` fillers) and ``synthetic.json``
(the recipe it was made from). Weights are float16; every linear and embedding element is ``N(0, std^2)`` (std
0.02, Hugging Face's ``initializer_range``), every norm weight ``N(1, 0.1^2)``, drawn from a generator seeded by
``(seed, crc32(tensor name))``, so a tensor does not depend on the others: the same seed gives byte-identical files,
and layer ``i`` of a 4-layer model is layer ``i`` of the 32-layer one. Generating needs about one chunk of memory.

``check`` runs the model in torch one decoder layer at a time (from the folder, or from the generator without
writing anything) and reports whether the logits are finite, in float32 or float16.

    python -m mxonnx.synthetic generate llama2-7b --layers 4 [-o FOLDER] [--seed 0] [--json]
    python -m mxonnx.synthetic check (FOLDER | --preset llama2-7b --layers 32) [--dtype float16] [--json]
    python -m mxonnx.synthetic presets
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import json
import struct
import sys
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from mxonnx.config import default_calib_text
from mxonnx.errors import InputError
from mxonnx.models import CACHE_DIR

GENERATOR_VERSION = 2
NORM_STD = 0.1  # norm weights 1 + N(0, 0.1^2): all ones would let the exporter drop their Mul (and the RMSNorm pattern)
CHUNK_ELEMENTS = 1 << 24  # elements drawn per generator call (fixed: part of what makes the files reproducible)
DEFAULT_SHARD_BYTES = 5 * 10**9  # Hugging Face's default max_shard_size "5GB"
SPECIAL = ("<unk>", "<s>", "</s>")
RECIPE_FILE = "synthetic.json"


@dataclasses.dataclass(frozen=True)
class Shape:
    """The architecture numbers of a Llama (what ``config.json`` says; the weights follow from them)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int = 32000
    max_positions: int = 4096
    rms_eps: float = 1e-5
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


PRESETS = {
    # Llama-2-7B's shapes with the 32/8 grouped-query heads (the released 7B has 32 KV heads).
    "llama2-7b": Shape(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=8),
    # Mistral-7B's shapes as a plain Llama (no sliding window): 32/8 heads, vocab 32000, wider MLP.
    "mistral-7b": Shape(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, max_positions=32768,
                        rope_theta=1e6),
    # the smoke-test shape: same vocabulary, every K a multiple of 128 (MXINT4-128 blocks are whole)
    "tiny": Shape(hidden=256, intermediate=768, layers=2, heads=4, kv_heads=2, max_positions=2048),
}


def preset_shape(name: str, layers: int | None = None) -> Shape:
    """The preset's shape, with ``layers`` decoder layers instead of its own when given."""
    if name not in PRESETS:
        raise InputError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    if layers is not None and layers <= 0:
        raise InputError(f"--layers must be positive, got {layers}")
    return dataclasses.replace(PRESETS[name], layers=layers or PRESETS[name].layers)


def default_folder(preset: str, layers: int, seed: int = 0) -> Path:
    """``models/cache/synthetic-PRESET-LN`` (``-sSEED`` appended for seeds other than 0)."""
    return CACHE_DIR / (f"synthetic-{preset}-L{layers}" + ("" if seed == 0 else f"-s{seed}"))


def tensor_specs(shape: Shape) -> list[tuple[str, tuple[int, ...]]]:
    """Name and shape of every weight of ``LlamaForCausalLM`` (untied lm_head), in file order."""
    h, kv = shape.hidden, shape.kv_heads * shape.head_dim
    specs = [("model.embed_tokens.weight", (shape.vocab, h))]
    for i in range(shape.layers):
        p = f"model.layers.{i}."
        specs += [(p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                  (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                  (p + "mlp.gate_proj.weight", (shape.intermediate, h)),
                  (p + "mlp.up_proj.weight", (shape.intermediate, h)),
                  (p + "mlp.down_proj.weight", (h, shape.intermediate)),
                  (p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
    return specs + [("model.norm.weight", (h,)), ("lm_head.weight", (shape.vocab, h))]


def tensor_chunks(name: str, dims: tuple[int, ...], seed: int, std: float) -> Iterator[np.ndarray]:
    """The float16 values of one tensor, flat, in chunks of at most ``CHUNK_ELEMENTS``, drawn from
    ``default_rng((seed, crc32(name)))``: ``N(1, NORM_STD^2)`` for norm weights, ``N(0, std^2)`` for the others."""
    count = int(np.prod(dims))
    norm = name.endswith("norm.weight")
    scale, shift = (np.float32(NORM_STD), np.float32(1)) if norm else (np.float32(std), np.float32(0))
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    for start in range(0, count, CHUNK_ELEMENTS):
        draw = rng.standard_normal(min(CHUNK_ELEMENTS, count - start), dtype=np.float32)
        yield (draw * scale + shift).astype("<f2")


def tensor_array(name: str, dims: tuple[int, ...], seed: int, std: float) -> np.ndarray:
    """One whole tensor as written to the file."""
    return np.concatenate(list(tensor_chunks(name, dims, seed, std))).reshape(dims)


def plan_shards(specs: list[tuple[str, tuple[int, ...]]], shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Cut the tensors, in order, into files of at most ``shard_bytes`` of data (a bigger tensor gets a file alone)."""
    shards, size = [[]], 0
    for name, dims in specs:
        nbytes = 2 * int(np.prod(dims))
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, dims))
        size += nbytes
    return shards


def safetensors_header(tensors: list[tuple[str, tuple[int, ...]]]) -> bytes:
    """The 8-byte length and JSON header of a safetensors file of float16 ``tensors`` stored back to back, padded
    with spaces so the data starts 8-byte aligned."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, dims in tensors:
        end = offset + 2 * int(np.prod(dims))
        header[name] = {"dtype": "F16", "shape": list(dims), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_safetensors(path: Path, tensors: list[tuple[str, tuple[int, ...]]], seed: int, std: float,
                      progress: Callable[[int], None]) -> int:
    """Write one safetensors file, one chunk at a time; ``progress(bytes)`` after each chunk. Returns data bytes."""
    written = 0
    with open(path, "wb") as f:
        f.write(safetensors_header(tensors))
        for name, dims in tensors:
            for chunk in tensor_chunks(name, dims, seed, std):
                f.write(chunk.tobytes())
                written += chunk.nbytes
                progress(chunk.nbytes)
    return written


def build_tokenizer(text: Path, vocab_size: int):
    """A word-level ``PreTrainedTokenizerFast`` of exactly ``vocab_size`` ids: ``<unk> <s> </s>``, the
    whitespace-separated words of ``text`` by decreasing count (ties by spelling), ``<extra_i>`` fillers. Encoding
    prepends ``<s>`` as Llama's tokenizer does; unknown words become ``<unk>``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    counts = collections.Counter(text.read_text(encoding="utf-8").split())
    words = [w for w in sorted(counts, key=lambda w: (-counts[w], w)) if w not in SPECIAL]
    vocab = list(SPECIAL) + words[: vocab_size - len(SPECIAL)]
    vocab += [f"<extra_{i}>" for i in range(vocab_size - len(vocab))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def llama_config(shape: Shape, std: float):
    """The ``LlamaConfig`` of ``shape`` (float16, untied embeddings, ids 1/2 for BOS/EOS)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                       num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                       num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim,
                       max_position_embeddings=shape.max_positions, rms_norm_eps=shape.rms_eps,
                       rope_theta=shape.rope_theta, tie_word_embeddings=False, initializer_range=std,
                       bos_token_id=1, eos_token_id=2, dtype="float16", architectures=["LlamaForCausalLM"])


def recipe(preset: str, shape: Shape, seed: int, std: float, shard_bytes: int, text: Path) -> dict:
    """What ``synthetic.json`` records: everything the files are a function of."""
    return {"generator_version": GENERATOR_VERSION, "preset": preset, "shape": dataclasses.asdict(shape),
            "seed": seed, "std": std, "dtype": "float16", "shard_bytes": shard_bytes,
            "tokenizer_text": text.name, "tokenizer_text_sha256": hashlib.sha256(text.read_bytes()).hexdigest()}


def _write_weights(folder: Path, shape: Shape, seed: int, std: float, shard_bytes: int, progress: bool) -> int:
    """Every weight file (and the index when sharded) in ``folder``; returns the data bytes."""
    from tqdm.auto import tqdm

    specs = tensor_specs(shape)
    shards = plan_shards(specs, shard_bytes)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)])
    total = 2 * sum(int(np.prod(d)) for _, d in specs)
    with tqdm(total=total, unit="B", unit_scale=True, desc="weights", disable=not progress, file=sys.stderr) as bar:
        for name, tensors in zip(names, shards):
            write_safetensors(folder / name, tensors, seed, std, bar.update)
    if len(shards) > 1:
        index = {"metadata": {"total_size": total},
                 "weight_map": {t: f for f, tensors in zip(names, shards) for t, _ in tensors}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return total


def generate(preset: str, layers: int | None = None, out: Path | None = None, seed: int = 0, std: float = 0.02,
             shard_bytes: int = DEFAULT_SHARD_BYTES, text: Path | None = None, progress: bool = True) -> dict:
    """Write the synthetic model ``preset`` (with ``layers`` layers) to ``out``; a folder already there made from the
    same recipe is kept as it is (``reused: true``), any other existing ``out`` is refused.
    Returns ``{output, reused, weight_bytes, parameters, recipe}``."""
    from transformers import GenerationConfig

    from mxonnx.modelio import atomic_output_dir

    shape = preset_shape(preset, layers)
    out = Path(out or default_folder(preset, shape.layers, seed))
    text = Path(text or default_calib_text())
    if not text.is_file():
        raise InputError(f"{text}: tokenizer text not found (set MXONNX_DATA or pass --text)")
    if not (np.isfinite(std) and std > 0) or shard_bytes <= 0:
        raise InputError("--std and --shard-gb must be positive")
    wanted = recipe(preset, shape, seed, std, shard_bytes, text)
    parameters = sum(int(np.prod(d)) for _, d in tensor_specs(shape))
    if (out / RECIPE_FILE).is_file() and json.loads((out / RECIPE_FILE).read_text()) == wanted:
        return {"output": str(out), "reused": True, "weight_bytes": 2 * parameters, "parameters": parameters,
                "recipe": wanted}
    with atomic_output_dir(out) as tmp:
        config = llama_config(shape, std)
        config.save_pretrained(tmp)
        GenerationConfig.from_model_config(config).save_pretrained(tmp)
        build_tokenizer(text, shape.vocab).save_pretrained(tmp)
        weight_bytes = _write_weights(tmp, shape, seed, std, shard_bytes, progress)
        (tmp / RECIPE_FILE).write_text(json.dumps(wanted, indent=1) + "\n")
    return {"output": str(out), "reused": False, "weight_bytes": weight_bytes, "parameters": parameters,
            "recipe": wanted}


TensorSource = Callable[[str], np.ndarray]


def folder_source(folder: Path) -> TensorSource:
    """Tensors read from the safetensors file(s) of a Hugging Face folder, one at a time (memory-mapped)."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
    elif (folder / "model.safetensors").is_file():
        with safe_open(folder / "model.safetensors", framework="np") as f:
            weight_map = {name: "model.safetensors" for name in f.keys()}
    else:
        raise InputError(f"{folder}: no model.safetensors or model.safetensors.index.json")

    def read(name: str) -> np.ndarray:
        with safe_open(folder / weight_map[name], framework="np") as f:
            return f.get_tensor(name)
    return read


def generated_source(shape: Shape, seed: int, std: float) -> TensorSource:
    """Tensors drawn by the generator, as ``generate`` would write them (nothing touches the disk)."""
    dims = dict(tensor_specs(shape))
    return lambda name: tensor_array(name, dims[name], seed, std)


def streamed_logits(source: TensorSource, shape: Shape, ids: np.ndarray, dtype: str = "float32",
                    progress: bool = False) -> tuple[np.ndarray, list[dict]]:
    """Logits ``[T, vocab]`` (float32) of ``ids`` through transformers' Llama modules computing in ``dtype``, one
    decoder layer in memory at a time, and per layer the residual stream's rms and max |x| after it."""
    import torch
    from tqdm.auto import tqdm
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

    dt = getattr(torch, dtype)
    config = llama_config(shape, 0.02)
    config._attn_implementation = "eager"  # takes the explicit causal mask below

    def weight(name: str) -> torch.Tensor:
        return torch.from_numpy(source(name)).to(dt)

    with torch.no_grad():
        tokens = torch.from_numpy(ids.astype(np.int64))[None]
        x = torch.nn.functional.embedding(tokens, weight("model.embed_tokens.weight"))
        positions = torch.arange(len(ids))[None]
        rope = LlamaRotaryEmbedding(config)(x, positions)
        mask = torch.full((len(ids), len(ids)), torch.finfo(dt).min, dtype=dt).triu(1)[None, None]
        with torch.device("meta"):
            layer = LlamaDecoderLayer(config, 0)
        layer = layer.to_empty(device="cpu").to(dt).eval()
        stats = []
        for i in tqdm(range(shape.layers), desc="check", unit="layer", disable=not progress, file=sys.stderr):
            prefix = f"model.layers.{i}."
            layer.load_state_dict({k: weight(prefix + k) for k in layer.state_dict()}, strict=True)
            x = layer(x, attention_mask=mask, position_ids=positions, position_embeddings=rope)
            x = x[0] if isinstance(x, tuple) else x
            stats.append({"layer": i, "rms": float(x.float().pow(2).mean().sqrt()),
                          "max_abs": float(x.float().abs().max())})
        norm = LlamaRMSNorm(shape.hidden, eps=shape.rms_eps).to(dt)
        norm.weight.copy_(weight("model.norm.weight"))
        logits = norm(x)[0] @ weight("lm_head.weight").T
    return logits.float().numpy(), stats


def check_model(source: TensorSource, shape: Shape, dtype: str = "float32", tokens: int = 16,
                progress: bool = False) -> dict:
    """Whether the logits of a fixed ``tokens``-long input are finite, with their size and the residual stream's."""
    ids = (np.arange(tokens, dtype=np.int64) * 7919 + 3) % shape.vocab
    logits, stats = streamed_logits(source, shape, ids, dtype, progress)
    finite = bool(np.isfinite(logits).all())
    return {"dtype": dtype, "layers": shape.layers, "tokens": tokens, "finite": finite,
            "logits_max_abs": float(np.abs(logits).max()) if finite else None,
            "logits_std": float(logits.std()) if finite else None,
            "residual_rms_last": stats[-1]["rms"] if stats else None,
            "residual_max_abs": max((s["max_abs"] for s in stats), default=None), "per_layer": stats}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mxonnx.synthetic", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="write a synthetic model as a Hugging Face folder")
    g.add_argument("preset", choices=list(PRESETS))
    g.add_argument("--layers", type=int, default=None, help="decoder layers (default: the preset's)")
    g.add_argument("-o", "--output", type=Path, default=None, help="default models/cache/synthetic-PRESET-LN")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--std", type=float, default=0.02, help="std of the normal weights (default 0.02)")
    g.add_argument("--shard-gb", type=float, default=DEFAULT_SHARD_BYTES / 1e9,
                   help="max data per safetensors file (GB, default 5)")
    g.add_argument("--text", type=Path, default=None, help="tokenizer vocabulary text (default WikiText-2 valid)")
    c = sub.add_parser("check", help="finite logits? one layer in memory at a time")
    c.add_argument("folder", type=Path, nargs="?", help="synthetic (or any Llama) HF folder with safetensors")
    c.add_argument("--preset", choices=list(PRESETS), help="check the generator's tensors instead of a folder")
    c.add_argument("--layers", type=int, default=None)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--std", type=float, default=0.02)
    c.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    c.add_argument("--tokens", type=int, default=16)
    sub.add_parser("presets", help="list the presets")
    for s in (g, c, sub.choices["presets"]):
        s.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    return p


def _shape_from_folder(folder: Path) -> Shape:
    """The ``Shape`` a Llama ``config.json`` describes."""
    cfg = json.loads((folder / "config.json").read_text())
    return Shape(hidden=cfg["hidden_size"], intermediate=cfg["intermediate_size"], layers=cfg["num_hidden_layers"],
                 heads=cfg["num_attention_heads"], kv_heads=cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
                 vocab=cfg["vocab_size"], max_positions=cfg["max_position_embeddings"], rms_eps=cfg["rms_norm_eps"],
                 rope_theta=cfg.get("rope_theta", 10000.0))


def _run(args: argparse.Namespace) -> tuple[dict, str]:
    """The command's JSON result and its one-line text form."""
    progress = not args.json
    if args.command == "presets":
        rows = {name: {**dataclasses.asdict(s), "parameters": sum(int(np.prod(d)) for _, d in tensor_specs(s))}
                for name, s in PRESETS.items()}
        return {"presets": rows}, "\n".join(f"{n}: {r}" for n, r in rows.items())
    if args.command == "generate":
        r = generate(args.preset, args.layers, args.output, args.seed, args.std, int(args.shard_gb * 1e9), args.text,
                     progress)
        return r, f"{'kept' if r['reused'] else 'wrote'} {r['output']} ({r['parameters'] / 1e9:.2f} B parameters)"
    if (args.folder is None) == (args.preset is None):
        raise InputError("check takes a FOLDER or --preset, not both")
    if args.folder is not None:
        shape, source = _shape_from_folder(args.folder), folder_source(args.folder)
    else:
        shape = preset_shape(args.preset, args.layers)
        source = generated_source(shape, args.seed, args.std)
    r = check_model(source, shape, args.dtype, args.tokens, progress)
    return r, (f"{r['layers']} layers in {r['dtype']}: logits {'finite' if r['finite'] else 'NOT finite'}, "
               f"max |logit| {r['logits_max_abs']}, residual rms {r['residual_rms_last']:.3g}, "
               f"max |x| {r['residual_max_abs']:.3g}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        result, text = _run(args)
    except InputError as exc:
        print(f"mxonnx.synthetic: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result) if args.json else text)
    return 0 if args.command != "check" or result["finite"] else 1


if __name__ == "__main__":
    sys.exit(main())
