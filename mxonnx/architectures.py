"""The decoder architectures mxonnx accepts: Llama blocks (RMSNorm, grouped-query attention with rotary embeddings,
SiLU-gated MLP), optionally with biases on their linears.

- ``llama``: ``LlamaForCausalLM`` (``attention_bias`` / ``mlp_bias``, tied or untied embeddings, rope scaling such
  as ``llama3``);
- ``mistral``: ``MistralForCausalLM``, a Llama block with a sliding-window attention mask;
- ``qwen2``: ``Qwen2ForCausalLM``, a Llama block with biases on q/k/v.

optimum exports all three as the same graph pattern (its ``LlamaOnnxConfig``, ``MistralOnnxConfig`` and
``Qwen2OnnxConfig``), and they share the parameter names ``model.layers.{i}.self_attn.q_proj.weight`` etc.
"""

from __future__ import annotations

CAUSAL_LM_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
GGUF_ARCHITECTURES = ("llama", "qwen2")  # GGUF ``general.architecture`` values (llama.cpp writes Mistral as llama)


def causal_lm_class(config):
    """The transformers class of ``config``'s model type (``config.model_type`` in :data:`CAUSAL_LM_CLASSES`)."""
    import transformers

    return getattr(transformers, CAUSAL_LM_CLASSES[config.model_type])
