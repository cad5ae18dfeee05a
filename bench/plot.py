"""``ppl_vs_bits.png``: perplexity (log scale: W4A4 rows sit near 100) against the format's bits per weight, one
marker style per tool, FP32 as a dashed horizontal line (its 32 bits would squeeze every quantized point against
the left edge). Only the best method of each tool and configuration is labelled; the table has every row."""

from __future__ import annotations

from pathlib import Path

MARKERS = {"mxonnx": "o", "ort-nbits": "s", "quark": "^", "inc": "D"}


def plot_ppl_vs_bits(results: list[dict], out: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r["status"] == "ok" and r["perplexity"] is not None]
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for tool, marker in MARKERS.items():
        points = [r for r in ok if r["tool"] == tool]
        if not points:
            continue
        ax.scatter([r["format_bits"] for r in points], [r["perplexity"] for r in points], marker=marker, label=tool,
                   alpha=0.8)
        best: dict[str, dict] = {}
        for r in points:
            if r["config"] not in best or r["perplexity"] < best[r["config"]]["perplexity"]:
                best[r["config"]] = r
        for r in best.values():
            ax.annotate(f"{r['config']} {r['method']}", (r["format_bits"], r["perplexity"]),
                        fontsize=6, xytext=(4, -2), textcoords="offset points")
    for r in ok:
        if r["tool"] == "fp32":
            ax.axhline(r["perplexity"], linestyle="--", color="grey", label=f"FP32 ({r['perplexity']:.3f})")
    ax.set_xlabel("bits per weight of the format (linear layers)")
    ax.set_yscale("log")
    ax.set_ylabel("WikiText-2 perplexity (log scale)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
