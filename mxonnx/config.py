"""Frozen configuration of one quantization run; passes and stages read it, the CLI builds it."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

METHODS = ("rtn", "gptq", "sq", "awq", "sq+gptq", "awq+gptq")
DEFAULT_CANDIDATES = ("mxint4-128", "mxint4-32", "mxint4-16", "mxint8-32")  # --target-bits' weight formats
AWQ_SEARCHES = ("rtn", "gptq")  # --awq-search: what AWQ's alpha search scores
SENSITIVITIES = ("share", "context")  # --sensitivity: what --target-bits' loss measures (mxonnx.sensitivity)
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


LM_HEAD_AUTO = "auto"
LM_HEAD_DECODER = "weights"
# lm_head's format under LM_HEAD_AUTO: on SmolLM2 W4A8 MXINT4-128 RTN, W8A8 MXINT8-32 on lm_head costs +0.24 %
# perplexity (43.527 -> 43.633, 40 windows; its GGUF stores that matrix as Q8_0) and makes decode about 1.2x faster
# than a float32 lm_head (README, "lm_head")
LM_HEAD_DEFAULT = "mxint8-32"

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
    # step 1's statistics (SmoothQuant/AWQ scales, static int8 ranges) on the float model's inputs, GPTQ still on the
    # quantized prefix's (the pipeline before the block-by-block driver; measured better for sq+gptq W4A8 and
    # awq+gptq W4 with the OCP exponents): a second stream of hidden states
    float_statistics: bool = False
    # GPTQ one linear group at a time inside a block (qkv, o, gate/up, down), each group's Hessians taken with the
    # groups before it quantized (the GPTQ reference's true-sequential): one more run of the block per group
    true_sequential: bool = False
    # GPTQ fits the float model's outputs, ||X W - A Q||, A the quantized prefix's input, X the float model's
    # (asymmetric calibration after GPTAQ; mxonnx.gptq.float_target_weights); keeps a second stream of hidden states
    gptq_float_target: bool = False
    # sweeps of coordinate descent on GPTQ's layer loss after Algorithm 1 (mxonnx.gptq.refine_by_coordinate_descent)
    gptq_refine: int = 0
    float_target_damp: float = 1.0  # its ridge toward W, a fraction of the mean Hessian diagonal (0.01 overfits)
    # shared exponents chosen among E-1, E, E+1 by the GPTQ loss (issue 19), or without GPTQ by the statistics'
    # diagonal Hessian (:attr:`rounds_with_exponent_choice`); None: the measured default, :attr:`searches_exponents`
    exponent_search: bool | None = None
    # element pre-scale p of the MX weight / activation quantizers (mxonnx.prescale; issue 19): None (plain OCP),
    # a number in (0.5, 1], or PRESCALE_SEARCH (one p per tensor among prescale_candidates)
    weights_prescale: float | str | None = None
    acts_prescale: float | str | None = None
    prescale_candidates: tuple[float, ...] = DEFAULT_PRESCALE_CANDIDATES
    # lm_head (issue 18): LM_HEAD_AUTO quantizes it to LM_HEAD_DEFAULT weights and activations when the decoder's
    # weights are MX and its activations MX (weights only when they are float), else leaves it float; "none" leaves
    # it float; LM_HEAD_DECODER gives it the decoder's --weights/--acts; else a format, or WEIGHTS/ACTS, as --override
    lm_head: str = "auto"
    rotate: bool = False  # block Hadamard rotation of the float model before calibration (passes/rotation.py)
    rotate_block: int | None = None  # its block; None: the weight format's block, else the activations'
    # the KV-cache quantizers in place while blocks are calibrated (sequential runs); False adds them at the end
    kv_in_calibration: bool = True
    overrides: tuple[str, ...] = ()  # "PATTERN=FORMAT" or "PATTERN=WEIGHTS/ACTS", later ones win (mxonnx.layer_formats)
    target_bits: float | None = None  # stored bits per weight the allocation may average (mxonnx.allocate)
    candidates: tuple[str, ...] = DEFAULT_CANDIDATES
    # what AWQ's alpha search scores (passes/awq.py): "rtn", the group's output error with the weights rounded to
    # nearest (AWQ's own), or "gptq", with them GPTQ-quantized on the input's float Hessian (GPTQ methods only)
    awq_search: str = "rtn"
    # what the allocation's loss measures (mxonnx.sensitivity): "share" (each block's KL with it rounded to the
    # cheapest candidate, split by the linears' output errors, carried by Hessian errors) or "context" (each
    # linear's KL measured per candidate with every other linear in the candidate nearest the budget)
    sensitivity: str = "share"
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
    def rounds_with_exponent_choice(self) -> bool:
        """Without GPTQ, ``--exponent-search`` (off by default: RTN stays the paper's uncalibrated baseline) rounds to
        nearest with each MX block's exponent chosen by the calibration statistics
        (:func:`mxonnx.gptq.round_with_exponent_choice`)."""
        return not self.uses_gptq and bool(self.exponent_search)

    @property
    def lm_head_override(self) -> str | None:
        """lm_head's formats as the value of an ``--override lm_head=...`` ("" for the decoder's own formats), or
        None when lm_head stays float."""
        setting = self.lm_head.strip().lower()
        if setting == "none":
            return None
        if setting == LM_HEAD_DECODER:
            return ""
        if setting == LM_HEAD_AUTO:
            from mxonnx import formats

            weights, acts = formats.parse_format(self.weights), formats.parse_format(self.acts)
            if weights.kind != "mx" or acts.kind not in ("mx", "none"):
                return None
            return f"{LM_HEAD_DEFAULT}/{LM_HEAD_DEFAULT if acts.kind == 'mx' else 'none'}"
        return self.lm_head

    @property
    def quantizes_lm_head(self) -> bool:
        return self.lm_head_override is not None

    @property
    def linear_overrides(self) -> tuple[str, ...]:
        """``--override``s with lm_head's format first (the user's later ones win)."""
        head = self.lm_head_override
        return ((f"lm_head={head}",) if head else ()) + tuple(self.overrides)

    @property
    def searches_act_prescale(self) -> bool:
        return self.acts_prescale == PRESCALE_SEARCH

    @property
    def needs_calibration(self) -> bool:
        return self.method != "rtn"
