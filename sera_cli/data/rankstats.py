"""Rank statistics in numpy: average ranks, Spearman correlation, AUROC (Mann-Whitney), quantiles."""

from __future__ import annotations

import numpy as np

QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks; tied values share the mean of their ranks. [10, 20, 20, 5] -> [2, 3.5, 3.5, 1]."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    values, first, counts = np.unique(x[order], return_index=True, return_counts=True)
    mean_rank = first + (counts + 1) / 2.0  # ranks first+1 .. first+count, averaged
    ranks = np.empty(len(x))
    ranks[order] = np.repeat(mean_rank, counts)
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float | None:
    """Pearson correlation of average ranks; None when fewer than 2 rows or one side is constant."""
    if len(x) < 2:
        return None
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = np.sqrt((rx * rx).sum() * (ry * ry).sum())
    return float((rx * ry).sum() / denom) if denom > 0 else None


def auroc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """P(score of a random positive > score of a random negative), ties counting 1/2; None without both.

    Mann-Whitney: AUROC = (sum of positives' ranks - n1 (n1 + 1) / 2) / (n1 n0).
    """
    positive = np.asarray(positive, dtype=bool)
    n1, n0 = int(positive.sum()), int((~positive).sum())
    if n1 == 0 or n0 == 0:
        return None
    ranks = average_ranks(scores)
    return float((ranks[positive].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def quantiles(x: np.ndarray, qs: tuple[float, ...] = QUANTILES) -> dict[str, float]:
    """Named quantiles (linear interpolation): {"min", "q05", "q25", "median", "q75", "q95", "max"}."""
    names = {0.0: "min", 0.5: "median", 1.0: "max"}
    values = np.quantile(np.asarray(x, dtype=np.float64), qs)
    return {names.get(q, f"q{round(q * 100):02d}"): float(v) for q, v in zip(qs, values, strict=True)}
