"""Whole-model speed of SmolLM2-135M: FP32 against W4A8 (MXINT4-128 weights, MXINT8-128 activations) run as ONNX
function bodies, as native kernels, and as native fused MXMatMul kernels.

    python bench/native_model.py [--fp32 models/cache/smollm2-135m-fp32] [--quantized models/cache/smollm2-135m-w4a8-rtn]
                                 [--threads 2] [--repeat 5] [--out bench/results/native_model.md]

Prefill: one forward pass over --prefill tokens of WikiText-2 (empty KV cache), ms. Decode: --new greedy tokens after
a --prompt-token prompt, one token per forward pass feeding the KV cache back (our own onnxruntime loop), tokens/s.
Each figure is the median of --repeat runs after one warm-up (wall clock; the machine is shared, so medians).

Variants of the quantized model (``mxonnx quantize ... --method rtn``):
- function bodies: no native library; onnxruntime constant-folds each weight's MXDequantize body into an fp32
  initializer at session start, the activation quantizers run as standard-op bodies;
- native: MXQuantizeDequantize and MXDequantize kernels (the weight is decoded on every run);
- native fused: ``passes/fuse_mx_matmul`` in memory, MXMatMul decodes weight panels inside its GEMM;
- native, weights predecoded: each MXDequantize replaced by its fp32 output (the "decode once at load" design,
  with onnxruntime's own GEMM), to weigh that alternative: fast, but the weights take fp32 memory again.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mxonnx import formats  # noqa: E402
from mxonnx.config import default_eval_text  # noqa: E402
from mxonnx.ops import schema  # noqa: E402
from mxonnx.ops.native import native_library_path  # noqa: E402
from mxonnx.passes.fuse_mx_matmul import fused_model_bytes  # noqa: E402
from mxonnx.session import EXTERNAL_DATA_FOLDER_CONFIG, create_session, session_options  # noqa: E402


def predecoded_model_bytes(path: Path) -> bytes:
    """The model with every constant MXDequantize replaced by its fp32 output (numpy reference decode)."""
    model = ir.load(path)
    for node in list(model.graph):
        if node.domain != schema.DOMAIN or node.op_type != schema.DEQUANTIZE:
            continue
        codes, exponents = (v.const_value.numpy() for v in node.inputs)
        fmt = node.attributes[schema.FORMAT_ATTR].as_string()
        weight = ir.Value(name=node.outputs[0].name + "_fp32", const_value=ir.tensor(
            formats.dequantize(codes.astype(np.int64), exponents, fmt, 0)))
        model.graph.register_initializer(weight)
        ir.convenience.replace_all_uses_with(node.outputs[0], weight)
        model.graph.remove(node, safe=True)
    onnx_ir.passes.common.RemoveUnusedNodesPass()(model)  # also drops the unused code/exponent initializers
    return ir.serde.serialize_model(model).SerializeToString()


def open_variant(name: str, fp32: Path, quantized: Path, threads: int) -> ort.InferenceSession:
    onnx_file = quantized / "model.onnx"
    if name == "FP32":
        return create_session(fp32 / "model.onnx", threads=threads)
    if name == "W4A8 function bodies":
        return create_session(onnx_file, threads=threads, use_native=False)
    if name == "W4A8 native":
        return create_session(onnx_file, threads=threads)
    options = session_options(threads=threads)
    options.add_session_config_entry(EXTERNAL_DATA_FOLDER_CONFIG, str(quantized))  # embeddings stay external
    model = fused_model_bytes(onnx_file) if name == "W4A8 native fused" else predecoded_model_bytes(onnx_file)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


VARIANTS = ("FP32", "W4A8 function bodies", "W4A8 native", "W4A8 native fused", "W4A8 native, weights predecoded")


class Runner:
    """Feeds an optimum decoder graph: empty or given KV cache, attention mask and positions."""

    def __init__(self, session: ort.InferenceSession):
        self.session = session
        self.inputs = {i.name: i for i in session.get_inputs()}
        self.past = [n for n in self.inputs if n.startswith("past_key_values.")]
        self.presents = [n.replace("past_key_values.", "present.") for n in self.past]

    def forward(self, ids: np.ndarray, past: list[np.ndarray] | None) -> tuple[np.ndarray, list[np.ndarray]]:
        start = 0 if past is None else past[0].shape[2]
        feed = {"input_ids": ids, "attention_mask": np.ones((1, start + ids.shape[1]), np.int64),
                "position_ids": np.arange(start, start + ids.shape[1], dtype=np.int64)[None]}
        for i, name in enumerate(self.past):
            _, heads, _, dim = self.inputs[name].shape
            feed[name] = np.zeros((1, heads, 0, dim), np.float32) if past is None else past[i]
        logits, *presents = self.session.run(["logits", *self.presents], feed)
        return logits, presents

    def decode(self, prompt: np.ndarray, new: int) -> tuple[float, list[int]]:
        """Seconds for ``new`` greedy tokens after ``prompt`` (the prompt's forward pass not counted), tokens."""
        logits, past = self.forward(prompt, None)
        token = int(logits[0, -1].argmax())
        tokens = [token]
        start = time.perf_counter()
        for _ in range(new):
            logits, past = self.forward(np.array([[token]], np.int64), past)
            token = int(logits[0, -1].argmax())
            tokens.append(token)
        return time.perf_counter() - start, tokens


def measure(runner: Runner, ids: np.ndarray, prompt: int, prefill: int, new: int, repeat: int) -> dict:
    prefill_ids = ids[None, :prefill]
    runner.forward(prefill_ids, None)  # warm-up
    prefill_s = []
    for _ in range(repeat):
        start = time.perf_counter()
        runner.forward(prefill_ids, None)
        prefill_s.append(time.perf_counter() - start)
    runner.decode(ids[None, :prompt], 4)  # warm-up
    decode = [runner.decode(ids[None, :prompt], new) for _ in range(repeat)]
    return {"prefill_ms": 1e3 * statistics.median(prefill_s), "prefill_spread": (min(prefill_s), max(prefill_s)),
            "tokens_per_s": new / statistics.median(s for s, _ in decode), "tokens": decode[0][1]}


def token_ids(folder: Path, count: int) -> np.ndarray:
    from transformers import AutoTokenizer

    text = default_eval_text().read_text()[:20 * count]
    ids = AutoTokenizer.from_pretrained(folder)(text)["input_ids"]
    if len(ids) < count:
        raise SystemExit(f"only {len(ids)} tokens of text for {count}")
    return np.array(ids[:count], np.int64)


def markdown(rows: list[dict], args) -> str:
    base = rows[0]
    lines = [f"SmolLM2-135M on {args.threads} threads (CPU onnxruntime {ort.__version__}): prefill of {args.prefill} "
             f"tokens, and greedy decode of {args.new} tokens after a {args.prompt}-token prompt with KV cache. "
             f"Medians of {args.repeat} runs after a warm-up, wall clock, on a shared and noisy machine; ratios "
             "against FP32 (prefill: time ratio, lower is better; decode: speed ratio, higher is better).", "",
             "| variant | session s | prefill ms | vs FP32 | decode tok/s | vs FP32 | same tokens as W4A8 native |",
             "|---|---:|---:|---:|---:|---:|:---:|"]
    reference = next((r["tokens"] for r in rows if r["variant"] == "W4A8 native"), None)
    for r in rows:
        same = "" if reference is None or r["variant"] == "FP32" else ("yes" if r["tokens"] == reference else "no")
        lines.append(f"| {r['variant']} | {r['session_s']:.1f} | {r['prefill_ms']:.0f} | "
                     f"{r['prefill_ms'] / base['prefill_ms']:.2f}x | {r['tokens_per_s']:.1f} | "
                     f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x | {same} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fp32", type=Path, default=Path("models/cache/smollm2-135m-fp32"))
    parser.add_argument("--quantized", type=Path, default=Path("models/cache/smollm2-135m-w4a8-rtn"),
                        help="W4A8 model; made with `mxonnx quantize --method rtn` when missing")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    args = parser.parse_args()
    if native_library_path() is None:
        print("native library not built: run python -m mxonnx.ops.native build", file=sys.stderr)
        return 1
    if not args.quantized.exists():
        subprocess.run([sys.executable, "-m", "mxonnx.cli", "quantize", str(args.fp32), "-o", str(args.quantized),
                        "--weights", "mxint4-128", "--acts", "mxint8-128", "--method", "rtn"], check=True)
    ids = token_ids(args.fp32, max(args.prefill, args.prompt))
    rows = []
    for name in ["FP32", *(v for v in args.variants if v != "FP32")]:
        start = time.perf_counter()
        runner = Runner(open_variant(name, args.fp32, args.quantized, args.threads))
        session_s = time.perf_counter() - start
        rows.append({"variant": name, "session_s": session_s,
                     **measure(runner, ids, args.prompt, args.prefill, args.new, args.repeat)})
        print(f"{name}: prefill {rows[-1]['prefill_ms']:.0f} ms, decode {rows[-1]['tokens_per_s']:.1f} tok/s",
              file=sys.stderr, flush=True)
        del runner
    table = markdown(rows, args)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
