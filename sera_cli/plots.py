"""The picture of a scored file: the score histogram and the score against response length (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

MAX_POINTS = 20_000


def plot_report(table: pa.Table, report: dict[str, Any], path: str) -> None:
    """Write a PNG: left, the histogram of IRM (clean and flipped apart when known); right, IRM against the
    response-length difference (reward against length for candidates)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sera_cli.diagnostics import floats, response_lengths
    from sera_cli.io import atomic_path

    score = report["score"]
    y = floats(table, score)
    pairs = report["kind"] == "pairs"
    if pairs:
        (lc, lr), unit = response_lengths(table, ("chosen", "rejected"))
        x, xlabel = lc - lr, f"len(chosen) - len(rejected) [{unit}]"
        rho = report["spearman"]["irm_vs_length_diff"]
    else:
        (x,), unit = response_lengths(table, ("response",))
        xlabel, rho = f"response length [{unit}]", report["spearman"]["reward_vs_length"]
    flipped = floats(table, "flipped") > 0 if pairs and "flipped" in table.column_names else None

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    edges = np.asarray(report["histogram"]["edges"])
    if flipped is not None:
        left.hist([y[~flipped], y[flipped]], bins=edges, stacked=True, label=["clean", "flipped"],
                  color=["tab:blue", "tab:red"])
        left.legend()
    else:
        left.hist(y, bins=edges, color="tab:blue")
    left.axvline(0.0, color="black", linewidth=0.8, linestyle="--")
    title = f"{score} (n = {report['rows']:,}"
    title += f", accuracy {report['reward_accuracy']:.1%})" if pairs else ")"
    left.set(title=title, xlabel=score, ylabel="rows")

    shown = np.arange(len(y))
    if len(y) > MAX_POINTS:
        shown = np.sort(np.random.default_rng(0).choice(len(y), MAX_POINTS, replace=False))
    colors = np.where(flipped[shown], "tab:red", "tab:blue") if flipped is not None else "tab:blue"
    right.scatter(x[shown], y[shown], s=5, alpha=0.35, c=colors, linewidths=0)
    right.axhline(0.0, color="black", linewidth=0.8, linestyle="--")
    title = f"{score} vs {'length difference' if pairs else 'length'}"
    right.set(title=title + (f" (Spearman {rho:.3f})" if rho is not None else ""), xlabel=xlabel, ylabel=score)
    fig.suptitle(Path(report["file"]).name)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
