"""Scaling benchmark (project issue 17, "7B-class Llamas on one 24 GiB machine"): wall time and peak RSS of every
mxonnx command on synthetic Llama-2-7B-shaped models (``mxonnx.synthetic``, 32/8 heads) 2, 4, 8 and 32 layers deep.

For each depth, as child processes measured one at a time (``bench/rusage.py``: the command's own ``ru_maxrss``):

    generate            python -m mxonnx.synthetic generate llama2-7b --layers N -o HF
    export              mxonnx export HF -o ONNX --dtype float16   (without --dtype while the CLI lacks it)
    quantize-rtn        mxonnx quantize ONNX -o RTN --method rtn
    eval                mxonnx eval RTN --max-windows 2 --seqlen 512
    inspect             mxonnx inspect RTN
    lower               mxonnx lower RTN -o NBITS --target matmulnbits
    quantize-awq+gptq   mxonnx quantize ONNX -o AWQ --method awq+gptq --calib-samples 24

Results accumulate in ``bench/results/scale.json`` (one record per depth and command, saved after each command);
a command measured with the same options is not run again unless ``--refresh``, a failed one is retried.
``scale.md`` (command x depth: wall s / peak RSS GB, sizes on disk, machine, versions, failures) and
``scale_rss.png`` (peak RSS against layers) are rewritten from every record. Model folders live in
``models/cache/`` and are deleted as soon as no remaining command needs them (``--keep`` keeps them).
``--quick``: the ``tiny`` shape (hidden 256), depths 1 and 2, short windows, ``-quick`` file names.

    .venv/bin/python bench/scale.py [--layers 2,4,8] [--commands export,quantize-rtn,eval] [--keep] [--refresh]
    nohup .venv/bin/python bench/scale.py --layers 32 > bench/.work/scale/L32.log 2>&1 &   # hours
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import importlib.metadata
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.measure import LoadSampler, git_commit, machine, model_file_bytes  # noqa: E402
from bench.rusage import Measured, mem_available_gb, run_measured  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CALIB_SAMPLES = 24  # x 512 tokens = 12288 >= 11008, the widest K of a 7B (GPTQ needs as many tokens as K)


@dataclasses.dataclass(frozen=True)
class Step:
    """One measured command: the folder it reads (``needs``), the folder it writes (``makes``), its arguments
    (``{hf}``, ``{onnx}``, ... stand for the depth's folders) and which program runs it."""

    name: str
    program: str  # "generator" or "mxonnx"
    args: tuple[str, ...]
    needs: str | None = None
    makes: str | None = None


def steps(export_dtype: str | None, quick: bool) -> list[Step]:
    """The commands of one depth, in running order (the long AWQ+GPTQ last)."""
    seqlen = "128" if quick else "512"
    dtype = ("--dtype", export_dtype) if export_dtype else ()
    return [
        Step("generate", "generator", ("generate", "{preset}", "--layers", "{layers}", "-o", "{hf}", "--seed", "{seed}",
                                       "--json"), makes="hf"),
        Step("export", "mxonnx", ("export", "{hf}", "-o", "{onnx}", *dtype, "--json"), needs="hf", makes="onnx"),
        Step("quantize-rtn", "mxonnx", ("quantize", "{onnx}", "-o", "{rtn}", "--method", "rtn", "--json"),
             needs="onnx", makes="rtn"),
        Step("eval", "mxonnx", ("eval", "{rtn}", "--max-windows", "2", "--seqlen", seqlen, "--json"), needs="rtn"),
        Step("inspect", "mxonnx", ("inspect", "{rtn}", "--json"), needs="rtn"),
        Step("lower", "mxonnx", ("lower", "{rtn}", "-o", "{nbits}", "--target", "matmulnbits", "--json"),
             needs="rtn", makes="nbits"),
        Step("quantize-awq+gptq", "mxonnx", ("quantize", "{onnx}", "-o", "{awq}", "--method", "awq+gptq",
                                             "--calib-samples", str(CALIB_SAMPLES), "--calib-seqlen", seqlen, "--json"),
             needs="onnx", makes="awq"),
    ]


STEP_NAMES = [s.name for s in steps(None, False)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", default=None, help="comma-separated depths (default 2,4,8; --quick 1,2)")
    p.add_argument("--commands", default=",".join(STEP_NAMES),
                   help="comma-separated subset of: " + ", ".join(STEP_NAMES))
    p.add_argument("--preset", default=None, help="mxonnx.synthetic preset (default llama2-7b; --quick tiny)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny shape, depths 1,2: a smoke test of the harness")
    p.add_argument("--refresh", action="store_true", help="measure again what is already measured")
    p.add_argument("--keep", action="store_true", help="keep the model folders after measuring")
    p.add_argument("--min-available-gb", type=float, default=1.5,
                   help="stop a command when the machine's MemAvailable falls below this (default 1.5 GiB)")
    p.add_argument("--max-rss-gb", type=float, default=None, help="stop a command whose RSS exceeds this (GiB)")
    p.add_argument("--cache", type=Path, default=REPO / "models" / "cache", help="where model folders go")
    p.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--work", type=Path, default=REPO / "bench" / ".work" / "scale", help="logs of the commands")
    p.add_argument("--mxonnx", default=None, help="command prefix running mxonnx (default: this Python -m mxonnx.cli)")
    p.add_argument("--generator", default=None,
                   help="command prefix running the generator (default: this Python -m mxonnx.synthetic)")
    p.add_argument("--poll", type=float, default=0.5, help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="print one JSON object (the records of this run) at the end")
    args = p.parse_args(argv)
    args.preset = args.preset or ("tiny" if args.quick else "llama2-7b")
    args.layers = [int(n) for n in (args.layers or ("1,2" if args.quick else "2,4,8")).split(",")]
    args.commands = args.commands.split(",")
    unknown = sorted(set(args.commands) - set(STEP_NAMES))
    if unknown or any(n <= 0 for n in args.layers):
        p.error(f"unknown commands {unknown}" if unknown else "depths must be positive")
    args.mxonnx = shlex.split(args.mxonnx) if args.mxonnx else [sys.executable, "-m", "mxonnx.cli"]
    args.generator = shlex.split(args.generator) if args.generator else [sys.executable, "-m", "mxonnx.synthetic"]
    return args


def export_dtype_flag(mxonnx: list[str]) -> str | None:
    """``float16`` when ``mxonnx export --help`` offers ``--dtype``, else None (export stays float32)."""
    done = subprocess.run([*mxonnx, "export", "--help"], capture_output=True, text=True, env=child_env())
    return "float16" if "--dtype" in done.stdout else None


def child_env() -> dict[str, str]:
    """Every child sees the repository on its path and one BLAS thread (as the mxonnx CLI sets for itself)."""
    return {**os.environ, "PYTHONPATH": str(REPO), "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS", "1")}


def folders(cache: Path, preset: str, layers: int) -> dict[str, Path]:
    """The depth's model folders by role."""
    base = cache / f"scale-{preset}-L{layers}"
    return {"hf": cache / f"synthetic-{preset}-L{layers}", "onnx": base / "onnx", "rtn": base / "rtn-mxint4-128",
            "awq": base / "awq-gptq-mxint4-128", "nbits": base / "rtn-matmulnbits"}


def folder_bytes(role: str, folder: Path) -> int:
    """Weights on disk: safetensors files of the HF folder, graph + external data of an ONNX folder."""
    if role == "hf":
        return sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    return model_file_bytes(folder)


def load_results(path: Path) -> dict:
    """The records measured so far (``{"meta": ..., "records": {key: record}}``), empty when there are none."""
    if path.is_file():
        return json.loads(path.read_text())
    return {"meta": {}, "records": {}}


def save_json(path: Path, data: dict) -> None:
    """Write ``data`` atomically (a crash never leaves half a results file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def record_key(preset: str, layers: int, step: str) -> str:
    """``PRESET/LN/COMMAND``: one record per depth and command."""
    return f"{preset}/L{layers}/{step}"


def step_options(step: Step, args: argparse.Namespace, export_dtype: str | None) -> dict:
    """What a record must match to count as measured: the shape, seed, the command's arguments and the export's
    dtype (every later command reads the exported model)."""
    from mxonnx.synthetic import GENERATOR_VERSION, preset_shape

    shape = {k: v for k, v in dataclasses.asdict(preset_shape(args.preset)).items() if k != "layers"}
    return {"preset": args.preset, "shape": shape, "seed": args.seed, "generator_version": GENERATOR_VERSION,
            "args": list(step.args), "export_dtype": None if step.name == "generate" else export_dtype}


def command(step: Step, args: argparse.Namespace, layers: int, paths: dict[str, Path]) -> list[str]:
    """The step's argv for this depth: its program's prefix and its arguments with the folders filled in."""
    fields = {"preset": args.preset, "layers": str(layers), "seed": str(args.seed),
              **{role: str(folder) for role, folder in paths.items()}}
    prefix = args.generator if step.program == "generator" else args.mxonnx
    return prefix + [a.format(**fields) for a in step.args]


def plan(depth_steps: list[Step], wanted: set[str], paths: dict[str, Path]) -> list[Step]:
    """The wanted steps plus, transitively, the producers of any folder they need that is not on disk."""
    producer = {s.makes: s for s in depth_steps if s.makes}
    chosen, todo = set(wanted), list(wanted)
    by_name = {s.name: s for s in depth_steps}
    while todo:
        need = by_name[todo.pop()].needs
        if need and not paths[need].is_dir() and producer[need].name not in chosen:
            chosen.add(producer[need].name)
            todo.append(producer[need].name)
    return [s for s in depth_steps if s.name in chosen]


def release(role: str | None, remaining: list[Step], paths: dict[str, Path], keep: bool) -> None:
    """Delete the folder of ``role`` when no remaining step reads it (unless ``keep``)."""
    if role and not keep and not any(s.needs == role for s in remaining):
        shutil.rmtree(paths[role], ignore_errors=True)


def code_fingerprint() -> str:
    """sha256 (12 hex) of the sources of mxonnx/ and passes/ as they are on disk: the commit alone does not say
    what ran while the work tree has changes."""
    digest = hashlib.sha256()
    for path in sorted([*REPO.glob("mxonnx/**/*.py"), *REPO.glob("passes/*.py")]):
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


class LiveStatus:
    """The running command's elapsed time, RSS and the machine's MemAvailable on one tqdm line: refreshed every
    second on a terminal, every ``LOG_REFRESH_SECONDS`` in a log file."""

    LOG_REFRESH_SECONDS = 60.0

    def __init__(self, desc: str, disable: bool):
        from tqdm.auto import tqdm

        self.every = 1.0 if sys.stderr.isatty() else self.LOG_REFRESH_SECONDS
        self.last = 0.0
        self.bar = tqdm(desc=desc, bar_format="{desc}: {elapsed}{postfix}", disable=disable, file=sys.stderr)

    def __call__(self, rss_gb: float, available_gb: float) -> None:
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self.bar.set_postfix_str(f"RSS {rss_gb:.2f} GiB, MemAvailable {available_gb:.1f} GiB")

    def close(self) -> None:
        self.bar.close()


def measure_step(step: Step, args: argparse.Namespace, layers: int, paths: dict[str, Path]) -> dict:
    """Run one step (its output folder removed first) and turn the measurement into a record."""
    if step.makes:
        shutil.rmtree(paths[step.makes], ignore_errors=True)
    cmd = command(step, args, layers, paths)
    log = args.work / "logs" / f"{args.preset}-L{layers}-{step.name}"
    status = LiveStatus(f"L{layers} {step.name}", disable=args.json)
    try:
        with LoadSampler() as load:
            run: Measured = run_measured(cmd, log, child_env(), args.min_available_gb, args.poll, status,
                                         args.max_rss_gb)
    finally:
        status.close()
    ok = run.returncode == 0 and run.stopped is None
    record = {"preset": args.preset, "layers": layers, "command": step.name, "status": "ok" if ok else "failed",
              "argv": cmd,
              "seconds": run.seconds, "cpu_seconds": run.cpu_seconds, "peak_rss_mb": run.peak_rss_mb,
              "polled_hwm_mb": run.polled_hwm_mb, "min_available_gb": run.min_available_gb,
              "load_average_mean": load.mean, "load_average_peak": load.peak, "commit": git_commit(REPO),
              "code_sha256_12": code_fingerprint(),
              "measured_at": datetime.datetime.now().isoformat(timespec="seconds"), "log": str(log)}
    if not ok:
        record["error"] = run.failure()
    result = run.json()
    if ok and result is not None:
        record["result"] = {k: v for k, v in result.items() if not isinstance(v, (list, dict)) or k == "formats"}
    if ok and step.makes:
        record["output_bytes"] = folder_bytes(step.makes, paths[step.makes])
    return record


def progress_line(record: dict) -> str:
    """One line per finished command for the terminal or the log."""
    if record["status"] != "ok":
        return f"  L{record['layers']} {record['command']}: FAILED: {record['error']}"
    size = f", {record['output_bytes'] / 1e9:.2f} GB on disk" if "output_bytes" in record else ""
    return (f"  L{record['layers']} {record['command']}: {record['seconds']:.1f} s, "
            f"peak RSS {record['peak_rss_mb'] / 1024:.2f} GiB{size}")


def run_depth(layers: int, args: argparse.Namespace, results: dict, results_path: Path, export_dtype: str | None,
              report) -> list[dict]:
    """Measure the selected steps of one depth that need measuring; returns the new records."""
    depth_steps, paths = steps(export_dtype, args.quick), folders(args.cache, args.preset, layers)
    records = results["records"]

    def measured(step: Step) -> bool:
        old = records.get(record_key(args.preset, layers, step.name))
        return (not args.refresh and old is not None and old["status"] == "ok"
                and old.get("options") == step_options(step, args, export_dtype))

    wanted = {s.name for s in depth_steps if s.name in args.commands and not measured(s)}
    if not wanted:
        return []
    todo, new = plan(depth_steps, wanted, paths), []
    blocked: set[str] = set()  # folders that will not exist: their producer failed or was skipped
    if not args.json:
        print(f"L{layers}: {', '.join(s.name for s in todo)} (MemAvailable {mem_available_gb():.1f} GiB)", flush=True)
    try:
        for i, step in enumerate(todo):
            if step.needs in blocked:
                blocked.update([step.makes] if step.makes else [])
                continue
            record = {**measure_step(step, args, layers, paths), "options": step_options(step, args, export_dtype)}
            records[record_key(args.preset, layers, step.name)] = record
            new.append(record)
            save_json(results_path, results)
            report(results, plot=False)
            if not args.json:
                print(progress_line(record), flush=True)
            if record["status"] != "ok":
                blocked.update([step.makes] if step.makes else [])
            release(step.needs, todo[i + 1:], paths, args.keep)
            release(step.makes, todo[i + 1:], paths, args.keep)
    finally:
        if not args.keep:
            for role in ("hf", "onnx", "rtn", "awq", "nbits"):
                shutil.rmtree(paths[role], ignore_errors=True)
            shutil.rmtree(paths["onnx"].parent, ignore_errors=True)
    return new


def run_meta(args: argparse.Namespace, export_dtype: str | None) -> dict:
    """The machine and versions the records of this run were measured with."""
    def version(package: str) -> str:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return "absent"

    flags = []
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                break
    return {"date": datetime.date.today().isoformat(), "commit": git_commit(REPO), "machine": machine(),
            "cpu_flags": flags, "onnxruntime": version("onnxruntime"), "torch": version("torch"),
            "transformers": version("transformers"), "export_dtype": export_dtype, "preset": args.preset}


def main(argv: list[str] | None = None) -> dict:
    from bench.scale_report import write_report

    args = parse_args(argv)
    args.cache, args.results, args.work = args.cache.resolve(), args.results.resolve(), args.work.resolve()
    suffix = "-quick" if args.quick else ""
    results_path = args.results / f"scale{suffix}.json"
    results = load_results(results_path)
    export_dtype = export_dtype_flag(args.mxonnx)
    if export_dtype is None and "export" in args.commands and not args.json:
        print("mxonnx export has no --dtype yet: exporting float32 (recorded as export_dtype null)", flush=True)
    results["meta"] = run_meta(args, export_dtype)

    def report(data: dict, plot: bool = True) -> None:
        write_report(data, args.preset, args.results, suffix, STEP_NAMES, plot)

    new = []
    for layers in args.layers:
        new += run_depth(layers, args, results, results_path, export_dtype, report)
    save_json(results_path, results)
    report(results, plot=bool(new) or not (args.results / f"scale_rss{suffix}.png").is_file())
    summary = {"results": str(results_path), "measured": new, "export_dtype": export_dtype}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"wrote {results_path}, {args.results}/scale{suffix}.md, scale_rss{suffix}.png")
    return summary


if __name__ == "__main__":
    main()
