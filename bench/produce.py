"""Make the model folder of one benchmark row: ``mxonnx quantize`` for our rows, the peer's runner (in the peer's
own environment when its pins conflict with ours) for the others. Every quantizer runs as a child process, timed
and with its peak RSS taken by ``measure.run_child``; the record is saved beside the model so a re-run reuses it."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from bench.calib_tokens import write_calibration_windows
from bench.measure import ChildRun, run_child
from bench.peers.venvs import VENVS_DIR, PeerUnavailable, ensure_venv
from bench.rows import Row
from mxonnx.modelio import atomic_output_dir, copy_model_assets

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RECORD = "bench-quantize.json"
PEER_CALIB_SAMPLES, PEER_CALIB_SEQLEN = 16, 512  # peers' calibration: 16 windows of 512 WikiText-2 valid tokens
PEER_VENV = {"quark": "quark", "inc": "inc"}  # peers that need their own environment
PEER_SCRIPT = {"ort-nbits": "ort_nbits.py", "quark": "quark_mx.py", "inc": "inc_weight_only.py"}
PEERS_CALIBRATED = {"quark", "inc"}  # runners that always take --calib; ort-nbits only for GPTQ


class RowUnavailable(RuntimeError):
    """The row cannot be produced now; the one-line message goes into the table."""


@dataclasses.dataclass(frozen=True)
class Produced:
    """A row's model folder, its quantize run (None for FP32) and the custom-op libraries it needs at run time."""

    folder: Path
    quantize_seconds: float | None
    quantize_peak_rss_mb: float | None
    custom_ops: tuple[str, ...] = ()


def child_env() -> dict[str, str]:
    """Environment of every child: the repository on the path (for ``bench.*``) and Quark's build folder."""
    return {"PYTHONPATH": str(REPO), "TORCH_EXTENSIONS_DIR": str(VENVS_DIR / "quark" / "torch_extensions")}


def calibration_windows(fp32: Path, work: Path) -> Path:
    path = work / "calib" / f"{PEER_CALIB_SAMPLES}x{PEER_CALIB_SEQLEN}-seed0.npz"
    if not path.is_file():
        write_calibration_windows(fp32, path, PEER_CALIB_SAMPLES, PEER_CALIB_SEQLEN, seed=0)
    return path


def _quantize_cmd(row: Row, fp32: Path, out: Path, work: Path) -> list[str]:
    if row.tool == "mxonnx":
        return [sys.executable, "-m", "mxonnx.cli", "quantize", str(fp32), "-o", str(out), "--weights", row.weights,
                "--acts", row.acts, "--method", row.method, "--json",
                # the paper's recipe (OCP exponents, lm_head float), as the published rows: the default's exponent
                # search and 8-bit lm_head are not in them
                "--no-exponent-search", "--lm-head", "none"]
    try:
        python = str(ensure_venv(PEER_VENV[row.tool], log=print)) if row.tool in PEER_VENV else sys.executable
    except PeerUnavailable as exc:
        raise RowUnavailable(f"{row.tool} cannot be installed here: {exc}") from None
    cmd = [python, str(BENCH_DIR / "peers" / PEER_SCRIPT[row.tool]), str(fp32), str(out), *row.options]
    if row.tool in PEERS_CALIBRATED or row.method != "rtn":
        cmd += ["--calib", str(calibration_windows(fp32, work))]
    return cmd


@contextlib.contextmanager
def peer_input(fp32: Path, parent: Path, prefix: str) -> Iterator[Path]:
    """A copy of the FP32 model folder (a new folder under ``parent``), given to a peer instead of the folder itself:
    some peers write next to their input (Intel Neural Compressor's calibration saves ``model.onnx_augment.onnx``
    and its weights there), and the FP32 folder must stay as it is. (onnx refuses external data behind a symbolic
    link, and a hard link would share the weights file with a peer that rewrote it in place.) Made before the peer's
    timed run; removed afterwards, with whatever the peer left."""
    parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir=parent))
    try:
        try:
            shutil.copytree(fp32, folder, dirs_exist_ok=True)
        except OSError as exc:
            raise RowUnavailable(f"cannot copy the FP32 model for the peer: {exc}") from None
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def produce(row: Row, fp32: Path, work: Path) -> Produced:
    """The model of ``row`` under ``work/models/<key>``, quantizing it unless a finished one is there."""
    if row.tool == "fp32":
        return Produced(fp32, None, None)
    out = work / "models" / row.key
    record = out / RECORD
    if record.is_file():
        saved = json.loads(record.read_text())
        return Produced(out, saved["quantize_seconds"], saved["quantize_peak_rss_mb"], tuple(saved["custom_ops"]))
    shutil.rmtree(out, ignore_errors=True)  # a model without its record is an interrupted one
    out.parent.mkdir(parents=True, exist_ok=True)
    if row.tool == "mxonnx":
        run = run_child(_quantize_cmd(row, fp32, out, work), env=child_env(), cwd=work)
        custom_ops: tuple[str, ...] = ()
    else:
        with atomic_output_dir(out) as tmp, peer_input(fp32, work / "peer_inputs", row.key) as source:
            run = run_child(_quantize_cmd(row, source, tmp, work), env=child_env(), cwd=work)
            if run.returncode != 0:
                raise RowUnavailable(f"{row.tool} quantize failed: {run.failure()}")
            copy_model_assets(fp32, tmp)
        custom_ops = (run.json()["custom_ops_library"],) if row.tool == "quark" else ()
    if run.returncode != 0:
        shutil.rmtree(out, ignore_errors=True)
        raise RowUnavailable(f"not available yet: {run.failure()}")
    produced = Produced(out, run.seconds, run.peak_rss_mb, custom_ops)
    record.write_text(json.dumps({k: v for k, v in dataclasses.asdict(produced).items() if k != "folder"}))
    return produced


def runtime_cmd(produced: Produced, module: str, *args: str) -> list[str]:
    """Command running ``python -m module args`` with the row's custom-op libraries registered in its sessions."""
    if produced.custom_ops:
        return [sys.executable, str(BENCH_DIR / "with_ops.py"), *produced.custom_ops, "--", module, *args]
    return [sys.executable, "-m", module, *args]


def run_for(produced: Produced, module: str, *args: str) -> ChildRun:
    return run_child(runtime_cmd(produced, module, *args), env=child_env())
