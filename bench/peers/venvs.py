"""Private virtual environments for peers whose pins conflict with ours, under ``bench/.venvs/<name>``.

Each environment is a list of pip install steps run in order (torch first, so nothing pulls a CUDA build).
A marker file records the steps; an environment whose marker differs is rebuilt from scratch.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

VENVS_DIR = Path(__file__).resolve().parent.parent / ".venvs"
MARKER = "bench-installed.json"

INSTALL_STEPS: dict[str, list[list[str]]] = {
    # shared/peers.md: torch first, then Quark with its own caps on onnx and onnxruntime.
    "quark": [
        ["torch==2.13.0"],
        ["amd-quark==0.13", "onnx==1.22.0", "onnxruntime==1.28.0", "transformers==4.57.6"],
    ],
    # onnx-neural-compressor 1.0 requires numpy<2; onnx/onnxruntime of its release time.
    "inc": [
        ["onnx-neural-compressor==1.0", "numpy<2", "onnx==1.17.0", "onnxruntime==1.20.1", "transformers==4.57.6",
         "prettytable", "scipy<1.14"],  # prettytable, scipy: imported but not declared by the package
    ],
}


class PeerUnavailable(RuntimeError):
    """A peer cannot run on this machine; the message (one line) says why and goes into its table row."""


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def venv_python(name: str) -> Path:
    return VENVS_DIR / name / "bin" / "python"


def ensure_venv(name: str, log=print) -> Path:
    """Python of the environment ``name``, creating and installing it when missing or outdated."""
    steps = INSTALL_STEPS[name]
    folder = VENVS_DIR / name
    marker = folder / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == steps:
        return venv_python(name)
    shutil.rmtree(folder, ignore_errors=True)
    log(f"  creating bench/.venvs/{name} (one time): " + " ; ".join(" ".join(s) for s in steps))
    done = subprocess.run([sys.executable, "-m", "venv", str(folder)], capture_output=True, text=True)
    if done.returncode != 0:
        raise PeerUnavailable(f"python -m venv failed: {_last_line(done.stderr)}")
    for step in steps:
        cmd = [str(venv_python(name)), "-m", "pip", "install", "--quiet", *step]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise PeerUnavailable(f"pip install {' '.join(step)} failed: {_last_line(done.stderr)}")
    marker.write_text(json.dumps(steps))
    return venv_python(name)


if __name__ == "__main__":
    for venv_name in sys.argv[1:] or list(INSTALL_STEPS):
        try:
            print(venv_name, ensure_venv(venv_name))
        except PeerUnavailable as exc:
            print(venv_name, "unavailable:", exc)
