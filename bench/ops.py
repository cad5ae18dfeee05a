"""Per-op throughput of the MX ops: native kernels vs the ONNX function bodies vs the numpy reference.

    python bench/ops.py [--threads 1] [--repeat 20] [--out bench/results/ops.md]

Shapes are SmolLM2-135M's: activations [512, 576] (MXQuantizeDequantize along the last axis) and a weight
[576, 1536] (MXDequantize along axis 0). Each case is a one-node model run through IOBinding (no output copy);
times are medians of ``--repeat`` runs after one warm-up, in process CPU time with one thread (the machine is
shared) and wall time otherwise. The function bodies run in the same model with the native library not registered.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mxonnx import formats  # noqa: E402
from mxonnx.ops import functions, schema  # noqa: E402
from mxonnx.ops.native import native_library_path  # noqa: E402
from mxonnx.session import create_session  # noqa: E402

DOMAIN = "com.mxonnx"
ACTIVATIONS = (512, 576)
WEIGHT = (576, 1536)
QDQ_FORMATS = ("mxint8-128", "mxint8-32", "mxfp8e4m3-32", "mxint4-128", "mxfp4-32")
DEQUANTIZE_FORMATS = ("mxint4-128", "mxint4-32", "mxfp4-32", "mxint8-128", "mxfp8e4m3-32")
CODE_TYPES = {"mxint2": TensorProto.INT4, "mxint3": TensorProto.INT4, "mxint4": TensorProto.INT4,
              "mxfp4": TensorProto.UINT4}


def _with_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose nodes call their format's FunctionProto, as saved graphs do."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for node in out.graph.node:
        fmt = next(a.s.decode() for a in node.attribute if a.name == "format")
        node.overload = schema.overload(fmt)
        out.functions.append(functions.function_proto(node.op_type, fmt))
    return out


def _model(node: onnx.NodeProto, inputs, initializers=()) -> onnx.ModelProto:
    graph = helper.make_graph([node], "bench", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(DOMAIN, 1)],
                             ir_version=10)


def qdq_case(fmt: str, rng: np.random.Generator):
    x = rng.standard_normal(ACTIVATIONS).astype(np.float32)
    node = helper.make_node("MXQuantizeDequantize", ["x"], ["y"], domain=DOMAIN, format=fmt, axis=-1)
    model = _model(node, [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(ACTIVATIONS))])
    return model, {"x": x}, lambda: formats.quantize_dequantize(x, fmt, -1)


def dequantize_case(fmt: str, rng: np.random.Generator):
    w = rng.standard_normal(WEIGHT).astype(np.float32)
    codes, exponents = formats.quantize(w, fmt, 0)
    code_type = CODE_TYPES.get(fmt.split("-")[0])
    if code_type is None:
        code_init = numpy_helper.from_array(codes, "codes")
    else:
        code_init = helper.make_tensor("codes", code_type, codes.shape, codes.astype(np.int64).ravel().tolist())
    node = helper.make_node("MXDequantize", ["codes", "exponents"], ["y"], domain=DOMAIN, format=fmt, axis=0)
    model = _model(node, [], [code_init, numpy_helper.from_array(exponents, "exponents")])
    return model, {}, lambda: formats.dequantize(codes, exponents, fmt, 0)


def _timer(threads: int):
    """Process CPU time for one thread (robust on a shared machine), wall time for several."""
    return time.process_time if threads == 1 else time.perf_counter


def median_ms(fn, repeat: int, clock) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = clock()
        fn()
        times.append(clock() - start)
    return 1e3 * statistics.median(times)


def _bound_run(session, feeds: dict):
    """A call running ``session`` through IOBinding: no copy of the output into numpy per call."""
    binding = session.io_binding()
    for name, value in feeds.items():
        binding.bind_cpu_input(name, value)
    binding.bind_output("y", "cpu")
    return lambda: session.run_with_iobinding(binding)


def run_case(op: str, fmt: str, model, feeds, reference, threads: int, repeat: int) -> dict:
    clock = _timer(threads)
    # With graph optimisations on, onnxruntime constant-folds a function body whose inputs are all initializers
    # (a weight's MXDequantize) at session creation, leaving nothing to time: such cases run unoptimised.
    optimize = bool(feeds)
    native = create_session(model.SerializeToString(), threads=threads, optimize=optimize)
    body = create_session(_with_functions(model).SerializeToString(), threads=threads, use_native=False,
                          optimize=optimize)
    return {"op": op, "format": fmt,
            "native_ms": median_ms(_bound_run(native, feeds), repeat, clock),
            "function_ms": median_ms(_bound_run(body, feeds), repeat, clock),
            "numpy_ms": median_ms(reference, repeat, clock)}


def markdown(rows: list[dict], threads: int) -> str:
    clock = "CPU" if threads == 1 else "wall"
    lines = [f"MX op throughput, {threads} thread(s): activations {list(ACTIVATIONS)}, weight {list(WEIGHT)}; "
             f"median {clock} ms per call, speed-up of native in parentheses. MXDequantize runs with graph "
             "optimisations off (else onnxruntime folds the function body of a constant weight into fp32).", "",
             "| op | format | native ms | function body ms | numpy ms |", "|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['op']} | {r['format']} | {r['native_ms']:.3f} | "
                     f"{r['function_ms']:.2f} ({r['function_ms'] / r['native_ms']:.0f}x) | "
                     f"{r['numpy_ms']:.2f} ({r['numpy_ms'] / r['native_ms']:.0f}x) |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    args = parser.parse_args()
    if native_library_path() is None:
        print("native library not built: run python -m mxonnx.ops.native build", file=sys.stderr)
        return 1
    rng = np.random.default_rng(0)
    rows = [run_case("MXQuantizeDequantize", f, *qdq_case(f, rng), args.threads, args.repeat) for f in QDQ_FORMATS]
    rows += [run_case("MXDequantize", f, *dequantize_case(f, rng), args.threads, args.repeat)
             for f in DEQUANTIZE_FORMATS]
    table = markdown(rows, args.threads)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
