"""The native onnxruntime kernels of the ``com.mxonnx`` ops: where the built library is, and how to build it.

``python -m mxonnx.ops.native build [--sanitize] [--force]`` compiles ``native/*.cc`` with g++ into
``native/build/libmxonnx_ops.so`` (``libmxonnx_ops_asan.so`` under AddressSanitizer + UBSan) and prints its path.
It is idempotent: nothing runs when the library is newer than its sources and was built with the same command.

onnxruntime's wheel ships no C/C++ headers, so the build takes onnxruntime 1.17's from the PyPI wheel
``amd-quark==0.13`` (downloaded with pip into a cache, checked against a pinned sha256, headers only extracted
into the gitignored ``native/include/``). The library is built against headers only and links no onnxruntime.
``session.py`` registers it on every session; ``MXONNX_NATIVE_LIB`` selects another build (the sanitizer one).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from mxonnx.models import sha256_of

SOURCE_DIR = Path(__file__).with_name("native")
BUILD_DIR = SOURCE_DIR / "build"
INCLUDE_DIR = SOURCE_DIR / "include"
SOURCES = ("mx_format.cc", "mx_kernels.cc", "mx_matmul.cc", "mx_gemv.cc", "mx_attention.cc", "mx_ops.cc")
VERSION_SCRIPT = SOURCE_DIR / "mxonnx_ops.lds"
LIBRARY_ENV = "MXONNX_NATIVE_LIB"

HEADER_REQUIREMENT = "amd-quark==0.13"
HEADER_WHEEL = "amd_quark-0.13-py3-none-any.whl"
HEADER_WHEEL_SHA256 = "3b3e58a4cbbcff20d27815b641aa4de4d698efde3c782306cb4a6a05bcf55c8c"
HEADER_PREFIX = "quark/onnx/operators/custom_ops/include/onnxruntime-1.17.0/onnxruntime/core/session/"
HEADERS = ("onnxruntime_c_api.h", "onnxruntime_cxx_api.h", "onnxruntime_cxx_inline.h", "onnxruntime_float16.h")

_COMMON_FLAGS = ["-std=c++17", "-fPIC", "-shared", "-fvisibility=hidden", "-ffp-contract=off", "-Wall", "-Wextra",
                 f"-Wl,--version-script={VERSION_SCRIPT}"]
_RELEASE_FLAGS = ["-O3", "-Wl,-z,defs"]
# The sanitizer build also drops the AVX2 clones, so that the tests cover the baseline loops as well.
_SANITIZE_FLAGS = ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
                   "-fno-sanitize-recover=undefined", "-DMXONNX_NO_VECTOR_CLONES"]


class NativeBuildError(RuntimeError):
    """The native library could not be built (no compiler, download failed, checksum mismatch, compile error)."""


def library_file(sanitize: bool = False) -> Path:
    """Where ``build_native`` puts the library."""
    return BUILD_DIR / ("libmxonnx_ops_asan.so" if sanitize else "libmxonnx_ops.so")


def native_library_path() -> Path | None:
    """The library to register: ``$MXONNX_NATIVE_LIB`` when set, else the release build if it exists, else None."""
    override = os.environ.get(LIBRARY_ENV)
    if override:
        path = Path(override)
        if not path.is_file():
            from mxonnx.errors import InputError

            raise InputError(f"{LIBRARY_ENV}={override} is not a file; build it with python -m mxonnx.ops.native build")
        return path
    path = library_file()
    return path if path.is_file() else None


def cache_dir() -> Path:
    """Download cache: ``$MXONNX_CACHE`` or ``$XDG_CACHE_HOME/mxonnx`` (default ``~/.cache/mxonnx``)."""
    if os.environ.get("MXONNX_CACHE"):
        return Path(os.environ["MXONNX_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mxonnx"


def _header_wheel(cache: Path) -> Path:
    """The pinned wheel in ``cache``, downloaded with pip when absent; its sha256 is always checked."""
    wheel = cache / HEADER_WHEEL
    if not wheel.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                   HEADER_REQUIREMENT, "-d", tmp]
            if subprocess.run(cmd).returncode != 0 or not (Path(tmp) / HEADER_WHEEL).is_file():
                raise NativeBuildError(f"pip could not download {HEADER_REQUIREMENT} (needed for onnxruntime headers)")
            os.replace(Path(tmp) / HEADER_WHEEL, wheel)
    if sha256_of(wheel) != HEADER_WHEEL_SHA256:
        raise NativeBuildError(f"{wheel} does not have the pinned sha256 {HEADER_WHEEL_SHA256}; delete it and retry")
    return wheel


def ensure_headers(cache: Path | None = None) -> Path:
    """Directory holding the onnxruntime C/C++ API headers, extracted from the pinned wheel if needed."""
    target = INCLUDE_DIR / "onnxruntime"
    if all((target / name).is_file() for name in HEADERS):
        return target
    wheel = _header_wheel(cache or cache_dir())
    target.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as archive:
        for name in HEADERS:
            data = archive.read(HEADER_PREFIX + name)
            tmp = target / f".{name}.{os.getpid()}"
            tmp.write_bytes(data)
            os.replace(tmp, target / name)
    return target


def _compile_command(output: Path, headers: Path, sanitize: bool) -> list[str]:
    compiler = os.environ.get("CXX") or shutil.which("g++")
    if compiler is None:
        raise NativeBuildError("no C++ compiler: install g++ (or set CXX) to build the native MX kernels")
    flags = _COMMON_FLAGS + (_SANITIZE_FLAGS if sanitize else _RELEASE_FLAGS)
    return [compiler, *flags, f"-I{headers}", *(str(SOURCE_DIR / s) for s in SOURCES), "-o", str(output)]


def _up_to_date(library: Path, stamp: Path, command: list[str]) -> bool:
    if not (library.is_file() and stamp.is_file()) or stamp.read_text() != " ".join(command):
        return False
    inputs = [SOURCE_DIR / s for s in SOURCES] + list(SOURCE_DIR.glob("*.h")) + [VERSION_SCRIPT]
    return all(p.stat().st_mtime <= library.stat().st_mtime for p in inputs)


def build_native(sanitize: bool = False, force: bool = False, cache: Path | None = None) -> Path:
    """Build the library (``sanitize``: with -fsanitize=address,undefined) unless up to date; return its path.

    The compiler writes a temporary file that then replaces the library atomically, so concurrent builds and
    running sessions never see a half-written file.
    """
    library = library_file(sanitize)
    stamp = library.with_suffix(".cmd")
    command = _compile_command(library, ensure_headers(cache), sanitize)
    if not force and _up_to_date(library, stamp, command):
        return library
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    partial = library.with_name(f".{library.name}.{os.getpid()}")
    result = subprocess.run(command[:-1] + [str(partial)], capture_output=True, text=True)
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        raise NativeBuildError(f"compiling the native MX kernels failed:\n{result.stderr.strip()}")
    os.replace(partial, library)
    stamp.write_text(" ".join(command))
    return library


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mxonnx.ops.native", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["build", "path"], help="build the library, or print where it goes")
    parser.add_argument("--sanitize", action="store_true", help="AddressSanitizer + UBSan build (for tests)")
    parser.add_argument("--force", action="store_true", help="rebuild even when up to date")
    args = parser.parse_args(argv)
    if args.action == "path":
        print(library_file(args.sanitize))
        return 0
    try:
        print(build_native(sanitize=args.sanitize, force=args.force))
    except NativeBuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
