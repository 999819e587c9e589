r"""Small presentation helpers shared by the stages: markdown tables and inline PNG plots.

    >>> from llm_assets.lib.common.report import lines_png, markdown_table, png_markdown
    >>> print(markdown_table(["model", "val_perplexity"], [["base", 41.23456], ["lora", 38.9]]))
    | model | val_perplexity |
    |---|---|
    | base | 41.23 |
    | lora | 38.9 |
    >>> png = lines_png({"train": ([0, 1, 2], [3.0, 2.5, 2.2])}, "loss", "step", "nats/token")
    >>> png[:4], png_markdown(png, "loss")[:30]
    (b'\x89PNG', '![loss](data:image/png;base64,')

Dagster has no image metadata type; a PNG embedded as a data URI in markdown renders in the UI
(see FIELD_NOTES), so plots travel as markdown strings.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence


def pyplot():
    """matplotlib.pyplot on the headless Agg backend (no display on servers, CI or Dagster run
    workers), imported on first use: ~0.6 s that every process loading the definitions paid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(value: object) -> str:
        if isinstance(value, float):
            value = f"{value:.4g}"
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(map(cell, headers)) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in rows]
    return "\n".join(lines)


def figure_markdown(fig, alt: str) -> str:
    """Render a matplotlib figure to an inline PNG markdown image and close it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    pyplot().close(fig)
    return png_markdown(buf.getvalue(), alt)


def png_markdown(png: bytes, alt: str) -> str:
    """A PNG as an inline markdown image (a data URI)."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})"


def histogram_markdown(values: Sequence[float], title: str, xlabel: str, bins: int = 20) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.hist(values, bins=bins, color="#4f6bed")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    return figure_markdown(fig, title)


def loss_curve_png(history: list[dict], baseline_loss: float, path) -> None:
    """Train and validation loss vs tokens seen (rows of metrics.jsonl), with a baseline line."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), layout="tight")
    for key, style, label in (("train_loss", "-", "train"), ("val_loss", "o-", "validation")):
        rows = [r for r in history if key in r]
        ax.plot([r["tokens_seen"] for r in rows], [r[key] for r in rows], style, label=label)
    ax.axhline(baseline_loss, ls="--", c="gray", label="unigram baseline (validation)")
    ax.set(xlabel="tokens seen", ylabel="loss (nats/token)", title="pretraining loss")
    ax.legend()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def lines_png(series: dict[str, tuple[Sequence[float], Sequence[float]]], title: str, xlabel: str,
              ylabel: str, hlines: dict[str, float] | None = None) -> bytes:
    """A line plot as PNG bytes: {label: (xs, ys)} plus labelled horizontal reference lines."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), layout="tight")
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, "o-" if len(xs) <= 20 else "-", label=label)
    for k, (label, y) in enumerate((hlines or {}).items()):
        ax.axhline(y, ls="--", c=f"C{len(series) + k}", label=label)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
