"""The figures: `sera inspect --plot` (the score histogram, the score against response length) and `sera report`'s
report.png (held-out accuracy per iteration, loss per step, IRM of clean and flipped pairs). Matplotlib, Agg.

Colours are Okabe and Ito's colour-blind-safe set; clean pairs are always blue and flipped ones vermillion. The
builders return the figure, so tests can read its lines and legends; `save` writes it atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from sera_cli.stages.report.runs import RunReport

MAX_POINTS = 20_000
CLEAN, FLIPPED = "#0072B2", "#D55E00"  # Okabe-Ito blue and vermillion
SERIES = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000")
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
LINESTYLES = ("-", "--", "-.", ":")
SCORE_UNIT = {"irm": "irm = r(chosen) - r(rejected) [beta x nats]",  # r = beta log(pi / ref), a log-ratio in nats
              "reward": "reward r = beta log(pi/ref) [beta x nats]"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def point_style(n: int) -> dict[str, Any]:
    """Scatter size and opacity for `n` points: large, opaque and outlined up to 200, then smaller and more
    translucent as n grows (area and alpha ~ sqrt(200 / n)), so a crowd reads as density."""
    if n <= 200:
        return {"s": 60.0, "alpha": 0.9, "edgecolors": "white", "linewidths": 0.6}
    f = float(np.sqrt(200 / n))
    return {"s": max(3.0, 40.0 * f), "alpha": max(0.15, 0.9 * f), "linewidths": 0}


def save(fig: Figure, path: str | Path) -> None:
    from sera_cli.data.tables import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    _pyplot().close(fig)


def plot_report(table: pa.Table, report: dict[str, Any], path: str) -> None:
    """Write `sera inspect --plot`'s PNG."""
    save(inspect_figure(table, report), path)


def inspect_figure(table: pa.Table, report: dict[str, Any]) -> Figure:
    """Left, the histogram of IRM (clean and flipped stacked when a `flipped` column is there); right, IRM against
    the response-length difference (reward against length for candidates). Both mark 0 and the top-k1 cut."""
    from matplotlib.ticker import MaxNLocator

    from sera_cli.stages.inspect.column_values import floats, response_lengths

    plt = _pyplot()
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
    groups = [("clean", ~flipped, CLEAN), ("flipped", flipped, FLIPPED)] if flipped is not None \
        else [("pairs" if pairs else "candidates", np.ones(len(y), bool), CLEAN)]
    top = report.get("top_k1") if pairs else None

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
    edges = np.asarray(report["histogram"]["edges"])
    left.hist([y[m] for _, m, _ in groups], bins=edges, stacked=True, color=[c for _, _, c in groups],
              label=[f"{name} ({int(m.sum()):,})" for name, m, _ in groups], edgecolor="white", linewidth=0.5)
    left.yaxis.set_major_locator(MaxNLocator(integer=True))
    title = f"{score} (n = {report['rows']:,}"
    title += f", accuracy {report['reward_accuracy']:.1%})" if pairs else ")"
    left.set(title=title, xlabel=SCORE_UNIT.get(score, score), ylabel=f"{'pairs' if pairs else 'candidates'} [count]")

    shown = np.arange(len(y))
    if len(y) > MAX_POINTS:
        shown = np.sort(np.random.default_rng(0).choice(len(y), MAX_POINTS, replace=False))
    style = point_style(len(shown))
    for name, mask, color in groups:
        keep = shown[mask[shown]]
        right.scatter(x[keep], y[keep], color=color, label=f"{name} ({len(keep):,})", zorder=3, **style)
    title = f"{score} vs {'length difference' if pairs else 'length'}"
    title += f" (Spearman {rho:.3f})" if rho is not None else ""
    title += f", {len(shown):,} of {len(y):,} shown" if len(shown) < len(y) else ""
    right.set(title=title, xlabel=xlabel, ylabel=SCORE_UNIT.get(score, score))

    for ax, mark in ((left, left.axvline), (right, right.axhline)):  # the score is x on the left, y on the right
        mark(0.0, color="0.35", linewidth=0.9, linestyle=":", label=f"{score} = 0", zorder=2)
        if top and top["irm_min"] is not None:
            mark(top["irm_min"], color="black", linewidth=1.3, linestyle="--", zorder=2,
                 label=f"top k1 = {top['k1']:g} cut ({score} >= {top['irm_min']:.3g}, {top['rows']:,} kept)")
        ax.legend(fontsize=8, loc="best", framealpha=0.85)
        ax.grid(alpha=0.25, linewidth=0.5)
    fig.suptitle(Path(report["file"]).name)
    fig.tight_layout()
    return fig


def report_figure(reports: list[RunReport]) -> Figure:
    """Held-out reward accuracy per iteration (with chance at 0.5), train loss per step, and the IRM of the last
    offline scoring, clean against flipped. A run keeps one colour in every panel; series also differ by marker
    and line style, so they read in grey too."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    fig, (acc, loss, hist) = plt.subplots(1, 3, figsize=(14, 4.2))
    k, ts = 0, sorted({i.t for r in reports for i in r.iterations})
    for r_i, r in enumerate(reports):
        color, dodge = SERIES[r_i % len(SERIES)], 0.08 * (r_i - (len(reports) - 1) / 2)  # equal values stay apart
        for attr, kind, style in (("heldout_accuracy", "given labels", "-"), ("heldout_accuracy_true", "true labels",
                                                                             "--")):
            points = [(i.t + dodge, getattr(i, attr)) for i in r.iterations if getattr(i, attr) is not None]
            if points:
                acc.plot(*zip(*points, strict=True), color=color, linestyle=style, marker=MARKERS[k % len(MARKERS)],
                         markersize=7, label=f"{r.name} ({kind})")
                k += 1
    acc.axhline(0.5, color="0.4", linestyle="--", linewidth=1.0, label="chance (0.5)", zorder=1)
    acc.set(title="held-out reward accuracy", xlabel="iteration", ylabel="share with r(chosen) > r(rejected)",
            ylim=(0, 1), xticks=ts, xlim=(ts[0] - 0.5, ts[-1] + 0.5) if ts else None)

    for r_i, r in enumerate(reports):
        start, color, style = 0, SERIES[r_i % len(SERIES)], LINESTYLES[r_i % len(LINESTYLES)]
        for i in r.iterations:
            if i.losses:
                if start:
                    loss.axvline(start - 0.5, color="0.8", linewidth=0.8, zorder=0)  # where an iteration starts
                steps = range(start, start + len(i.losses))
                loss.plot(steps, i.losses, color=color, linestyle=style, marker=MARKERS[(i.t - 1) % len(MARKERS)],
                          markersize=5, markevery=max(1, len(i.losses) // 8), label=f"{r.name} it{i.t}")
                start += len(i.losses)
    loss.set(title="train loss per step", xlabel="optimizer step (iterations in turn)", ylabel="loss")
    loss.xaxis.set_major_locator(MaxNLocator(integer=True))

    shown = next((r for r in reports if r.irm), None)
    if shown:
        values = np.concatenate(list(shown.irm.values()))
        bins = np.linspace(values.min(), values.max(), 30) if np.ptp(values) > 0 else 10
        colors = {"clean": CLEAN, "flipped": FLIPPED, "all": CLEAN}
        hist.hist([v for v in shown.irm.values()], bins=bins, stacked=True, edgecolor="white", linewidth=0.4,
                  color=[colors.get(label, CLEAN) for label in shown.irm],
                  label=[f"{label} ({len(v):,})" for label, v in shown.irm.items()])
        hist.axvline(0, color="0.35", linewidth=0.9, linestyle=":", label="irm = 0")
        hist.set(title=f"IRM of the offline data, last scoring ({shown.name})", xlabel=SCORE_UNIT["irm"],
                 ylabel="pairs [count]")
        hist.yaxis.set_major_locator(MaxNLocator(integer=True))
        hist.xaxis.set_major_locator(MaxNLocator(6))
    else:
        hist.set(title="IRM: no offline scoring in these runs")
        hist.axis("off")
    for ax in (acc, loss, hist):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best", framealpha=0.85)
            ax.grid(alpha=0.25, linewidth=0.5)
    fig.tight_layout()
    return fig
