"""Inference speed of one ONNX model folder through the project's onnxruntime session (native MX ops registered):
prefill milliseconds for a prompt of ``--prompt`` tokens, and decode tokens per second with the KV cache.

Prefill: median wall time of ``--repeat`` runs of the whole prompt with an empty past (after one warm-up run).
Decode: after the prefill, ``--decode`` greedy steps of one token each, feeding back ``present.*`` as
``past_key_values.*``; tokens/s = steps / their total wall time. Graphs without KV-cache inputs report no decode.
Prompt ids are seeded random ids from the vocabulary (speed does not depend on the text). ``native_library``
says whether the MX ops ran as native kernels or as their ONNX function bodies, ``fused`` whether the quantized
linears ran as fused MXMatMul. ``prefill_cpu_ms`` / ``decode_cpu_tokens_per_second`` are the same figures in the
process's CPU time (all threads): at 1 thread they are the work itself, immune to other processes on a shared machine.

    python bench/speed.py MODEL_FOLDER [--threads 1] [--prompt 512] [--decode 64] [--repeat 3] [--no-fuse]  # one JSON
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np


def measure_speed(folder: Path, threads: int, prompt: int, decode: int, repeat: int, fuse: bool = True) -> dict:
    from transformers import AutoConfig

    from mxonnx.eval import OrtCausalLM
    from mxonnx.modelio import resolve_model
    from mxonnx.session import native_library

    paths = resolve_model(folder)
    config = AutoConfig.from_pretrained(paths.folder)
    lm = OrtCausalLM(paths.onnx, config=config, threads=threads, fuse=fuse)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, size=(1, prompt), dtype=np.int64)
    feed = lm.feed(ids)
    output_names = [o.name for o in lm.session.get_outputs()]
    lm.session.run(output_names, feed)  # warm-up
    times, cpu_times = [], []
    for _ in range(repeat):
        start, cpu_start = time.perf_counter(), time.process_time()
        outputs = dict(zip(output_names, lm.session.run(output_names, feed)))
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    native = native_library()
    result = {"native_library": str(native) if native else None, "fused": fuse, "threads": threads,
              "prompt_tokens": prompt,
              "prefill_ms": 1000 * statistics.median(times), "prefill_cpu_ms": 1000 * statistics.median(cpu_times),
              "decode_tokens": None, "decode_tokens_per_second": None, "decode_cpu_tokens_per_second": None}
    if not lm.past_names or decode == 0:
        return result
    length = prompt
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(decode):
        token = outputs["logits"][:, -1].argmax(-1).reshape(1, 1).astype(np.int64)
        step = {"input_ids": token}
        if "attention_mask" in lm.inputs:
            step["attention_mask"] = np.ones((1, length + 1), dtype=np.int64)
        if "position_ids" in lm.inputs:
            step["position_ids"] = np.array([[length]], dtype=np.int64)
        for name in lm.past_names:
            step[name] = outputs[name.replace("past_key_values.", "present.")]
        outputs = dict(zip(output_names, lm.session.run(output_names, step)))
        length += 1
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    result.update(decode_tokens=decode, decode_tokens_per_second=decode / seconds,
                  decode_cpu_tokens_per_second=decode / cpu_seconds)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--decode", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=True,
                        help="fused MXMatMul linears (default; --no-fuse: the graph as saved)")
    args = parser.parse_args()
    print(json.dumps(measure_speed(args.model, args.threads, args.prompt, args.decode, args.repeat, args.fuse)))


if __name__ == "__main__":
    main()
