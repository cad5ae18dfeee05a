"""GPTQ time and memory of one Llama decoder block (project issue 17 item 5), on seeded synthetic data.

For each input group of a block (qkv, o, gate_up, down) the activations are ``X [tokens, K]`` rows
``x = z_r B + 0.3 z`` (a rank-``r`` correlated part plus noise, ``z`` standard normal) with 1% outlier channels
scaled 20x, and ``H = 2/n X^T X`` (paper Eq. 7; float32 grams of row chunks summed in float64, as
``HessianAccumulator``). Weights are ``0.02 * N(0, 1)`` in the MatMul layout ``[K, N]``. Then, as
``GptqWeightProvider`` does, the group's ``inverse_hessian_factor`` runs once ("factor") and ``gptq_quantize`` once
per linear of the group ("loop"), each timed with the peak RSS above the RSS before the call (sampled every 2 ms).

Threads as in ``mxonnx quantize``: OPENBLAS_NUM_THREADS=1 for numpy (``mxonnx.gptq`` runs its large products on
its own pool of threads, one per core up to 4), torch at its default. Times are wall and CPU seconds; on a shared
machine compare them with the load averages printed.

``--impl FILE`` profiles another implementation of ``mxonnx/gptq.py`` (e.g. ``git show HEAD:mxonnx/gptq.py``).
``--compare FILE`` also runs another implementation on the same inputs and reports how many codes/scales differ
(code steps: integer codes apart, meaningful for MXINT and int formats) and both GPTQ objectives
``||X W - X Q||^2`` (also given by ``--objective``; ``= n/2 tr(D^T H D)``, ``D = W - Q``).

``--forward`` measures the block's calibration forward: a one-block float32 ONNX graph of the same shape
(RMSNorm, q/k/v, RoPE, GQA causal attention, o, residual, RMSNorm, SiLU-gated MLP, residual) run by onnxruntime
with ``--ort-threads`` (2) threads on ``tokens / seqlen`` windows of ``[1, seqlen, hidden]``, one window per run as
``BlockwiseRunner`` does (after one warm-up window).

    python bench/gptq_profile.py [--shape 7b|smollm2] [--linears q,k,v,o,gate,up,down] [--forward] [--json]
    git show HEAD:mxonnx/gptq.py > /tmp/gptq_head.py
    python bench/gptq_profile.py --shape smollm2 --compare /tmp/gptq_head.py
    python bench/gptq_profile.py --impl /tmp/gptq_head.py --linears q,k,v,o,gate,up   # the old one's down_proj
                                                                   # factor holds ~7 float64 copies (6.8 GB)
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as the CLI sets it, before numpy loads OpenBLAS

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mxonnx import formats, gptq  # noqa: E402

SHAPES = {  # hidden, intermediate, heads, kv heads, head_dim
    "7b": (4096, 11008, 32, 8, 128),
    "smollm2": (576, 1536, 9, 3, 64),
}
LINEARS = ("q", "k", "v", "o", "gate", "up", "down")
GROUP = {"q": "qkv", "k": "qkv", "v": "qkv", "o": "o", "gate": "gate_up", "up": "gate_up", "down": "down"}
TWIN = {"q": "o", "o": "q", "k": "v", "v": "k", "gate": "up", "up": "gate"}  # same K and N, for extrapolation


def linear_shapes(shape: str) -> dict[str, tuple[int, int]]:
    hidden, inter, heads, kv, head_dim = SHAPES[shape]
    return {"q": (hidden, heads * head_dim), "k": (hidden, kv * head_dim), "v": (hidden, kv * head_dim),
            "o": (heads * head_dim, hidden), "gate": (hidden, inter), "up": (hidden, inter), "down": (inter, hidden)}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    """Peak RSS above the RSS at entry, sampled every ``period`` seconds by a thread."""

    def __init__(self, period: float = 0.002):
        self.period, self.peak, self._stop = period, 0, threading.Event()

    def __enter__(self):
        self.base = rss_bytes()
        self.peak = self.base
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.period)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def above_mb(self) -> float:
        return (self.peak - self.base) / 2**20


def synthetic_hessian(k: int, tokens: int, seed: int, rank: int = 256, chunk: int = 1024) -> np.ndarray:
    """2/n X^T X of the docstring's X, float64 [k, k], accumulated over row chunks (X is never held whole)."""
    import torch

    rng = np.random.default_rng(seed)
    basis = torch.from_numpy(rng.standard_normal((rank, k), dtype=np.float32) / np.float32(np.sqrt(rank)))
    outliers = rng.choice(k, max(1, k // 100), replace=False)
    xtx = torch.zeros((k, k), dtype=torch.float64)
    for start in range(0, tokens, chunk):
        rows = min(chunk, tokens - start)
        z = torch.from_numpy(rng.standard_normal((rows, k), dtype=np.float32))
        x = torch.from_numpy(rng.standard_normal((rows, rank), dtype=np.float32)) @ basis + 0.3 * z
        x[:, outliers] *= 20.0
        xtx += (x.T @ x).double()
    return (xtx * (2.0 / tokens)).numpy()


def cached_hessian(cache: Path | None, k: int, tokens: int, seed: int) -> np.ndarray:
    path = cache / f"hessian-k{k}-t{tokens}-s{seed}.npy" if cache else None
    if path is not None and path.exists():
        return np.load(path)
    h = synthetic_hessian(k, tokens, seed)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, h)
    return h


def gptq_objective(h: np.ndarray, w: np.ndarray, q: np.ndarray, tokens: int) -> float:
    """||X W - X Q||^2 = n/2 tr(D^T H D), D = W - Q (float64 via torch)."""
    import torch

    d = torch.from_numpy(w.astype(np.float64) - q)
    return float((d * (torch.from_numpy(h) @ d)).sum()) * tokens / 2


def load_module(path: Path, name: str = "gptq_other"):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def profile(args) -> dict:
    shapes = linear_shapes(args.shape)
    chosen = [s for s in args.linears.split(",") if s]
    unknown = set(chosen) - set(LINEARS)
    if unknown:
        raise SystemExit(f"unknown linears {sorted(unknown)}; choose from {','.join(LINEARS)}")
    fmt = formats.parse_format(args.fmt)
    other = load_module(args.compare) if args.compare else None
    impl = load_module(args.impl, "gptq_profiled") if args.impl else gptq
    order_unit = (fmt.block_size or 1) if args.act_order else None
    import torch

    torch.linalg.cholesky(torch.eye(2))  # torch (data set-up; older implementations factor with it) loaded first
    load_before = os.getloadavg()
    rows, factor_s, factor_cpu = [], {}, {}
    for group in dict.fromkeys(GROUP[name] for name in chosen):
        names = [name for name in chosen if GROUP[name] == group]
        k = shapes[names[0]][0]
        h = cached_hessian(args.cache, k, args.tokens, args.seed + list(GROUP.values()).index(group))
        with PeakRss() as mem:
            start, cpu = time.perf_counter(), time.process_time()
            factor = impl.inverse_hessian_factor(h, args.damp, order_unit=order_unit, name=group)
            factor_s[group], factor_cpu[group] = time.perf_counter() - start, time.process_time() - cpu
        other_factor = (other.inverse_hessian_factor(h, args.damp, order_unit=order_unit, name=group)
                        if other else None)
        for i, name in enumerate(names):
            k, n = shapes[name]
            w = (np.random.default_rng(args.seed + 100 + LINEARS.index(name)).standard_normal((k, n),
                                                                                        dtype=np.float32) * 0.02)
            with PeakRss() as loop_mem:
                start, cpu = time.perf_counter(), time.process_time()
                codes, scales = impl.gptq_quantize(w, factor, fmt, block_size=args.block, micro_block=args.micro)
                loop_s, loop_cpu = time.perf_counter() - start, time.process_time() - cpu
            row = {"linear": name, "group": group, "K": k, "N": n,
                   "factor_s": factor_s[group] if i == 0 else 0.0, "loop_s": loop_s,
                   "factor_cpu_s": factor_cpu[group] if i == 0 else 0.0, "loop_cpu_s": loop_cpu,
                   "factor_rss_mb": mem.above_mb if i == 0 else 0.0, "loop_rss_mb": loop_mem.above_mb}
            if args.objective or other:
                row["objective"] = gptq_objective(h, w, formats.dequantize(codes, scales, fmt, axis=0), args.tokens)
            if other:
                o_codes, o_scales = other.gptq_quantize(w, other_factor, fmt, block_size=args.block,
                                                        micro_block=args.micro)
                steps = np.abs(codes.astype(np.int32) - o_codes.astype(np.int32))
                row.update(codes_differing=int((steps > 0).sum()), codes_total=int(codes.size),
                           max_code_step=int(steps.max()), scales_differing=int((scales != o_scales).sum()),
                           other_objective=gptq_objective(h, w, formats.dequantize(o_codes, o_scales, fmt, axis=0),
                                                          args.tokens))
            rows.append(row)
            print(f"  {name}: factor {row['factor_s']:.2f} s, loop {loop_s:.2f} s", file=sys.stderr, flush=True)
        del h, factor, other_factor
    measured = {key: sum(r[f"factor_{key}"] + r[f"loop_{key}"] for r in rows) for key in ("s", "cpu_s")}
    return {"implementation": str(args.impl or "mxonnx/gptq.py"), "shape": args.shape, "format": fmt.name,
            "tokens": args.tokens, "block": args.block, "micro_block": args.micro, "act_order": args.act_order,
            "openblas_threads": os.environ["OPENBLAS_NUM_THREADS"], "gptq_threads": getattr(impl, "_THREADS", None),
            "torch_threads": torch.get_num_threads(), "rows": rows,
            "measured_total_s": measured["s"], "measured_total_cpu_s": measured["cpu_s"],
            "block_total_s": block_total(rows, "s"), "block_total_cpu_s": block_total(rows, "cpu_s"),
            "block_total_extrapolated": len(rows) != len(LINEARS),
            "peak_rss_mb": max([r["factor_rss_mb"] for r in rows] + [r["loop_rss_mb"] for r in rows]),
            "process_peak_rss_mb": _process_peak_mb(), "load_average_before": load_before[0],
            "load_average_after": os.getloadavg()[0]}


def block_total(rows: list[dict], key: str) -> float | None:
    """Factor + loop time of the whole block; a linear not measured counts as its twin (same K and N), a group
    factor not measured as the qkv one (every K = hidden one costs the same); None when that is not enough."""
    loops = {r["linear"]: r[f"loop_{key}"] for r in rows}
    factors = {r["group"]: r[f"factor_{key}"] for r in rows if r["factor_s"] > 0}
    if not all(name in loops or TWIN.get(name) in loops for name in LINEARS) or not {"qkv", "down"} <= set(factors):
        return None
    return (sum(factors.get(g, factors["qkv"]) for g in ("qkv", "o", "gate_up", "down"))
            + sum(loops.get(name, loops.get(TWIN.get(name))) for name in LINEARS))


def _process_peak_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------- block forward

def block_graph(shape: str, seqlen: int, seed: int = 0):
    """A float32 Llama decoder block ``h [1, seqlen, hidden] -> out`` as an ONNX model (opset 18)."""
    from onnx import TensorProto, helper, numpy_helper

    hidden, inter, heads, kv, hd = SHAPES[shape]
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def const(name, array):
        inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(op, inputs, output, **attrs):
        nodes.append(helper.make_node(op, inputs, [output], **attrs))
        return output

    def weight(name, k, n):
        return const(name, (rng.standard_normal((k, n), dtype=np.float32) * 0.02))

    def rms_norm(x, tag):
        sq = node("Mul", [x, x], f"{tag}.sq")
        ms = node("ReduceMean", [sq, const(f"{tag}.axes", np.array([-1], np.int64))], f"{tag}.ms", keepdims=1)
        inv = node("Reciprocal", [node("Sqrt", [node("Add", [ms, const(f"{tag}.eps", np.float32(1e-5))],
                                                     f"{tag}.mse")], f"{tag}.rms")], f"{tag}.inv")
        return node("Mul", [node("Mul", [x, inv], f"{tag}.n"), const(f"{tag}.g", np.ones(hidden, np.float32))],
                    f"{tag}.out")

    inv_freq = 1.0 / 10000 ** (np.arange(0, hd, 2) / hd)
    angles = np.outer(np.arange(seqlen), inv_freq)
    angles = np.concatenate([angles, angles], axis=1)
    cos, sin = const("cos", np.cos(angles).astype(np.float32)), const("sin", np.sin(angles).astype(np.float32))
    half = hd // 2
    starts, mids, ends = (const(n, np.array([v], np.int64)) for n, v in (("s0", 0), ("s1", half), ("s2", hd)))
    last = const("axis_last", np.array([-1], np.int64))

    def heads_of(x, n, tag):  # [1, S, n*hd] -> [1, n, S, hd]
        r = node("Reshape", [x, const(f"{tag}.shape", np.array([1, seqlen, n, hd], np.int64))], f"{tag}.r")
        return node("Transpose", [r], f"{tag}.t", perm=[0, 2, 1, 3])

    def rope(x, tag):
        x1 = node("Slice", [x, starts, mids, last], f"{tag}.x1")
        x2 = node("Slice", [x, mids, ends, last], f"{tag}.x2")
        rot = node("Concat", [node("Neg", [x2], f"{tag}.nx2"), x1], f"{tag}.rot", axis=-1)
        return node("Add", [node("Mul", [x, cos], f"{tag}.c"), node("Mul", [rot, sin], f"{tag}.s")], f"{tag}.out")

    def repeat_kv(x, tag):  # [1, kv, S, hd] -> [1, heads, S, hd]
        u = node("Unsqueeze", [x, const(f"{tag}.ax", np.array([2], np.int64))], f"{tag}.u")
        e = node("Expand", [u, const(f"{tag}.es", np.array([1, kv, heads // kv, seqlen, hd], np.int64))], f"{tag}.e")
        return node("Reshape", [e, const(f"{tag}.rs", np.array([1, heads, seqlen, hd], np.int64))], f"{tag}.out")

    x = rms_norm("h", "ln1")
    q = rope(heads_of(node("MatMul", [x, weight("wq", hidden, heads * hd)], "q"), heads, "qh"), "qr")
    k = repeat_kv(rope(heads_of(node("MatMul", [x, weight("wk", hidden, kv * hd)], "k"), kv, "kh"), "kr"), "kx")
    v = repeat_kv(heads_of(node("MatMul", [x, weight("wv", hidden, kv * hd)], "v"), kv, "vh"), "vx")
    scores = node("Mul", [node("MatMul", [q, node("Transpose", [k], "kt", perm=[0, 1, 3, 2])], "qk"),
                          const("scale", np.float32(1 / np.sqrt(hd)))], "qks")
    mask = const("mask", np.triu(np.full((seqlen, seqlen), -1e9, np.float32), 1))
    probs = node("Softmax", [node("Add", [scores, mask], "masked")], "probs", axis=-1)
    attn = node("Transpose", [node("MatMul", [probs, v], "pv")], "pvt", perm=[0, 2, 1, 3])
    attn = node("Reshape", [attn, const("attn.shape", np.array([1, seqlen, heads * hd], np.int64))], "attn")
    h1 = node("Add", ["h", node("MatMul", [attn, weight("wo", heads * hd, hidden)], "o")], "h1")
    x2 = rms_norm(h1, "ln2")
    gate = node("MatMul", [x2, weight("wg", hidden, inter)], "gate")
    act = node("Mul", [gate, node("Sigmoid", [gate], "gate.sig")], "gate.silu")
    mlp = node("Mul", [act, node("MatMul", [x2, weight("wu", hidden, inter)], "up")], "mlp")
    node("Add", [h1, node("MatMul", [mlp, weight("wd", inter, hidden)], "down")], "out")
    shape = [1, seqlen, hidden]
    graph = helper.make_graph(nodes, "block", [helper.make_tensor_value_info("h", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, shape)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


def measure_forward(shape: str, tokens: int, seqlen: int, threads: int) -> dict:
    import onnxruntime as ort

    model = block_graph(shape, seqlen)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    del model
    windows = tokens // seqlen
    h = np.random.default_rng(1).standard_normal((1, seqlen, SHAPES[shape][0]), dtype=np.float32)
    session.run(["out"], {"h": h})  # warm-up
    load_before = os.getloadavg()[0]
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(windows):
        session.run(["out"], {"h": h})
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    return {"forward_s": seconds, "forward_cpu_s": cpu_seconds, "windows": windows, "seqlen": seqlen,
            "ort_threads": threads, "forward_s_per_window": seconds / windows, "load_average_before": load_before,
            "load_average_after": os.getloadavg()[0]}


def table(result: dict) -> str:
    lines = [f"{'linear':8} {'K':>6} {'N':>6} {'factor s':>9} {'(cpu)':>7} {'loop s':>8} {'(cpu)':>7} "
             f"{'factor MB':>10} {'loop MB':>8}"]
    for r in result["rows"]:
        lines.append(f"{r['linear']:8} {r['K']:6} {r['N']:6} {r['factor_s']:9.2f} {r['factor_cpu_s']:7.2f} "
                     f"{r['loop_s']:8.2f} {r['loop_cpu_s']:7.2f} {r['factor_rss_mb']:10.0f} {r['loop_rss_mb']:8.0f}"
                     + (f"  codes differing {r['codes_differing']}/{r['codes_total']} (max step "
                        f"{r['max_code_step']}), scales {r['scales_differing']}, objective {r['objective']:.6g} vs "
                        f"{r['other_objective']:.6g}" if "codes_differing" in r else
                        f"  objective {r['objective']:.6g}" if "objective" in r else ""))
    total = (f"{result['block_total_s']:.1f} s (cpu {result['block_total_cpu_s']:.1f} s)"
             + (" extrapolated from twins" if result["block_total_extrapolated"] else "")
             if result["block_total_s"] is not None else "n/a")
    lines.append(f"measured {result['measured_total_s']:.1f} s (cpu {result['measured_total_cpu_s']:.1f} s); block "
                 f"total {total}; peak RSS above the call's start {result['peak_rss_mb']:.0f} MB; process peak "
                 f"{result['process_peak_rss_mb']:.0f} MB; load average {result['load_average_before']:.1f} -> "
                 f"{result['load_average_after']:.1f}")
    if "forward" in result:
        f = result["forward"]
        lines.append(f"block forward: {f['forward_s']:.1f} s, cpu {f['forward_cpu_s']:.1f} s ({f['windows']} windows x "
                     f"{f['seqlen']} tokens, {f['forward_s_per_window']:.2f} s each, onnxruntime {f['ort_threads']} "
                     f"threads; load average {f['load_average_before']:.1f} -> {f['load_average_after']:.1f})")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    parser.add_argument("--linears", default=",".join(LINEARS), help="comma-separated subset of q,k,v,o,gate,up,down")
    parser.add_argument("--fmt", default="mxint4-128")
    parser.add_argument("--tokens", type=int, default=12288)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--micro", type=int, default=None)
    parser.add_argument("--damp", type=float, default=0.01)
    parser.add_argument("--no-act-order", dest="act_order", action="store_false")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=Path, default=REPO / "bench" / ".work" / "gptq_profile",
                        help="where synthetic Hessians are kept between runs ('' to disable)")
    parser.add_argument("--impl", type=Path, default=None, help="profile this gptq.py instead of mxonnx/gptq.py")
    parser.add_argument("--compare", type=Path, default=None, help="another gptq.py to compare codes with")
    parser.add_argument("--objective", action="store_true", help="also compute ||XW - XQ||^2 per linear")
    parser.add_argument("--forward", action="store_true", help="also measure the block's calibration forward")
    parser.add_argument("--forward-only", action="store_true")
    parser.add_argument("--ort-threads", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args()
    args.cache = args.cache if str(args.cache) else None
    from mxonnx.cli import return_freed_memory

    return_freed_memory()  # as the CLI: large freed arrays go back to the OS, so RSS peaks are comparable
    result = {"shape": args.shape, "rows": []} if args.forward_only else profile(args)
    if args.forward or args.forward_only:
        result["forward"] = measure_forward(args.shape, args.tokens, args.seqlen, args.ort_threads)
    if args.json:
        print(json.dumps(result))
    elif args.forward_only:
        f = result["forward"]
        print(f"block forward: {f['forward_s']:.1f} s, cpu {f['forward_cpu_s']:.1f} s ({f['windows']} windows x "
              f"{f['seqlen']} tokens; load average {f['load_average_before']:.1f} -> {f['load_average_after']:.1f})")
    else:
        print(table(result))


if __name__ == "__main__":
    main()
