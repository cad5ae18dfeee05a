"""Model folders on disk: find ``model.onnx`` in a path, copy the config/tokenizer files, and write
outputs atomically (a temporary folder beside OUT, renamed at the end) so OUT is whole or absent."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from mxonnx.errors import InputError

ONNX_NAME = "model.onnx"
EXTERNAL_DATA_NAME = "model.onnx_data"


@dataclasses.dataclass(frozen=True)
class ModelPaths:
    """Where a model lives: ``folder`` holds config/tokenizer (None for a bare .onnx file)."""

    onnx: Path
    folder: Path | None


def resolve_model(path: str | os.PathLike) -> ModelPaths:
    """A model folder (with ``model.onnx``) or a ``.onnx`` file; anything else is an ``InputError``."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file or folder")
    if p.is_dir():
        onnx_file = p / ONNX_NAME
        if not onnx_file.is_file():
            candidates = sorted(x.name for x in p.glob("*.onnx"))
            if len(candidates) == 1:
                onnx_file = p / candidates[0]
            else:
                raise InputError(f"{p}: folder holds no {ONNX_NAME}")
        return ModelPaths(onnx=onnx_file, folder=p)
    if p.suffix != ".onnx":
        raise InputError(f"{p}: expected a model folder or a .onnx file")
    return ModelPaths(onnx=p, folder=None)


def copy_model_assets(src_folder: Path | None, dst: Path) -> None:
    """Copy everything but ONNX graphs and their external data (config, tokenizer, generation config)."""
    if src_folder is None:
        return
    for item in src_folder.iterdir():
        if item.is_file() and not item.name.endswith((".onnx", ".onnx_data", ".onnx.data")):
            shutil.copy2(item, dst / item.name)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _same_or_inside(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or b in a.parents or a in b.parents


def check_output(out: str | os.PathLike, *inputs: str | os.PathLike) -> Path:
    """Refuse an ``out`` that is (or contains, or lies inside) one of ``inputs``, an ``out`` that already exists,
    and a parent folder that cannot be written (created when missing). Returns the parent folder."""
    out = Path(out)
    for src in inputs:
        if _same_or_inside(out, Path(src)):
            raise InputError(f"output {out} would overwrite the input {src}; choose another -o")
    if out.exists():
        raise InputError(f"output {out} already exists; remove it or choose another -o")
    parent = out.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create {parent}: {exc.strerror}") from None
    if not os.access(parent, os.W_OK):
        raise InputError(f"cannot write to {parent}: permission denied")
    return parent


def publish(tmp: Path, out: Path) -> None:
    """Give the finished folder ``tmp`` the usual permissions (mkdtemp makes 0700) and rename it to ``out``."""
    os.chmod(tmp, 0o777 & ~current_umask())
    os.rename(tmp, out)


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, *inputs: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; rename it to ``out`` only if the block succeeds (the checks of
    :func:`check_output` first)."""
    out = Path(out)
    parent = check_output(out, *inputs)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    except OSError as exc:  # e.g. a read-only file system, which os.access does not see for root
        raise InputError(f"cannot write to {parent}: {exc.strerror}") from None
    try:
        yield tmp
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
