"""Where the time of one model's prefill and decode goes, by op type, from onnxruntime's own profiler
(``SessionOptions.enable_profiling``), the graph fused for inference (``--fuse``, as ``create_session(fuse=True)``)
or as saved (``--no-fuse``).

Prefill: one run of ``--prompt`` seeded random ids after a warm-up; decode: ``--decode`` steps of one token on
that prompt's cache. Per phase: the run's wall time, the summed kernel times, the nodes run, and per op type its
kernel time (per run), share and node count. Profiling adds a fixed cost per node, so the shares of many small
nodes are upper bounds. Also prints the op types of the graph onnxruntime runs after its own ORT_ENABLE_ALL fusions.

    python bench/profile_ops.py MODEL_FOLDER [--fuse] [--threads 1] [--prompt 512] [--decode 16] [--json]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile
from pathlib import Path

import numpy as np


def _session(onnx_path: Path, threads: int, fuse: bool, folder: str):
    import onnxruntime as ort

    from mxonnx.passes.fuse_inference import fused_model_bytes
    from mxonnx.session import EXTERNAL_DATA_FOLDER_CONFIG, session_options

    so = session_options(threads=threads)
    so.enable_profiling = True
    so.profile_file_prefix = os.path.join(folder, "profile")
    so.optimized_model_filepath = os.path.join(folder, "optimized.onnx")
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.data")
    so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    target = fused_model_bytes(onnx_path) if fuse else None
    if target is not None:
        so.add_session_config_entry(EXTERNAL_DATA_FOLDER_CONFIG, str(onnx_path.resolve().parent))
    return ort.InferenceSession(target if target is not None else str(onnx_path), so,
                                providers=["CPUExecutionProvider"])


def _by_op(events: list[dict], runs: list[dict]) -> dict:
    start = runs[0]["ts"]
    kernel, count = collections.Counter(), collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and event["ts"] >= start:
            kernel[event["args"]["op_name"]] += event["dur"]
            count[event["args"]["op_name"]] += 1
    n, total = len(runs), sum(kernel.values())
    return {"run_ms": sum(r["dur"] for r in runs) / n / 1000, "kernel_ms": total / n / 1000,
            "nodes": sum(count.values()) // n,
            "ops": [{"op": op, "ms": t / n / 1000, "share": t / total, "nodes": count[op] // n}
                    for op, t in kernel.most_common()]}


def profile(folder: Path, fuse: bool, threads: int, prompt: int, decode: int) -> dict:
    import onnx
    from transformers import AutoConfig

    from mxonnx.modelio import resolve_model

    paths = resolve_model(folder)
    config = AutoConfig.from_pretrained(paths.folder)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    result = {}
    with tempfile.TemporaryDirectory(prefix="mxonnx-profile-") as tmp:
        for phase in ("prefill", "decode"):
            session = _session(paths.onnx, threads, fuse, tmp)
            inputs = {i.name for i in session.get_inputs()}
            past = [name for name in inputs if name.startswith("past_key_values.")]
            names = [o.name for o in session.get_outputs()]
            ids = np.random.default_rng(0).integers(0, config.vocab_size, size=(1, prompt), dtype=np.int64)
            feed = {"input_ids": ids, "attention_mask": np.ones((1, prompt), dtype=np.int64),
                    "position_ids": np.arange(prompt, dtype=np.int64)[None]}
            feed = {k: v for k, v in feed.items() if k in inputs}
            feed.update({name: np.zeros((1, config.num_key_value_heads, 0, head_dim), np.float32) for name in past})
            session.run(names, feed)  # warm-up
            out = dict(zip(names, session.run(names, feed)))
            steps = 0
            if phase == "decode":
                if not past:
                    break
                for steps in range(1, decode + 1):
                    length = prompt + steps - 1
                    step = {"input_ids": out["logits"][:, -1].argmax(-1).reshape(1, 1).astype(np.int64),
                            "attention_mask": np.ones((1, length + 1), dtype=np.int64),
                            "position_ids": np.array([[length]], dtype=np.int64)}
                    step.update({n: out[n.replace("past_key_values.", "present.")] for n in past})
                    out = dict(zip(names, session.run(names, {k: v for k, v in step.items() if k in inputs})))
            events = json.loads(Path(session.end_profiling()).read_text())
            runs = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"]
            result[phase] = _by_op(events, runs[-max(steps, 1):])
        graph = onnx.load(os.path.join(tmp, "optimized.onnx"), load_external_data=False).graph
        result["optimized_graph"] = dict(collections.Counter(n.op_type for n in graph.node).most_common())
    return {"model": str(folder), "fused": fuse, "threads": threads, "prompt": prompt, "decode_steps": decode,
            **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--decode", type=int, default=16)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    r = profile(args.model, args.fuse, args.threads, args.prompt, args.decode)
    if args.json:
        print(json.dumps(r))
        return
    for phase in ("prefill", "decode"):
        if phase not in r:
            continue
        p = r[phase]
        print(f"{phase}: run {p['run_ms']:.2f} ms, kernels {p['kernel_ms']:.2f} ms, {p['nodes']} nodes")
        for op in p["ops"][: args.top]:
            print(f"  {op['op']:30s} {op['ms']:9.3f} ms {100 * op['share']:5.1f} %  {op['nodes']:5d} nodes")
    print("optimized graph:", ", ".join(f"{op} {n}" for op, n in r["optimized_graph"].items()))


if __name__ == "__main__":
    main()
