"""Per-op throughput of the MX ops: native kernels vs the ONNX function bodies vs the numpy reference.

    python bench/ops.py [--threads 1] [--repeat 20] [--out bench/results/ops.md]

Shapes are SmolLM2-135M's: activations [512, 576] (MXQuantizeDequantize along the last axis) and a weight
[576, 1536] (MXDequantize along axis 0). Each case is a one-node model; times are medians of ``--repeat`` runs
after one warm-up run. The function-body column needs ``mxonnx.ops.functions`` and is skipped without it.
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
from mxonnx.ops.native import native_library_path  # noqa: E402
from mxonnx.session import create_session  # noqa: E402

DOMAIN = "com.mxonnx"
ACTIVATIONS = (512, 576)
WEIGHT = (576, 1536)
QDQ_FORMATS = ("mxint8-128", "mxint8-32", "mxfp8e4m3-32", "mxint4-128", "mxfp4-32")
DEQUANTIZE_FORMATS = ("mxint4-128", "mxint4-32", "mxfp4-32", "mxint8-128", "mxfp8e4m3-32")
CODE_TYPES = {"mxint2": TensorProto.INT4, "mxint3": TensorProto.INT4, "mxint4": TensorProto.INT4,
              "mxfp4": TensorProto.UINT4}


def _with_functions(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """``model`` plus the ops' FunctionProtos, or None when mxonnx.ops.functions is not available."""
    try:
        from mxonnx.ops.functions import add_functions
    except ImportError:
        return None
    return add_functions(model)


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


def median_ms(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def run_case(op: str, fmt: str, model, feeds, reference, threads: int, repeat: int) -> dict:
    row = {"op": op, "format": fmt}
    native = create_session(model.SerializeToString(), threads=threads)
    row["native_ms"] = median_ms(lambda: native.run(None, feeds), repeat)
    with_functions = _with_functions(model)
    if with_functions is not None:
        body = create_session(with_functions.SerializeToString(), threads=threads, use_native=False)
        row["function_ms"] = median_ms(lambda: body.run(None, feeds), repeat)
    row["numpy_ms"] = median_ms(reference, repeat)
    return row


def markdown(rows: list[dict], threads: int) -> str:
    lines = [f"MX op throughput, {threads} thread(s); activations {list(ACTIVATIONS)}, weight {list(WEIGHT)}; "
             "median ms per call (speed-up of native in parentheses)", "",
             "| op | format | native ms | function body ms | numpy ms |", "|---|---|---:|---:|---:|"]
    for r in rows:
        fn = f"{r['function_ms']:.2f} ({r['function_ms'] / r['native_ms']:.1f}x)" if "function_ms" in r else "n/a"
        lines.append(f"| {r['op']} | {r['format']} | {r['native_ms']:.3f} | {fn} | "
                     f"{r['numpy_ms']:.2f} ({r['numpy_ms'] / r['native_ms']:.1f}x) |")
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
