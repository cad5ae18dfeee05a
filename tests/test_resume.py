"""``mxonnx quantize --resume``: a run killed with SIGKILL (after a finished block, or while a block's files are
being committed) continues from its last finished block and writes the same bytes as an uninterrupted run; the
work folder beside OUT is refused without ``--resume`` and with other settings, and removed on success."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import visible_lines

from mxonnx.cli import main

CALIB = ["--calib-samples", "8", "--calib-seqlen", "64"]

# A run of the CLI whose process SIGKILLs itself at one point: after the commit of block KILL_AFTER
# ("committed"), or when the record of block KILL_AFTER is about to be committed ("committing": its block files
# are written, progress.json is not).
KILLING_RUN = """
import os, signal, sys
import mxonnx.workdir as workdir
from mxonnx.cli import main

mode, block = sys.argv[1], int(sys.argv[2])
persist, write_progress = workdir.WorkFolder.persist_block, workdir.WorkFolder._write_progress

def persist_then_die(self, model, index, *args, **kwargs):
    persist(self, model, index, *args, **kwargs)
    if mode == "committed" and index == block:
        os.kill(os.getpid(), signal.SIGKILL)

def die_before_commit(self):
    if mode == "committing" and len(self.records) == block + 1:
        os.kill(os.getpid(), signal.SIGKILL)
    write_progress(self)

workdir.WorkFolder.persist_block = persist_then_die
workdir.WorkFolder._write_progress = die_before_commit
sys.exit(main(sys.argv[3:]))
"""


def quantize_args(src: Path, out: Path, text: Path, *flags: str) -> list[str]:
    return ["quantize", str(src), "-o", str(out), "--calib", str(text), *CALIB, *flags]


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def kill_and_resume(src: Path, text: Path, tmp_path: Path, flags: tuple[str, ...], mode: str, capsys) -> Path:
    """Run quantize until it SIGKILLs itself (``mode``, see ``KILLING_RUN``), check the work folder left behind and
    the refusals, then resume; returns OUT."""
    out = tmp_path / f"q-{mode}"
    argv = quantize_args(src, out, text, *flags, "--json")
    block = "0" if mode == "committed" else "1"  # killed after block 0, or while committing block 1: 1 finished
    killed = subprocess.run([sys.executable, "-c", KILLING_RUN, mode, block, *argv], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    work = tmp_path / f".{out.name}.partial"
    assert not out.exists() and (work / "progress.json").is_file()
    assert len(json.loads((work / "progress.json").read_text())["blocks"]) == 1
    if mode == "committing":
        assert (work / "blocks" / "00001.bin").is_file()  # written, but not committed
    capsys.readouterr()

    assert main(argv) == 2  # without --resume the interrupted run is not overwritten
    err = capsys.readouterr().err
    assert "add --resume" in err and len(visible_lines(err)) == 1
    other = quantize_args(src, out, text, *flags, "--seed", "5", "--resume")
    assert main(other) == 2 and "other settings" in capsys.readouterr().err
    assert work.is_dir()

    assert main([*argv, "--resume"]) == 0
    assert json.loads(capsys.readouterr().out)["resumed_blocks"] == 1
    assert not work.exists()
    return out


@pytest.mark.parametrize("flags, modes", [
    (("--method", "awq+gptq", "--weights", "mxint4-32", "--acts", "mxint8-32"), ("committed", "committing")),
    (("--method", "sq", "--weights", "int4", "--acts", "int8"), ("committed",)),
    (("--method", "gptq", "--weights", "mxint4-32", "--acts", "mxint8-32", "--kv", "mxint4-8"), ("committed",)),
    (("--method", "awq+gptq", "--target-bits", "4.6", "--override", "layers.0.q_proj=mxint8-16/mxint8-16"),
     ("committed",)),
    (("--method", "gptq", "--weights", "mxfp4-32", "--acts", "mxfp4-32", "--weights-prescale", "search",
      "--acts-prescale", "search", "--prescale-candidates", "0.6,0.75,1"), ("committed",)),
    (("--method", "gptq", "--weights", "mxint4-32", "--acts", "mxint8-32", "--gptq-float-target"), ("committed",)),
    (("--method", "gptq", "--weights", "mxint4-32", "--acts", "mxint8-32", "--true-sequential"), ("committed",)),
    (("--method", "sq+gptq", "--weights", "mxint4-32", "--acts", "mxint8-32", "--float-statistics"), ("committed",)),
], ids=["awq+gptq", "sq-int8", "gptq-kv", "target-bits", "prescale-search", "float-target", "true-sequential",
        "float-statistics"])
def test_resume_after_sigkill_gives_the_same_bytes(flags, modes, tiny_onnx, tiny_text, tmp_path, capsys):
    reference = tmp_path / "reference"
    assert main(quantize_args(tiny_onnx, reference, tiny_text, *flags, "--json")) == 0
    for mode in modes:
        out = kill_and_resume(tiny_onnx, tiny_text, tmp_path, flags, mode, capsys)
        assert folder_bytes(out) == folder_bytes(reference), mode


def test_resume_without_an_interrupted_run_starts_afresh(tiny_onnx, tiny_text, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(quantize_args(tiny_onnx, out, tiny_text, "--method", "rtn", "--resume", "--json")) == 0
    assert json.loads(capsys.readouterr().out)["resumed_blocks"] == 0
    assert (out / "model.onnx").is_file() and not (tmp_path / ".q.partial").exists()
    assert not (out / "progress.json").exists() and not (out / "blocks").exists()
