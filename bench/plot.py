"""``ppl_vs_bits.png``: perplexity against the format's bits per weight, one marker style per tool, FP32 as a
dashed horizontal line (its 32 bits would squeeze every quantized point against the left edge)."""

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
        for r in points:
            ax.annotate(f"{r['config'].split(' ', 1)[-1]} {r['method']}", (r["format_bits"], r["perplexity"]),
                        fontsize=6, xytext=(3, 2), textcoords="offset points")
    for r in ok:
        if r["tool"] == "fp32":
            ax.axhline(r["perplexity"], linestyle="--", color="grey", label=f"FP32 ({r['perplexity']:.3f})")
    ax.set_xlabel("bits per weight of the format (linear layers)")
    ax.set_ylabel("WikiText-2 perplexity")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
