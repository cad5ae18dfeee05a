"""Frozen configuration of one quantization run; passes and stages read it, the CLI builds it."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

METHODS = ("rtn", "gptq", "sq", "awq", "sq+gptq", "awq+gptq")
DEFAULT_CANDIDATES = ("mxint4-128", "mxint4-32", "mxint4-16", "mxint8-32")  # --target-bits' weight formats
PRESCALE_SEARCH = "search"
DEFAULT_PRESCALE_CANDIDATES = (0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0)  # --prescale-candidates


def default_data_dir() -> Path:
    """``$MXONNX_DATA`` or ``../shared/data`` beside the project checkout (see shared/data/README.md)."""
    env = os.environ.get("MXONNX_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def default_eval_text() -> Path:
    return default_data_dir() / "wikitext-2-raw" / "wiki.test.raw"


def default_calib_text() -> Path:
    return default_data_dir() / "wikitext-2" / "valid.txt"


@dataclasses.dataclass(frozen=True)
class QuantizeConfig:
    """Everything ``mxonnx quantize`` needs. Format names follow ``mxonnx.formats``."""

    weights: str = "mxint4-128"
    acts: str = "mxint8-128"
    method: str = "awq+gptq"
    kv: str = "none"  # KV-cache format (keys after rope and values, along head_dim): an MX format or none
    alpha: float | None = None  # SmoothQuant migration strength (0.5) or a fixed AWQ alpha; None = default/grid
    calib_path: Path | None = None
    calib_samples: int = 128
    calib_seqlen: int = 512
    seed: int = 0
    gptq_block: int = 128
    gptq_micro_block: int | None = None  # None: the weight format's MX block size
    damp: float = 0.01
    act_order: bool = True  # GPTQ columns in order of decreasing Hessian diagonal, whole MX blocks kept together
    sequential: bool = True
    # GPTQ: shared exponents chosen among E-1, E, E+1 by the GPTQ loss (issue 19); None: the measured default,
    # :attr:`searches_exponents`
    exponent_search: bool | None = None
    # element pre-scale p of the MX weight / activation quantizers (mxonnx.prescale; issue 19): None (plain OCP),
    # a number in (0.5, 1], or PRESCALE_SEARCH (one p per tensor among prescale_candidates)
    weights_prescale: float | str | None = None
    acts_prescale: float | str | None = None
    prescale_candidates: tuple[float, ...] = DEFAULT_PRESCALE_CANDIDATES
    quantize_lm_head: bool = False
    rotate: bool = False  # block Hadamard rotation of the float model before calibration (passes/rotation.py)
    rotate_block: int | None = None  # its block; None: the weight format's block, else the activations'
    # the KV-cache quantizers in place while blocks are calibrated (sequential runs); False adds them at the end
    kv_in_calibration: bool = True
    overrides: tuple[str, ...] = ()  # "PATTERN=FORMAT" or "PATTERN=WEIGHTS/ACTS", later ones win (mxonnx.layer_formats)
    target_bits: float | None = None  # stored bits per weight the allocation may average (mxonnx.allocate)
    candidates: tuple[str, ...] = DEFAULT_CANDIDATES
    progress: bool = True

    @property
    def uses_smoothquant(self) -> bool:
        return self.method.startswith("sq")

    @property
    def uses_awq(self) -> bool:
        return self.method.startswith("awq")

    @property
    def uses_gptq(self) -> bool:
        return self.method.endswith("gptq")

    @property
    def searches_exponents(self) -> bool | None:
        """What GPTQ is told about the output-aware exponent choice: ``exponent_search`` when given, else None (no
        GPTQ: False): each linear then decides by its own weight format
        (:func:`mxonnx.gptq.searches_exponents_by_default`: on for MXINT, the OCP rule for MXFP)."""
        if not self.uses_gptq:
            return False
        return self.exponent_search

    @property
    def searches_act_prescale(self) -> bool:
        return self.acts_prescale == PRESCALE_SEARCH

    @property
    def needs_calibration(self) -> bool:
        return self.method != "rtn"
