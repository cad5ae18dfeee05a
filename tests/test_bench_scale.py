"""The scaling benchmark's pieces (project issue 17): the synthetic Llama generator, the per-child peak RSS, and a
resumable run of bench/scale.py against a fake mxonnx whose memory use and outputs are known."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import scale  # noqa: E402
from bench.rusage import run_measured  # noqa: E402
from mxonnx import synthetic  # noqa: E402

MICRO = synthetic.Shape(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=300, max_positions=128)


@pytest.fixture
def micro(monkeypatch, tiny_text):
    """A ``micro`` preset (hidden 64, vocab 300) and the text its tokenizer is built from."""
    monkeypatch.setitem(synthetic.PRESETS, "micro", MICRO)
    return tiny_text


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


def test_synthetic_model_is_reproducible_and_loads_in_transformers(micro, tmp_path):
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    a = synthetic.generate("micro", out=tmp_path / "a", text=micro, progress=False)
    b = synthetic.generate("micro", out=tmp_path / "b", text=micro, progress=False)
    assert not a["reused"] and _files(tmp_path / "a") == _files(tmp_path / "b")  # same seed: same bytes
    assert synthetic.generate("micro", out=tmp_path / "a", text=micro, progress=False)["reused"]
    other = synthetic.generate("micro", out=tmp_path / "s1", seed=1, text=micro, progress=False)
    assert _files(tmp_path / "s1") != _files(tmp_path / "a") and other["parameters"] == a["parameters"]
    assert a["weight_bytes"] == 2 * a["parameters"] == sum(len(v) for v in _files(tmp_path / "a").values()) - sum(
        8 + int.from_bytes(v[:8], "little") for v in _files(tmp_path / "a").values())

    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert (config["num_key_value_heads"], config["tie_word_embeddings"], config["dtype"]) == (2, False, "float16")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "a")
    assert len(tokenizer) == MICRO.vocab and tokenizer("w1 w2 nosuchword")["input_ids"][0] == 1  # <s> first
    assert tokenizer("nosuchword")["input_ids"][-1] == 0  # <unk>

    model = LlamaForCausalLM.from_pretrained(tmp_path / "a", dtype=torch.float32).eval()
    ids = np.arange(20) * 7 % MICRO.vocab
    with torch.no_grad():
        expected = model(torch.from_numpy(ids)[None]).logits[0].numpy()
    streamed, stats = synthetic.streamed_logits(synthetic.folder_source(tmp_path / "a"), MICRO, ids)
    assert len(stats) == 2 and np.abs(streamed - expected).max() < 1e-5 * max(1, np.abs(expected).max())
    generated, _ = synthetic.streamed_logits(synthetic.generated_source(MICRO, 0, 0.02), MICRO, ids)
    assert np.array_equal(generated, streamed)  # the check's tensors are the files' tensors
    assert synthetic.check_model(synthetic.generated_source(MICRO, 0, 0.02), MICRO, "float16")["finite"]


def test_sharded_and_deeper_models_hold_the_same_tensors(micro, tmp_path):
    from safetensors.numpy import load_file

    synthetic.generate("micro", out=tmp_path / "one", text=micro, progress=False)
    synthetic.generate("micro", layers=3, out=tmp_path / "sharded", shard_bytes=60_000, text=micro, progress=False)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == 2 * sum(int(np.prod(d)) for _, d in synthetic.tensor_specs(
        synthetic.preset_shape("micro", 3)))
    one = load_file(tmp_path / "one" / "model.safetensors")
    read = synthetic.folder_source(tmp_path / "sharded")
    for name, value in one.items():  # layers 0-1 of the 3-layer model are the 2-layer model's
        assert np.array_equal(read(name), value), name
    assert read("model.layers.2.mlp.up_proj.weight").shape == (128, 64)


def test_peak_rss_is_the_childs_own_even_under_a_big_parent(tmp_path):
    ballast = np.ones(60_000_000)  # 480 MB in this process: ru_maxrss of a child it spawns would include it
    big = run_measured([sys.executable, "-c", "b = b'x' * 200_000_000; print('{\"n\": 1}')"], tmp_path / "big",
                       poll_seconds=0.02)
    small = run_measured([sys.executable, "-c", "import sys; sys.exit('no such method')"], tmp_path / "small",
                         poll_seconds=0.02)
    assert ballast.sum() > 0
    assert big.returncode == 0 and big.json() == {"n": 1} and big.seconds > 0
    assert 190 < big.peak_rss_mb < 300
    assert small.returncode == 1 and small.failure() == "no such method" and small.peak_rss_mb < 60


def test_a_command_above_its_memory_budget_is_stopped(tmp_path):
    hog = run_measured([sys.executable, "-c", "import time; b = b'x' * 300_000_000; time.sleep(60)"], tmp_path / "hog",
                       poll_seconds=0.05, max_rss_gb=0.2)
    assert hog.returncode != 0 and hog.seconds < 30
    assert hog.failure().startswith("stopped by the benchmark: RSS reached") and hog.peak_rss_mb > 200


FAKE = """
import json, os, sys
from pathlib import Path
role, cmd, args = sys.argv[1], sys.argv[2], sys.argv[3:]
if "--help" in args:
    sys.exit(print("usage: fake " + cmd))
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\\n")
layers = int(args[args.index("--layers") + 1]) if "--layers" in args else 0
mb = {"generate": 40, "export": 120, "quantize": 90, "eval": 70, "inspect": 30, "lower": 60}[cmd]
if cmd == "quantize" and "awq+gptq" in args:
    if os.environ.get("FAKE_FAIL"):
        sys.exit("mxonnx quantize: failed: MemoryError: fake (rerun with --debug for details)")
    mb = 150
ballast = b"x" * (mb * 10**6)
if "-o" in args:
    out = Path(args[args.index("-o") + 1])
    out.mkdir(parents=True)
    src = Path(args[0]) if cmd != "generate" else None
    if cmd == "generate":
        (out / "model.safetensors").write_bytes(b"w" * 1000 * layers)
    else:
        prev = sum(p.stat().st_size for p in src.iterdir() if p.suffix in (".safetensors", ".onnx_data"))
        (out / "model.onnx").write_bytes(b"g" * 10)
        (out / "model.onnx_data").write_bytes(b"d" * (prev // 2))
result = {"perplexity": 31999.5, "tokens": 254, "windows": 2, "seqlen": 128} if cmd == "eval" else {"ok": True}
if cmd == "generate":
    result["parameters"] = 500 * layers
print(json.dumps(result))
"""


def _run_fake(tmp_path, monkeypatch, *extra):
    fake = tmp_path / "fake.py"
    fake.write_text(textwrap.dedent(FAKE))
    monkeypatch.setenv("FAKE_LOG", str(tmp_path / "calls.log"))
    argv = ["--quick", "--layers", "1,2", "--cache", str(tmp_path / "cache"), "--results", str(tmp_path / "results"),
            "--work", str(tmp_path / "work"), "--mxonnx", f"{sys.executable} {fake} mx",
            "--generator", f"{sys.executable} {fake} gen", "--poll", "0.02", "--json", *extra]
    return scale.main(argv)


def _calls(tmp_path) -> list[str]:
    path = tmp_path / "calls.log"
    return path.read_text().splitlines() if path.is_file() else []


def test_scale_run_measures_resumes_and_tabulates(tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_FAIL", "1")
    summary = _run_fake(tmp_path, monkeypatch)
    assert summary["export_dtype"] is None  # the fake's `export --help` offers no --dtype
    records = json.loads((tmp_path / "results" / "scale-quick.json").read_text())["records"]
    assert len(records) == 14 and len(summary["measured"]) == 14
    export = records["tiny/L2/export"]
    assert export["status"] == "ok" and 120 < export["peak_rss_mb"] < 175 and export["output_bytes"] == 1010
    awq = records["tiny/L1/quantize-awq+gptq"]
    assert awq["status"] == "failed" and awq["error"].startswith("mxonnx quantize: failed: MemoryError: fake")
    assert not list((tmp_path / "cache").iterdir())  # every model folder deleted once measured

    table = (tmp_path / "results" / "scale-quick.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| export"))
    cells = [c.strip() for c in row.split("|")[2:4]]
    for n, cell in zip((1, 2), cells):  # wall s (CPU s) / peak GiB (x float16 weights), from the records
        r, weights = records[f"tiny/L{n}/export"], records[f"tiny/L{n}/generate"]["output_bytes"]
        peak = r["peak_rss_mb"] * 2**20
        assert cell == f"{r['seconds']:.0f} s ({r['cpu_seconds']:.0f}) / {peak / 2**30:.2f} GiB ({peak / weights:.1f}x)"
        assert 0 < r["cpu_seconds"] <= 2 * r["seconds"] + 0.1
    assert "| quantize-awq+gptq | failed [1] | failed [2] |" in table
    assert "MemoryError: fake" in table and "| perplexity | 32000 (2 x 128) | 32000 (2 x 128) |" in table
    assert "| ONNX export | 0.00 GB | 0.00 GB |" in table and "| parameters | 0.000 B | 0.000 B |" in table
    assert (tmp_path / "results" / "scale_rss-quick.png").stat().st_size > 0

    calls = len(_calls(tmp_path))
    monkeypatch.delenv("FAKE_FAIL")
    again = _run_fake(tmp_path, monkeypatch)  # only the failed command is retried, with what it needs
    assert [(r["layers"], r["command"]) for r in again["measured"]] == [
        (1, "generate"), (1, "export"), (1, "quantize-awq+gptq"), (2, "generate"), (2, "export"),
        (2, "quantize-awq+gptq")]
    assert len(_calls(tmp_path)) == calls + 6
    assert _run_fake(tmp_path, monkeypatch)["measured"] == []  # all measured: nothing runs
    assert len(_run_fake(tmp_path, monkeypatch, "--refresh", "--commands", "generate,inspect")["measured"]) == 8
