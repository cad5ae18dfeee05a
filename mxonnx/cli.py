"""The ``mxonnx`` command line: the only module that prints for users.

Exit status: 0 done, 1 failed, 2 bad input or usage. Errors are one line on stderr; ``--debug``
shows the traceback. ``--json`` prints exactly one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
import warnings
from pathlib import Path

from mxonnx.errors import InputError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # usage errors: one line, exit 2
        self.exit(2, f"mxonnx: {message} (see {self.prog} --help)\n")  # prog: "mxonnx" or "mxonnx quantize"


def _common(p: argparse.ArgumentParser, json_flag: bool = True) -> None:
    if json_flag:
        p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def _unit_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} is outside [0, 1]")
    return value


def _whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def _sweeps(text: str) -> int:
    value = _whole_number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be 0 or more")
    return value


def _positive_int(text: str) -> int:
    value = _whole_number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be positive")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (value > 0 and value < float("inf")):
        raise argparse.ArgumentTypeError(f"{value} must be a positive number")
    return value


def _format_list(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if not names:
        raise argparse.ArgumentTypeError("expected a comma-separated list of weight formats")
    return names


def _prescale(text: str) -> float | str:
    if text == "search":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number in (0.5, 1] nor 'search'") from None
    from mxonnx.errors import InputError
    from mxonnx.prescale import check_prescale

    try:
        check_prescale(value, "pre-scale")  # the range is the formats module's
    except InputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def _prescale_list(text: str) -> tuple[float, ...]:
    values = tuple(_prescale(v.strip()) for v in text.split(",") if v.strip())
    if not values or any(isinstance(v, str) for v in values):
        raise argparse.ArgumentTypeError("expected a comma-separated list of numbers in (0.5, 1]")
    return values


def _prescale_text(report: float | dict) -> str:
    """A fixed pre-scale, or the range a search chose."""
    if not isinstance(report, dict):
        return f"{report:g}"
    if not report:
        return "searched (no MX quantizer)"
    return f"searched, {min(report.values()):.4g}..{max(report.values()):.4g} over {len(report)} linears"


def build_parser() -> argparse.ArgumentParser:
    from mxonnx.config import AWQ_SEARCHES, DEFAULT_CANDIDATES, DEFAULT_PRESCALE_CANDIDATES, METHODS, SENSITIVITIES

    parser = _Parser(prog="mxonnx", description="mxonnx: Llama models to microscaling (MX) quantized ONNX graphs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("export", help="HF folder or .gguf file -> ONNX model folder (optimum)")
    p.add_argument("src", help="Hugging Face model folder or .gguf file")
    p.add_argument("-o", "--output", required=True, help="new folder to write")
    p.add_argument("--no-past", action="store_true", help="export without KV-cache inputs/outputs")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="type the float weights are stored in (compute stays float32; default float32)")
    _common(p)

    p = sub.add_parser("quantize", help="MX-quantize the linear layers of an ONNX Llama")
    p.add_argument("model", help="model folder or .onnx file")
    p.add_argument("-o", "--output", required=True, help="new folder to write")
    p.add_argument("--weights", default="mxint4-128", help="weight format (default mxint4-128; see `mxonnx formats`)")
    p.add_argument("--acts", default="mxint8-128",
                   help="activation format: MX, int8 (static per channel, calibrated), or none (default mxint8-128)")
    p.add_argument("--method", default="awq+gptq", choices=METHODS, help="default awq+gptq")
    p.add_argument("--kv", default="none",
                   help="KV-cache format: keys (after rope) and values MX-quantized along head_dim as they enter the "
                        "cache, e.g. mxint8-64, mxfp8e4m3-32 (block dividing head_dim); default none")
    p.add_argument("--alpha", type=_unit_float, default=None, help="SmoothQuant strength (default 0.5) or a fixed AWQ alpha (default: grid search)")
    p.add_argument("--awq-search", choices=AWQ_SEARCHES, default="rtn",
                   help="what AWQ's alpha search scores: rtn (default: the output error with the weights rounded to "
                        "nearest) or gptq (with them GPTQ-quantized; awq+gptq only; measured: no gain, 2.5x the time)")
    p.add_argument("--calib", type=Path, default=None, help="calibration text (default: WikiText-2 validation)")
    p.add_argument("--calib-samples", type=_positive_int, default=128)
    p.add_argument("--calib-seqlen", type=_positive_int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gptq-block", type=_positive_int, default=128, help="GPTQ lazy-update block B1")
    p.add_argument("--gptq-micro-block", type=_positive_int, default=None, help="GPTQ micro-block B2 (multiple of the MX block; default the MX block)")
    p.add_argument("--damp", type=float, default=0.01, help="GPTQ dampening, fraction of the mean Hessian diagonal")
    p.add_argument("--no-act-order", action="store_true", help="GPTQ in plain column order (default: MX blocks by decreasing Hessian diagonal)")
    p.add_argument("--no-sequential", action="store_true", help="GPTQ on the float model's inputs instead of the quantized prefix's")
    p.add_argument("--float-statistics", action="store_true",
                   help="SmoothQuant/AWQ statistics (and static int8 ranges) on the float model's inputs while GPTQ "
                        "stays on the quantized prefix's (default: both on the prefix's; measured better with the OCP "
                        "exponents for sq+gptq W4A8 and awq+gptq W4: README); keeps a second stream of calibration "
                        "hidden states")
    p.add_argument("--true-sequential", action="store_true",
                   help="GPTQ one linear group at a time inside each block (qkv, o, gate/up, down), each group's "
                        "Hessians with the groups before it quantized")
    p.add_argument("--gptq-refine", type=_sweeps, default=0, metavar="N",
                   help="N sweeps of coordinate descent on GPTQ's layer loss after Algorithm 1, exponents kept "
                        "(after QuantEase; default 0)")
    p.add_argument("--gptq-float-target", action="store_true",
                   help="experimental, measured far worse on SmolLM2 (README): GPTQ matches the float model's "
                        "outputs, ||X W - A Q|| with A the quantized prefix's input and X the float model's "
                        "(asymmetric calibration, after GPTAQ); keeps a second stream of calibration hidden states")
    p.add_argument("--float-target-damp", type=float, default=1.0, metavar="D",
                   help="--gptq-float-target's ridge toward the float weights, a fraction of the mean Hessian "
                        "diagonal (default 1.0)")
    p.add_argument("--exponent-search", action=argparse.BooleanOptionalAction, default=None,
                   help="choose each MX block's shared exponent among E-1, E, E+1 instead of E (the OCP rule): "
                        "with GPTQ by the GPTQ loss (default on for MXINT weights, measured best; off for MXFP); "
                        "rtn/sq/awq: by the output error from the calibration statistics (makes them calibrate; "
                        "default off)")
    for side, text in (("weights", "MX weights: elements from P * w / 2^E (the OCP exponent E), values divided by P "
                                    "again, so the block maximum no longer clips (MXFP4: 0.75); 'search': one P per "
                                    "weight among --prescale-candidates by the Hessian-weighted (else plain) error"),
                       ("acts", "the same for the MX activation quantizers; 'search': one P per quantized input by "
                                "the output error on calibration rows")):
        p.add_argument(f"--{side}-prescale", type=_prescale, default=None, metavar="P|search", help=f"{text}; default none")
    p.add_argument("--prescale-candidates", type=_prescale_list, default=None, metavar="P,P,...",
                   help=f"what 'search' chooses from (default {','.join(f'{p:g}' for p in DEFAULT_PRESCALE_CANDIDATES)})")
    lm_head = p.add_mutually_exclusive_group()
    lm_head.add_argument("--lm-head", default=None, metavar="FORMAT",
                         help="lm_head's weight format (or WEIGHTS/ACTS), 'weights' for the decoder's formats, 'none' "
                              "to keep it float; default auto: W8A8 mxint8-32 when the decoder's weights are MX "
                              "(weight-only when its activations are none), else float")
    lm_head.add_argument("--quantize-lm-head", action="store_true", help="lm_head in the decoder's formats (--lm-head weights)")
    p.add_argument("--rotate", action="store_true",
                   help="block Hadamard rotation before calibration (MR-GPTQ): residual stream and V/O folded into the "
                        "weights, an online BlockHadamard before down_proj")
    p.add_argument("--rotate-block", type=_positive_int, default=None, metavar="B",
                   help="--rotate's block, a power of two (default: the weight format's block, else the activations')")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run of the same command from its last finished block")
    p.add_argument("--override", action="append", default=[], metavar="PATTERN=FORMAT",
                   help="formats of the linears a glob names (layers.3.down_proj, layers.*.mlp.down_proj, lm_head): "
                        "a weight format, WEIGHTS/ACTS, or none (left float); repeatable, later ones win")
    p.add_argument("--target-bits", type=_positive_float, default=None, metavar="B",
                   help="choose a weight format per linear from --candidates so that the stored bits per weight "
                        "average at most B with the least estimated loss")
    p.add_argument("--candidates", type=_format_list, default=None, metavar="F,F,...",
                   help=f"weight formats --target-bits chooses from (default {','.join(DEFAULT_CANDIDATES)})")
    p.add_argument("--sensitivity", choices=SENSITIVITIES, default="share",
                   help="--target-bits' loss: share (default: each block's KL with it in the cheapest candidate, "
                        "split among its linears) or context (each linear's KL per candidate, measured with every "
                        "other linear in the candidate nearest the budget; measured: helps rtn, loses with awq+gptq)")
    _common(p)

    p = sub.add_parser("eval", help="WikiText-2 perplexity through onnxruntime")
    p.add_argument("model", help="model folder (or HF folder with --reference torch)")
    p.add_argument("--data", type=Path, default=None, help="text file (default: WikiText-2 raw test)")
    p.add_argument("--seqlen", type=_positive_int, default=2048)
    p.add_argument("--max-windows", type=_positive_int, default=None, help="evaluate only the first N windows")
    p.add_argument("--reference", choices=["torch"], default=None, help="evaluate the transformers model in torch instead")
    p.add_argument("--blockwise", action=argparse.BooleanOptionalAction, default=None,
                   help="run the graph one decoder block at a time (default: when its weights exceed the eval budget)")
    _fuse_option(p)
    _common(p)

    p = sub.add_parser("inspect", help="opset, custom ops, quantized MatMuls, bits per weight, bytes")
    p.add_argument("model")
    _common(p)

    p = sub.add_parser("lower", help="graphs for stock runtimes and compilers")
    p.add_argument("model")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--target", required=True, choices=["matmulnbits", "qdq", "inline"])
    _common(p)

    p = sub.add_parser("generate", help="text through optimum's ORTModelForCausalLM (chat template, streamed)")
    p.add_argument("model")
    p.add_argument("prompt")
    p.add_argument("--max-new-tokens", type=_positive_int, default=32)
    p.add_argument("--raw", action="store_true",
                   help="feed the prompt as it is (default: as a user message through the tokenizer's chat template)")
    _fuse_option(p)
    _common(p)

    p = sub.add_parser("formats", help="list every element format with its bits per weight")
    _common(p)
    return parser


def _print_result(args: argparse.Namespace, result: dict, text: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps(result, default=str))
    else:
        print(text)


def _run(args: argparse.Namespace) -> None:
    cmd = args.command
    progress = not getattr(args, "json", False)
    if cmd == "formats":
        from mxonnx.formats import describe_formats

        rows = describe_formats()
        text = "\n".join(f"{r['name']:<18} {r['bits_per_weight']:>7.4f} bits/weight  {r['description']}" for r in rows)
        _print_result(args, {"formats": rows}, text)
    elif cmd == "export":
        from mxonnx.export import export_model

        r = export_model(Path(args.src), Path(args.output), past=not args.no_past, progress=progress, dtype=args.dtype)
        _print_result(args, r, f"exported {args.src} -> {r['output']} ({'with' if r['past'] else 'without'} past, "
                               f"{r['dtype']} weights) in {r['seconds']:.1f} s")
    elif cmd == "quantize":
        from mxonnx.config import QuantizeConfig
        from mxonnx.quantize import quantize_model

        cfg = QuantizeConfig(
            weights=args.weights, acts=args.acts, method=args.method, kv=args.kv, alpha=args.alpha, awq_search=args.awq_search, calib_path=args.calib,
            calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen, seed=args.seed,
            gptq_block=args.gptq_block, gptq_micro_block=args.gptq_micro_block, damp=args.damp,
            act_order=not args.no_act_order, sequential=not args.no_sequential, float_statistics=args.float_statistics,
            true_sequential=args.true_sequential, gptq_float_target=args.gptq_float_target, gptq_refine=args.gptq_refine,
            float_target_damp=args.float_target_damp,
            exponent_search=args.exponent_search,
            lm_head="weights" if args.quantize_lm_head else (args.lm_head or "auto"), rotate=args.rotate,
            rotate_block=args.rotate_block,
            progress=progress,
            overrides=tuple(args.override), target_bits=args.target_bits, sensitivity=args.sensitivity,
            weights_prescale=args.weights_prescale, acts_prescale=args.acts_prescale,
            **({"candidates": args.candidates} if args.candidates is not None else {}),
            **({"prescale_candidates": args.prescale_candidates} if args.prescale_candidates is not None else {}),
        )
        r = quantize_model(Path(args.model), Path(args.output), cfg, resume=args.resume)
        _print_result(args, r, f"quantized {args.model} -> {r['output']}: weights {r['weights']}, acts {r['acts']}, "
                               + "".join(f"{side} pre-scale {_prescale_text(r[f'{side}_prescale'])}, "
                                         for side in ("weights", "acts") if f"{side}_prescale" in r)
                               + f"lm_head {r['lm_head']}, KV cache {r['kv']}, method {r['method']} in {r['seconds']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB"
                               + (f" ({r['resumed_blocks']} blocks resumed)" if r["resumed_blocks"] else "")
                               + (_allocation_text(r["allocation"]) if "allocation" in r else ""))
    elif cmd == "eval":
        from mxonnx.eval import evaluate_perplexity

        r = evaluate_perplexity(Path(args.model), data=args.data, seqlen=args.seqlen, max_windows=args.max_windows,
                                reference=args.reference, progress=progress, blockwise=args.blockwise,
                                fuse=args.fuse)
        _print_result(args, r, f"perplexity {r['perplexity']:.4f} over {r['tokens']} tokens "
                               f"({r['windows']} windows of {r['seqlen']}) in {r['seconds']:.1f} s, "
                               f"{r['tokens_per_second']:.0f} tokens/s" + (", fused" if r["fused"] else ""))
    elif cmd == "inspect":
        from mxonnx.inspect import format_inspection, inspect_model

        r = inspect_model(Path(args.model))
        _print_result(args, r, format_inspection(r))
    elif cmd == "lower":
        from mxonnx.lower import lower_model

        r = lower_model(Path(args.model), Path(args.output), args.target)
        _print_result(args, r, f"lowered {args.model} -> {r['output']} for {args.target}")
    elif cmd == "generate":
        from mxonnx.generate import generate

        if args.json:
            print(json.dumps(generate(Path(args.model), args.prompt, max_new_tokens=args.max_new_tokens, raw=args.raw,
                                      fuse=args.fuse)))
        else:  # the text as it is decoded
            out = sys.stdout

            def emit(text: str) -> None:
                out.write(text)
                out.flush()

            generate(Path(args.model), args.prompt, max_new_tokens=args.max_new_tokens, raw=args.raw, emit=emit,
                     fuse=args.fuse)
            out.write("\n")


def _fuse_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=True,
                   help="fuse the graph for inference in memory (default): each quantized linear as one MXMatMul "
                        "(native integer kernels), each attention as onnxruntime's RotaryEmbedding + "
                        "GroupQueryAttention; --no-fuse runs the graph as saved")


def _allocation_text(allocation: dict) -> str:
    from collections import Counter

    counts = Counter(allocation["formats"].values())
    return (f"\n--target-bits {allocation['target_bits']:g}: {allocation['bits_per_weight']:.4f} bits per weight; "
            + ", ".join(f"{fmt} x{n}" for fmt, n in sorted(counts.items())))


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"mxonnx: warning: {message}\n"


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
FREED_MEMORY_THRESHOLD = 128 * 1024


def return_freed_memory() -> None:
    """Have glibc give large freed buffers back to the system: allocations of 128 KiB and more are memory-mapped and
    the heap is trimmed above 128 KiB. By default glibc raises its mmap threshold (up to 32 MiB) as buffers are
    freed and keeps later ones in the heap, so the arrays freed block after block while quantizing stay counted in
    the process's memory. No effect outside glibc."""
    import ctypes

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(M_MMAP_THRESHOLD, FREED_MEMORY_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, FREED_MEMORY_THRESHOLD)
    except (OSError, AttributeError, TypeError):  # not glibc (e.g. musl has no mallopt)
        pass


def main(argv: list[str] | None = None) -> int:
    return_freed_memory()
    # numpy's BLAS threads fight onnxruntime's and torch's on small matrices (AWQ's search ran ~80x slower)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    warnings.formatwarning = _one_line_warning  # e.g. one line per Hessian whose dampening was raised
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # usage errors (exit 2) and --help (exit 0) as a return value
        return int(exc.code or 0)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        _run(args)
    except KeyboardInterrupt:
        print("mxonnx: interrupted", file=sys.stderr)
        return 1
    except BrokenPipeError:  # e.g. `mxonnx formats | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (InputError, ValueError, FileNotFoundError) as exc:
        if args.debug:
            traceback.print_exc()
        print(f"mxonnx {args.command}: {_one_line(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
        if args.debug:
            traceback.print_exc()
        print(f"mxonnx {args.command}: failed: {type(exc).__name__}: {_one_line(exc)} (rerun with --debug for details)", file=sys.stderr)
        return 1
    return 0


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
