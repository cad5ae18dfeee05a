"""The work folder of a resumable ``mxonnx quantize`` run: ``.OUT.partial`` beside OUT.

It holds what the run has finished, so that a run killed at any point (SIGKILL, power loss) continues with
``--resume`` from the last finished decoder block and writes the same bytes as an uninterrupted run:

- ``blocks/NNNNN.bin``: the tensors block ``NNNNN`` got (packed codes, exponents, folded norm weights, activation
  scales), their bytes one after another; the model then reads them from there (``ir.ExternalTensor``), so the
  quantized weights of finished blocks leave memory;
- ``blocks/NNNNN.npz``: the block's smoothing scales (plain data, replayed on resume);
- ``hidden-NNNNN.npy``: the calibration hidden states entering block NNNNN (one ``[1, T, hidden]`` per window);
- ``plan.json``: decisions taken before the first block (the ``--target-bits`` allocation), replayed on resume;
- ``progress.json``: the run's fingerprint (settings and input) and one record per finished block, naming its
  files and tensors. It is the commit point: replaced atomically after a block's files are on disk (fsync).

On success the model is saved into the folder, the work files are removed and the folder is renamed to OUT, so
OUT is whole or absent. A run that fails after finishing a block keeps the folder (``--resume`` continues it),
unless it was a fresh run that found its input bad (``InputError``); a folder with no finished block is removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir

from mxonnx.errors import InputError
from mxonnx.modelio import check_output, publish

PROGRESS = "progress.json"
PLAN = "plan.json"  # decisions taken before the first block (the --target-bits allocation)
BLOCKS = "blocks"
FORMAT_VERSION = 1
ALIGNMENT = 64  # bytes between tensors in a block file


def work_folder_path(out: Path) -> Path:
    """``.OUT.partial`` beside ``out``."""
    return out.absolute().parent / f".{out.name}.partial"


def _fsync_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through ``path.tmp`` and an atomic rename, both on disk before returning."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class WorkFolder:
    """The finished blocks of one run and the files they live in (see the module docstring)."""

    def __init__(self, path: Path, fingerprint: str, records: list[dict], hidden: str | None):
        self.path, self.fingerprint, self.records, self._hidden = path, fingerprint, records, hidden
        self.resumed = len(records)  # blocks finished by earlier runs
        (path / BLOCKS).mkdir(exist_ok=True)

    @property
    def finished(self) -> int:
        """How many decoder blocks are done (blocks ``0..finished-1``)."""
        return len(self.records)

    def persist_block(self, model: ir.Model, index: int, persisted: dict[int, object], scales: Mapping[str, np.ndarray],
                      extra: Mapping | None = None, hidden: Sequence[np.ndarray] | None = None) -> None:
        """Write block ``index``'s new tensors (every initializer whose tensor is not in ``persisted``, ``{id:
        tensor}``, which holds the tensors so that their ids stay theirs; added to it), its ``scales`` and the ``hidden`` states entering the next block, then commit the record
        (``extra``: more plain data for it, e.g. AWQ's alphas). The model reads those tensors from the file after."""
        if index != self.finished:
            raise ValueError(f"block {index} finished after {self.finished} blocks")
        stem = f"{BLOCKS}/{index:05d}"
        tensors = []
        with open(self.path / f"{stem}.bin", "wb") as f:
            for value in list(model.graph.initializers.values()):
                tensor = value.const_value
                if id(tensor) in persisted:
                    continue
                f.seek(-f.tell() % ALIGNMENT, os.SEEK_CUR)
                offset, data = f.tell(), tensor.tobytes()
                f.write(data)
                tensors.append({"name": value.name, "dtype": int(tensor.dtype), "shape": list(tensor.shape.numpy()),
                                "offset": offset, "length": len(data)})
                del data
            f.flush()
            os.fsync(f.fileno())
        with open(self.path / f"{stem}.npz", "wb") as f:
            np.savez(f, **{group: np.asarray(s, np.float64) for group, s in scales.items()})
            f.flush()
            os.fsync(f.fileno())
        record = {"index": index, "data": f"{stem}.bin", "scales": f"{stem}.npz", "tensors": tensors, **(extra or {})}
        self._adopt(model, record, persisted)
        hidden_name = self._write_hidden(index + 1, hidden) if hidden is not None else None
        previous = self._hidden
        self.records.append(record)
        self._hidden = hidden_name
        self._write_progress()
        if previous and previous != hidden_name:
            (self.path / previous).unlink(missing_ok=True)

    def save_plan(self, plan: Mapping) -> None:
        """Store the run's plain-data decisions taken before its first block (on disk before returning)."""
        _fsync_write(self.path / PLAN, json.dumps(plan, indent=1, sort_keys=True).encode())

    def plan(self) -> dict | None:
        """The decisions :meth:`save_plan` stored, or None."""
        path = self.path / PLAN
        return json.loads(path.read_text()) if path.is_file() else None

    def block_scales(self, index: int) -> dict[str, np.ndarray]:
        """The smoothing scales stored with finished block ``index``."""
        with np.load(self.path / self.records[index]["scales"]) as stored:
            return {group: stored[group] for group in stored.files}

    def adopt_block(self, model: ir.Model, index: int, persisted: dict[int, object]) -> None:
        """Make the model read finished block ``index``'s tensors from its file (the model must hold initializers of
        those names, dtypes and shapes, as replaying the block's passes gives)."""
        self._adopt(model, self.records[index], persisted)

    def _adopt(self, model: ir.Model, record: dict, persisted: dict[int, object]) -> None:
        initializers = model.graph.initializers
        for entry in record["tensors"]:
            value = initializers.get(entry["name"])
            dtype, shape = ir.DataType(entry["dtype"]), tuple(entry["shape"])
            if value is None or value.const_value is None or value.const_value.dtype != dtype or \
                    tuple(value.const_value.shape.numpy()) != shape:
                raise InputError(f"{self.path}: block {record['index']} does not match the model being quantized "
                                 f"(tensor {entry['name']!r}); remove the folder and start again")
            tensor = ir.ExternalTensor(record["data"], entry["offset"], entry["length"], dtype, shape=ir.Shape(shape),
                                       name=entry["name"], base_dir=self.path)
            value.const_value = tensor
            persisted[id(tensor)] = tensor

    def hidden_states(self) -> list[np.ndarray] | None:
        """The stored hidden states entering block :attr:`finished`, or None when none were stored."""
        if self._hidden is None:
            return None
        stored = np.load(self.path / self._hidden, mmap_mode="r")
        return [np.array(stored[i]) for i in range(len(stored))]

    def _write_hidden(self, position: int, hidden: Sequence[np.ndarray]) -> str:
        name = f"hidden-{position:05d}.npy"
        tmp = self.path / (name + ".tmp")
        stored = np.lib.format.open_memmap(tmp, mode="w+", dtype=hidden[0].dtype, shape=(len(hidden), *hidden[0].shape))
        for i, h in enumerate(hidden):
            stored[i] = h
        stored.flush()
        del stored
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.path / name)
        return name

    def _write_progress(self) -> None:
        progress = {"version": FORMAT_VERSION, "fingerprint": self.fingerprint, "hidden": self._hidden,
                    "blocks": self.records}
        _fsync_write(self.path / PROGRESS, json.dumps(progress, indent=1).encode())

    def remove_work_files(self) -> None:
        """Drop everything but the saved model (the last step before the folder becomes OUT)."""
        shutil.rmtree(self.path / BLOCKS, ignore_errors=True)
        for item in self.path.iterdir():
            if item.name in (PROGRESS, PLAN) or item.name.startswith("hidden-"):
                item.unlink()


def _open(path: Path, fingerprint: str, resume: bool) -> WorkFolder:
    progress_file = path / PROGRESS
    if path.exists() and not resume:
        raise InputError(f"{path} holds an interrupted run for this output: add --resume to continue it, or remove "
                         "the folder")
    if path.exists() and progress_file.is_file():
        progress = json.loads(progress_file.read_text())
        if progress.get("version") != FORMAT_VERSION or progress.get("fingerprint") != fingerprint:
            raise InputError(f"{path} holds a run with other settings or another input model; run the same command "
                             "again with --resume, or remove the folder")
        return WorkFolder(path, fingerprint, progress["blocks"], progress["hidden"])
    if path.exists():  # killed before its first block was committed: nothing to keep
        shutil.rmtree(path)
    try:
        path.mkdir()
    except OSError as exc:
        raise InputError(f"cannot write to {path.parent}: {exc.strerror}") from None
    return WorkFolder(path, fingerprint, [], None)


@contextlib.contextmanager
def resumable_output_dir(out: str | os.PathLike, fingerprint: str, resume: bool,
                         *inputs: str | os.PathLike) -> Iterator[WorkFolder]:
    """Yield the :class:`WorkFolder` of ``out`` (continued when ``resume`` and its fingerprint matches); on success
    its work files are removed and it becomes ``out``. The checks of ``mxonnx.modelio.check_output`` first."""
    out = Path(out)
    check_output(out, *inputs)
    work = _open(work_folder_path(out), fingerprint, resume)
    try:
        yield work
        work.remove_work_files()
        publish(work.path, out)
    except BaseException as exc:
        # bad input found by a fresh run: nothing worth resuming; a resumed run's folder is the user's to remove
        if not work.finished or (isinstance(exc, InputError) and not work.resumed):
            shutil.rmtree(work.path, ignore_errors=True)
        raise
