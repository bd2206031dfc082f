"""What `sera report` knows of one run: its iterations and their figures (the data both the table and the plots read)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class Iteration:
    t: int
    train_rows: int | None = None
    selected: int | None = None
    candidates: int | None = None
    generated: int | None = None
    irm_mean: float | None = None
    irm_std: float | None = None
    irm_positive: float | None = None
    flip_auroc: float | None = None
    flips_kept: float | None = None
    train_loss: float | None = None
    train_accuracy: float | None = None
    heldout_accuracy: float | None = None
    heldout_accuracy_true: float | None = None
    heldout_flip_auroc: float | None = None
    length_corr: float | None = None
    eval_win_rate: float | None = None  # with `sera run --eval`: pi_t against pi_0 (iter-t/eval/summary.parquet)
    eval_lc_win_rate: float | None = None
    eval_grade: float | None = None
    seconds: float | None = None
    ensemble_seconds: float | None = None  # t >= 3: rewarding the candidates with (pi_{t-2}, pi_{t-3}) (Eq. 7)
    ensemble_memory: float | None = None  # the process's peak memory (MiB) after that stage
    losses: list[float] = field(default_factory=list)


@dataclass
class RunReport:
    name: str
    workdir: Path
    config: dict[str, Any]
    iterations: list[Iteration]
    irm: dict[str, np.ndarray] = field(default_factory=dict)  # last scored IRM: "clean"/"flipped" or "all"
