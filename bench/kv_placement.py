"""Whether the KV-cache quantizers (``mxonnx quantize --kv``) should be in the graph while the decoder blocks are
calibrated (the default, ``kv_in_calibration=True``: every block's statistics and GPTQ Hessians are taken on the
attention of quantized keys and values and on hidden states of a prefix that quantizes them) or only added after
the linears are done (``False``). Same model, formats, method and calibration set otherwise; scored by
``mxonnx eval`` on the first windows of WikiText-2 test.

    python bench/kv_placement.py MODEL [--weights mxint4-32] [--acts mxint8-32] [--kv mxint4-32] [--method gptq]
        [--calib-samples 32] [--windows 4] [--results FILE]     # prints one JSON object
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def measure(model: Path, weights: str, acts: str, kv: str, method: str, calib_samples: int, windows: int) -> dict:
    from mxonnx.config import QuantizeConfig
    from mxonnx.eval import evaluate_perplexity
    from mxonnx.quantize import quantize_model

    rows = []
    with tempfile.TemporaryDirectory(prefix="kv_placement.") as tmp:
        for in_calibration in (True, False):
            out = Path(tmp) / f"in_calibration_{in_calibration}"
            start = time.perf_counter()
            quantize_model(model, out, QuantizeConfig(weights=weights, acts=acts, kv=kv, method=method,
                                                      calib_samples=calib_samples, kv_in_calibration=in_calibration,
                                                      progress=False))
            seconds = time.perf_counter() - start
            ppl = evaluate_perplexity(out, max_windows=windows, progress=False)["perplexity"]
            rows.append({"kv_in_calibration": in_calibration, "perplexity": ppl, "quantize_seconds": seconds})
    return {"model": str(model), "weights": weights, "acts": acts, "kv": kv, "method": method,
            "calib_samples": calib_samples, "windows": windows, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--weights", default="mxint4-32")
    parser.add_argument("--acts", default="mxint8-32")
    parser.add_argument("--kv", default="mxint4-32")
    parser.add_argument("--method", default="gptq")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--results", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    result = measure(args.model, args.weights, args.acts, args.kv, args.method, args.calib_samples, args.windows)
    text = json.dumps(result, indent=1)
    if args.results:
        args.results.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
