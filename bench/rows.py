"""The benchmark's rows as data: which tool, which formats, which method, which peer options.

mxonnx rows follow the paper's tables (Sharify et al., arXiv 2405.07135, Tables 2-5: W8A8 and W4A8 MXINT at
several block sizes, weight-only W4, MXFP, and per-channel INT baselines) crossed with the methods that matter
for each; peers' rows use each tool's own configurations at the closest scope (shared/peers.md).
``format_bits`` is the nominal bits per weight of the format (elements plus scales, as the format defines it);
the stored bits are measured from the model file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

from mxonnx.formats import bits_per_weight

ALL_METHODS = ("rtn", "gptq", "sq", "awq", "sq+gptq", "awq+gptq")
TOOLS = ("fp32", "mxonnx", "ort-nbits", "quark", "inc")


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the table. ``options`` are the peer runner's arguments (empty for mxonnx and fp32)."""

    tool: str
    config: str
    method: str
    weights: str
    acts: str
    format_bits: float
    options: tuple[str, ...] = ()
    quick: bool = False

    @property
    def key(self) -> str:
        """Stable id of the row's quantization recipe (not of its label or quick flag)."""
        recipe = [self.tool, self.method, self.weights, self.acts, list(self.options)]
        return hashlib.sha256(json.dumps(recipe).encode()).hexdigest()[:16]

    @property
    def label(self) -> str:
        return f"{self.tool} {self.config} {self.method}"


# (config label, weight format, activation format, methods, methods also in --quick)
MXONNX_CONFIGS = (
    ("W8A8 MXINT8-128", "mxint8-128", "mxint8-128", ALL_METHODS, ("rtn",)),
    ("W4A8 MXINT4-128", "mxint4-128", "mxint8-128", ALL_METHODS, ("rtn", "awq+gptq")),
    ("W4A8 MXINT4-32", "mxint4-32", "mxint8-32", ("rtn", "gptq", "awq+gptq"), ()),
    ("W4A8 MXINT4-16", "mxint4-16", "mxint8-16", ALL_METHODS, ()),
    ("W4 MXINT4-128", "mxint4-128", "none", ("rtn", "gptq", "awq+gptq"), ()),
    ("W8A8 MXFP8E4M3-32", "mxfp8e4m3-32", "mxfp8e4m3-32", ("rtn",), ()),
    ("W4A8 MXFP4-32 / A MXFP8E4M3-32", "mxfp4-32", "mxfp8e4m3-32", ("rtn", "gptq", "awq+gptq"), ()),
    # Quark's scope (block 32, no MXINT4 there): the same configurations side by side with its rows
    ("W8A8 MXINT8-32", "mxint8-32", "mxint8-32", ("rtn", "sq"), ()),
    ("W4A4 MXFP4-32", "mxfp4-32", "mxfp4-32", ("rtn", "sq"), ()),
    ("W8A8 INT8 per-channel", "int8", "int8", ("rtn", "sq"), ()),
    ("W4A8 INT4 per-channel", "int4", "int8", ("rtn", "gptq"), ()),
)


def _mxonnx_rows() -> list[Row]:
    return [Row("mxonnx", config, method, w, a, bits_per_weight(w), quick=method in quick)
            for config, w, a, methods, quick in MXONNX_CONFIGS for method in methods]


def _peer_rows() -> list[Row]:
    # onnxruntime MatMulNBits: int4 codes + one fp32 scale per block (symmetric, no zero point).
    ort = [Row("ort-nbits", f"W4 INT4-g{b}", "rtn", f"int4-g{b}", "none", 4 + 32 / b, ("--block", str(b)),
               quick=b == 128) for b in (32, 128)]
    ort.append(Row("ort-nbits", "W4 INT4-g128", "gptq", "int4-g128", "none", 4 + 32 / 128,
                   ("--block", "128", "--algo", "gptq")))
    # Quark: MX element type, block 32, on weights and inputs of constant-B MatMuls (fake-quantized in fp32).
    quark = [Row("quark", f"W{bits}A{bits} {name}-32", method, f"{fmt}-32", f"{fmt}-32", bits_per_weight(f"{fmt}-32"),
                 ("--element", element) + (("--smoothquant",) if method == "sq" else ()))
             for name, fmt, element, bits in (("MXINT8", "mxint8", "int8", 8), ("MXFP4", "mxfp4", "fp4_e2m1", 4))
             for method in ("rtn", "sq")]
    # Intel Neural Compressor weight-only int4, group 32, symmetric: MatMulNBits with one fp32 scale per group.
    inc = [Row("inc", "W4 INT4-g32", method, "int4-g32", "none", 4 + 32 / 32, ("--algo", method))
           for method in ("rtn", "awq", "gptq")]
    return ort + quark + inc


ROWS: tuple[Row, ...] = (Row("fp32", "FP32", "-", "none", "none", 32.0, quick=True), *_mxonnx_rows(), *_peer_rows())


def select_rows(quick: bool, methods: list[str] | None, tools: list[str] | None,
                configs: list[str] | None = None) -> list[Row]:
    """The rows of this run: ``--quick`` keeps the quick ones; ``--methods``/``--tools``/``--configs`` filter (FP32
    always stays, every ratio is taken against it)."""
    rows = [r for r in ROWS if r.quick or not quick]
    for wanted, field in ((methods, "method"), (tools, "tool"), (configs, "config")):
        if wanted:
            rows = [r for r in rows if r.tool == "fp32" or getattr(r, field) in wanted]
    return rows


CONFIGS = tuple(dict.fromkeys(r.config for r in ROWS if r.tool != "fp32"))
