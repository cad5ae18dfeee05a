"""``scale.md`` and ``scale_rss.png`` from the records of ``bench/scale.py``: every number in them is a field of a
record (a child's measured wall time, peak RSS, bytes on disk, or its own JSON output)."""

from __future__ import annotations

from pathlib import Path

# CPU features onnxruntime's CPU kernels dispatch on (MLAS: AVX2/FMA, AVX-512, VNNI int8 dot products, AMX)
RELEVANT_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
                  "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16")
SIZES = (("generate", "HF safetensors (float16)"), ("export", "ONNX export"), ("quantize-rtn", "RTN W MXINT4-128"),
         ("quantize-awq+gptq", "AWQ+GPTQ W MXINT4-128"), ("lower", "RTN lowered to MatMulNBits"))
GIB = 2**30


def depths_of(records: dict, preset: str) -> list[int]:
    return sorted({r["layers"] for r in records.values() if r["preset"] == preset})


def _record(records: dict, preset: str, layers: int, command: str) -> dict | None:
    return records.get(f"{preset}/L{layers}/{command}")


def time_cell(record: dict | None, model_bytes: int | None, notes: list[str]) -> str:
    """``wall s (CPU s) / peak GiB (peak / float16 weights)``; a failure gets a numbered note."""
    if record is None:
        return "—"
    if record["status"] != "ok":
        notes.append(f"L{record['layers']} `{record['command']}` failed after {record['seconds']:.0f} s "
                     f"(peak {record['peak_rss_mb'] * 2**20 / GIB:.2f} GiB): `{record['error']}`")
        return f"failed [{len(notes)}]"
    peak = record["peak_rss_mb"] * 2**20
    ratio = f" ({peak / model_bytes:.1f}x)" if model_bytes else ""
    return f"{record['seconds']:.0f} s ({record['cpu_seconds']:.0f}) / {peak / GIB:.2f} GiB{ratio}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
            + ["| " + " | ".join(row) + " |" for row in rows])


def table_lines(records: dict, preset: str, commands: list[str]) -> tuple[list[str], list[str]]:
    """The command x depth table, the sizes on disk and the eval row; and the failure notes."""
    depths, notes = depths_of(records, preset), []
    header = ["command"] + [f"L{n}" for n in depths]

    def weights(n: int) -> int | None:
        gen = _record(records, preset, n, "generate")
        return gen.get("output_bytes") if gen and gen["status"] == "ok" else None

    rows = []
    for command in commands:
        cells = [time_cell(_record(records, preset, n, command), weights(n), notes) for n in depths]
        rows.append([_label(records, preset, command)] + cells)
    sizes = []
    for command, label in SIZES:
        cells = []
        for n in depths:
            r = _record(records, preset, n, command)
            cells.append(f"{r['output_bytes'] / 1e9:.2f} GB" if r and "output_bytes" in r else "—")
        sizes.append([label] + cells)
    params = []
    for n in depths:
        r = _record(records, preset, n, "generate")
        p = (r.get("result") or {}).get("parameters") if r else None
        params.append(f"{p / 1e9:.3f} B" if p else "—")
    ppl = []
    for n in depths:
        r = _record(records, preset, n, "eval")
        res = (r.get("result") or {}) if r and r["status"] == "ok" else {}
        ppl.append(f"{res['perplexity']:.0f} ({res['windows']} x {res['seqlen']})" if "perplexity" in res else "—")
    lines = _table(header, rows) + [""] + _table(["on disk (weights files)"] + header[1:],
                                                 sizes + [["parameters"] + params])
    lines += ["", *_table(["eval of RTN (random weights: no meaning)"] + header[1:], [["perplexity"] + ppl])]
    return lines, notes


def _label(records: dict, preset: str, command: str) -> str:
    """The command's name, with the dtype the export wrote (the first record's)."""
    if command != "export":
        return command
    dtypes = {(r.get("options") or {}).get("export_dtype") for r in records.values()
              if r["preset"] == preset and r["command"] == "export"}
    return "export (" + ", ".join(sorted(d or "float32: no --dtype" for d in dtypes)) + ")" if dtypes else command


def render_markdown(data: dict, preset: str, commands: list[str]) -> str:
    """The whole ``scale.md``."""
    meta, records = data["meta"], data["records"]
    lines, notes = table_lines(records, preset, commands)
    present = [f for f in RELEVANT_FLAGS if f in meta.get("cpu_flags", [])]
    absent = [f for f in RELEVANT_FLAGS if f not in meta.get("cpu_flags", [])]
    commits = sorted({f"{r['commit']} (sources {r.get('code_sha256_12', '?')})" for r in records.values()
                      if r["preset"] == preset})
    mach = meta.get("machine", {})
    loads = [r["load_average_mean"] for r in records.values() if r["preset"] == preset and "load_average_mean" in r]
    out = [f"# Scaling: synthetic `{preset}` Llamas by depth", "",
           "Written by `bench/scale.py` (`make bench-scale`). Each cell: wall seconds (CPU seconds, user + system) / "
           "peak RSS of that command's own process (`ru_maxrss` through `os.wait4` in a small trampoline) and, in "
           "brackets, peak RSS over the float16 weights of the generated model. On a shared machine CPU seconds vary "
           "less than wall seconds. Random weights: time and memory are those of a real model of these shapes, "
           "perplexity is not.", "",
           *lines, ""]
    if notes:
        out += ["Failures:", ""] + [f"{i}. {note}" for i, note in enumerate(notes, 1)] + [""]
    out += [f"- date: {meta.get('date')}; commits measured: {', '.join(commits) or '—'}",
            f"- machine: {mach.get('cpu')}, {mach.get('nproc')} logical CPUs, {mach.get('memory_gb')} GiB RAM "
            f"(shared with other jobs: load average {min(loads, default=0):.1f} to {max(loads, default=0):.1f} "
            "during the commands)",
            f"- CPU flags: {' '.join(present) or 'none of the below'}; absent: {' '.join(absent) or 'none'}",
            f"- onnxruntime {meta.get('onnxruntime')}, torch {meta.get('torch')}, "
            f"transformers {meta.get('transformers')}",
            "- commands and logs: the `argv` and `log` of each record in the JSON file beside this one"]
    return "\n".join(out) + "\n"


def plot_rss(data: dict, preset: str, commands: list[str], out: Path) -> Path:
    """Peak RSS (GiB) against layers, one line per command, and the float16 weights on disk for scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = data["records"]
    fig, ax = plt.subplots(figsize=(9.5, 5))
    depths = depths_of(records, preset)
    for command in commands:
        points = [(n, r["peak_rss_mb"] * 2**20 / GIB) for n in depths
                  if (r := _record(records, preset, n, command)) and r["status"] == "ok"]
        if points:
            ax.plot(*zip(*points), marker="o", label=command)
    weights = [(n, r["output_bytes"] / GIB) for n in depths
               if (r := _record(records, preset, n, "generate")) and "output_bytes" in r]
    if weights:
        ax.plot(*zip(*weights), linestyle="--", color="black", label="float16 weights (HF files)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(depths or [1])
    ax.set_xticklabels([str(n) for n in depths] or ["1"])
    ax.set_xlabel("decoder layers")
    ax.set_ylabel("peak RSS (GiB)")
    ax.set_title(f"synthetic {preset}: peak RSS by command, {data['meta'].get('date')}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def write_report(data: dict, preset: str, results: Path, suffix: str, commands: list[str], plot: bool = True) -> None:
    """``scale{suffix}.md`` and (``plot``) ``scale_rss{suffix}.png`` in ``results``."""
    results.mkdir(parents=True, exist_ok=True)
    (results / f"scale{suffix}.md").write_text(render_markdown(data, preset, commands))
    if plot:
        plot_rss(data, preset, commands, results / f"scale_rss{suffix}.png")
