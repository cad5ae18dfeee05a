"""Write a tiny Hugging Face Llama or Qwen2 as a float32 GGUF file the way llama.cpp's converter lays it out
(tensor names; for Llama q/k rows permuted for its rotary layout and a SentencePiece-style "llama" vocabulary; for
Qwen2 the q/k/v biases and a small byte-level "gpt2" BPE vocabulary with merges, whose ids are not the source
tokenizer's: compare logits by ids)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

_BLOCK_TENSORS = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def _rotary_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """HF rotate-half row order -> llama.cpp interleaved pairs, per head."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(hf_folder: Path) -> dict[str, np.ndarray]:
    """GGUF tensor name -> array; ``output.weight`` only for untied embeddings, biases where the model has them."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_folder, dtype=torch.float32)
    cfg = model.config
    permute = cfg.model_type == "llama"  # llama.cpp permutes q/k for Llama only
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    out = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
    if not cfg.tie_word_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    for i in range(cfg.num_hidden_layers):
        for hf_name, gg_name in _BLOCK_TENSORS.items():
            for kind in ("weight", "bias"):
                w = sd.get(f"model.layers.{i}.{hf_name}.{kind}")
                if w is None:
                    continue
                if permute and gg_name == "attn_q":
                    w = _rotary_permute(w, cfg.num_attention_heads)
                elif permute and gg_name == "attn_k":
                    w = _rotary_permute(w, cfg.num_key_value_heads)
                out[f"blk.{i}.{gg_name}.{kind}"] = w
    return out


def _byte_level_vocab(size: int) -> tuple[list[str], list[str]]:
    """``size`` byte-level BPE tokens (the three specials, the characters of " w0".."w9", then " w", " w0", " w1",
    ..., " w10", ...) and the merges that build them."""
    space = "\u0120"  # byte-level BPE's space
    tokens = ["<unk>", "<s>", "</s>", space, "w", *"0123456789"]
    merges = []
    frontier = [space + "w"]
    merges.append(f"{space} w")
    tokens.append(space + "w")
    while len(tokens) < size:
        grown = []
        for stem in frontier:
            for digit in "0123456789":
                if len(tokens) < size:
                    merges.append(f"{stem} {digit}")
                    tokens.append(stem + digit)
                    grown.append(stem + digit)
        frontier = grown
    return tokens[:size], merges


def write_tiny_gguf(hf_folder: Path, path: Path, architecture: str | None = None) -> Path:
    """GGUF copy of the tiny model in ``hf_folder``, declared as ``architecture`` (default: its model type)."""
    import gguf
    from transformers import AutoConfig, AutoTokenizer

    cfg = AutoConfig.from_pretrained(hf_folder)
    architecture = architecture or cfg.model_type
    vocab = AutoTokenizer.from_pretrained(hf_folder).get_vocab()
    tokens = [t if t.startswith("<") else "\u2581" + t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = None
    if cfg.model_type != "llama":
        tokens, merges = _byte_level_vocab(len(tokens))
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_tokenizer_model("llama" if merges is None else "gpt2")
    writer.add_token_list(tokens)
    if merges is not None:
        writer.add_token_merges(merges)
    writer.add_token_scores([-float(i) for i in range(len(tokens))])
    writer.add_token_types([2, 3, 3] + [1] * (len(tokens) - 3))  # unknown, control, control, normal
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    for name, w in gguf_tensors(hf_folder).items():
        writer.add_tensor(name, np.ascontiguousarray(w, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
