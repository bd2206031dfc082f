"""Win rates, their bootstrap interval, and a length-controlled win rate (pure functions of numpy arrays).

A question's point is 1 (win), 0.5 (tie) or 0 (loss); the win rate is their mean (ties count half, as in the
paper). The 95% interval resamples questions with replacement (percentile bootstrap, seeded).

Length control (after AlpacaEval 2's idea, simplified to one model against one baseline): judges prefer long
answers, so the point of question i is regressed on its length difference by a logistic model,
p_i = sigmoid(a + b * x_i) with x_i = tanh(d_i / sd(d)) and d_i = len(model answer) - len(baseline answer), fitted by
maximum (quasi-)likelihood with the fractional points as targets. The length-controlled win rate is the fitted
rate at equal length, sigmoid(a). It is labelled as such wherever it is shown: it is a model-based estimate, not
a count.
"""

from __future__ import annotations

import numpy as np


def win_rate(points: np.ndarray) -> float | None:
    """Mean point (wins + ties / 2) / n; None with no questions."""
    points = np.asarray(points, float)
    return float(points.mean()) if points.size else None


def bootstrap_ci(points: np.ndarray, resamples: int = 1000, seed: int = 0, level: float = 0.95
                 ) -> tuple[float | None, float | None]:
    """Percentile bootstrap interval of the mean point: questions resampled with replacement `resamples` times."""
    points = np.asarray(points, float)
    if not points.size or resamples < 1:
        return None, None
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, points.size, size=(resamples, points.size))
    means = points[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def length_feature(len_model: np.ndarray, len_baseline: np.ndarray) -> np.ndarray:
    """x = tanh(d / sd(d)), d the length difference (0 everywhere when the differences do not vary)."""
    d = np.asarray(len_model, float) - np.asarray(len_baseline, float)
    sd = d.std()
    return np.tanh(d / sd) if sd > 0 else np.zeros_like(d)


def fit_logistic(x: np.ndarray, y: np.ndarray, penalty: float = 0.0, steps: int = 100) -> tuple[float, float]:
    """(a, b) maximising sum y log p + (1 - y) log(1 - p) - penalty / 2 * b^2, p = sigmoid(a + b x), by Newton."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    theta = np.zeros(2)
    design = np.stack([np.ones_like(x), x], axis=1)
    for _ in range(steps):
        p = 1 / (1 + np.exp(-(design @ theta)))
        grad = design.T @ (y - p) - np.array([0.0, penalty * theta[1]])
        hess = (design * (p * (1 - p))[:, None]).T @ design + np.diag([1e-12, penalty + 1e-12])
        step = np.linalg.solve(hess, grad)
        theta += step
        if np.abs(step).max() < 1e-10:
            break
    return float(theta[0]), float(theta[1])


def length_controlled_win_rate(points: np.ndarray, len_model: np.ndarray, len_baseline: np.ndarray,
                               penalty: float = 0.01) -> float | None:
    """The fitted win rate at equal answer length, sigmoid(a) (see the module's docstring); None with no
    questions, the plain rate when every point is the same (nothing to regress)."""
    y = np.asarray(points, float)
    if not y.size:
        return None
    if np.all(y == y[0]):
        return float(y[0])
    a, _ = fit_logistic(length_feature(len_model, len_baseline), y, penalty)
    return float(1 / (1 + np.exp(-a)))
