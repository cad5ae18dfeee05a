"""Write a tiny Hugging Face Llama as a float32 GGUF file the way llama.cpp's converter lays it out
(tensor names, q/k rows permuted for its rotary layout, a SentencePiece-style "llama" vocabulary)."""

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
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(hf_folder, dtype=torch.float32)
    cfg = model.config
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    out = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
    for i in range(cfg.num_hidden_layers):
        for hf_name, gg_name in _BLOCK_TENSORS.items():
            w = sd[f"model.layers.{i}.{hf_name}.weight"]
            if gg_name == "attn_q":
                w = _rotary_permute(w, cfg.num_attention_heads)
            elif gg_name == "attn_k":
                w = _rotary_permute(w, cfg.num_key_value_heads)
            out[f"blk.{i}.{gg_name}.weight"] = w
    return out


def write_tiny_gguf(hf_folder: Path, path: Path, architecture: str = "llama") -> Path:
    """GGUF copy of the tiny Llama in ``hf_folder`` (tied embeddings, so no ``output.weight``)."""
    import gguf
    from transformers import AutoTokenizer, LlamaConfig

    cfg = LlamaConfig.from_pretrained(hf_folder)
    vocab = AutoTokenizer.from_pretrained(hf_folder).get_vocab()
    tokens = [t if t.startswith("<") else "\u2581" + t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
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
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
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
