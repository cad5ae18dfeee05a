"""A child command's own wall time, CPU time and peak RSS, with a guard for a machine shared with others.

``ru_maxrss`` from ``os.wait4`` in the benchmark process itself would be wrong: Linux keeps the larger of the
process's peak before and after ``exec``, and a child spawned by a big parent starts as a copy of the parent (with
``vfork`` it even *is* the parent's memory until ``exec``), so a 400 MB parent reports >= 400 MB for ``true``. The
command is therefore started by a small trampoline (``python -I -S``, ~8 MB) that spawns it, ``wait4``s it and
writes its rusage to a file. The parent polls the command's ``VmRSS``/``VmHWM`` (live progress, cross-check) and
the machine's ``MemAvailable``; below ``min_available_gb`` (or above ``max_rss_gb`` of its own) it stops the command
(SIGTERM, then SIGKILL) rather than let it starve the other users' jobs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

TRAMPOLINE = r"""
import json, os, signal, sys, time
out, cmd = sys.argv[1], sys.argv[2:]
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the parent's SIGTERM to the group is for the command
start = time.perf_counter()
try:
    pid = os.posix_spawnp(cmd[0], cmd, os.environ, setsigdef=(signal.SIGTERM,))
except OSError as exc:
    sys.stderr.write(f"cannot run {cmd[0]}: {exc.strerror}\n")
    sys.exit(127)
_, status, ru = os.wait4(pid, 0)
seconds = time.perf_counter() - start
code = os.waitstatus_to_exitcode(status)
with open(out, "w") as f:
    json.dump({"pid": pid, "returncode": code, "seconds": seconds, "maxrss_kib": ru.ru_maxrss,
               "cpu_seconds": ru.ru_utime + ru.ru_stime}, f)
sys.exit(code if code >= 0 else 128 - code)
"""
KILL_GRACE_SECONDS = 20.0


@dataclasses.dataclass(frozen=True)
class Measured:
    """One command: exit status, wall and CPU seconds, peak RSS (its own ``ru_maxrss``) and the polled
    ``VmHWM``, the lowest ``MemAvailable`` seen while it ran, why it was stopped (or None), its output."""

    returncode: int
    seconds: float
    cpu_seconds: float
    peak_rss_mb: float
    polled_hwm_mb: float
    min_available_gb: float
    stopped: str | None
    stdout: str
    stderr: str

    def failure(self) -> str:
        """One line saying why the command failed: the guard's reason or the last line of its stderr."""
        if self.stopped:
            return self.stopped
        lines = [line.strip() for line in self.stderr.splitlines() if line.strip()]
        return lines[-1] if lines else f"exit status {self.returncode}"

    def json(self) -> dict | None:
        """The last stdout line as JSON (``--json`` commands print one object), or None."""
        lines = [line for line in self.stdout.splitlines() if line.strip()]
        try:
            return json.loads(lines[-1]) if lines else None
        except ValueError:
            return None


def mem_available_gb() -> float:
    """``MemAvailable`` of ``/proc/meminfo`` in GiB."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def _status_kib(pid: int) -> tuple[int, int]:
    """``(VmRSS, VmHWM)`` of a live process in KiB, ``(0, 0)`` once it is gone."""
    rss = hwm = 0
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
    except OSError:
        pass
    return rss, hwm


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def _stop(group: int, proc: subprocess.Popen) -> None:
    """SIGTERM the command's process group (the trampoline ignores it), SIGKILL after a grace period."""
    try:
        os.killpg(group, signal.SIGTERM)
        proc.wait(timeout=KILL_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        os.killpg(group, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _guard(rss_gb: float, available_gb: float, min_available_gb: float, max_rss_gb: float | None) -> str | None:
    """Why the command must stop now, or None."""
    if available_gb < min_available_gb:
        return f"stopped by the benchmark: MemAvailable fell to {available_gb:.1f} GiB (< {min_available_gb} GiB)"
    if max_rss_gb is not None and rss_gb > max_rss_gb:
        return f"stopped by the benchmark: RSS reached {rss_gb:.1f} GiB (> {max_rss_gb} GiB)"
    return None


def run_measured(cmd: list[str], log_stem: Path, env: dict[str, str] | None = None, min_available_gb: float = 0.0,
                 poll_seconds: float = 0.5, on_poll: Callable[[float, float], None] | None = None,
                 max_rss_gb: float | None = None) -> Measured:
    """Run ``cmd`` to completion through the trampoline; stdout and stderr go to ``log_stem.stdout/.stderr``.
    ``on_poll(rss_gb, available_gb)`` is called at every poll (progress display). The command is stopped when the
    machine's MemAvailable falls below ``min_available_gb`` or its RSS exceeds ``max_rss_gb``."""
    log_stem.parent.mkdir(parents=True, exist_ok=True)
    rusage_file, out_file, err_file = (log_stem.with_suffix(s) for s in (".rusage.json", ".stdout", ".stderr"))
    rusage_file.unlink(missing_ok=True)
    hwm_kib, min_available, stopped = 0, mem_available_gb(), None
    with open(out_file, "w") as out, open(err_file, "w") as err:
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", TRAMPOLINE, str(rusage_file), *cmd], stdout=out,
                                stderr=err, env={**os.environ, **(env or {})}, start_new_session=True)
        try:
            while proc.poll() is None:
                rss_kib = 0
                for child in _children(proc.pid):
                    rss, hwm = _status_kib(child)
                    rss_kib, hwm_kib = rss_kib + rss, max(hwm_kib, hwm)
                available = mem_available_gb()
                min_available = min(min_available, available)
                if on_poll is not None:
                    on_poll(rss_kib / 2**20, available)
                reason = _guard(rss_kib / 2**20, available, min_available_gb, max_rss_gb)
                if reason and stopped is None:
                    stopped = reason
                    _stop(proc.pid, proc)
                time.sleep(poll_seconds)
        except BaseException:  # Ctrl-C: do not leave the command running in its own session
            _stop(proc.pid, proc)
            raise
    usage = json.loads(rusage_file.read_text()) if rusage_file.is_file() else {}
    return Measured(returncode=usage.get("returncode", proc.returncode), seconds=usage.get("seconds", float("nan")),
                    cpu_seconds=usage.get("cpu_seconds", float("nan")),
                    peak_rss_mb=usage.get("maxrss_kib", 0) / 1024, polled_hwm_mb=hwm_kib / 1024,
                    min_available_gb=min_available, stopped=stopped, stdout=out_file.read_text(),
                    stderr=err_file.read_text())
