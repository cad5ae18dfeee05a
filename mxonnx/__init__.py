"""mxonnx: microscaling (MX) post-training quantization of Llama models as ONNX graphs.

Method: Sharify et al., "Post Training Quantization of Large Language Models with
Microscaling Formats" (arXiv 2405.07135): SmoothQuant, AWQ and GPTQ with MX formats.
"""

__version__ = "0.1.0"
