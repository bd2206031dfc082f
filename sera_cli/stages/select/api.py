"""Keeping the pairs with the largest margins: the top fraction or count by IRM (SeRA paper, section 3.2).

Ranking is deterministic: the score column descending, ties broken by `id` ascending. Kept rows keep their
input order (selection is a filter; `mix` and `train` shuffle).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sera_cli.data.errors import ConfigError, InputError
from sera_cli.data.numbers import config_problems
from sera_cli.data.tables import Inputs
from sera_cli.stages.select.candidate_pairs import PairStats, build_pairs
from trainers.config import Settings

EPS = 1e-9


@dataclass(frozen=True, kw_only=True)
class SelectConfig(Settings):
    """The settings of one `sera select`: the top fraction or count by a score column, or max-IRM pairs."""

    inputs: tuple[str, ...]
    output: str
    top: float | None = None
    count: int | None = None
    min_irm: float | None = None
    by: str = "irm"
    drop_ties: bool = False
    pairs: bool = False

    def check(self) -> None:
        """Every problem with the settings at once, as one ConfigError."""
        problems = config_problems(self)
        if self.top is not None and not 0.0 < self.top <= 1.0:
            problems.append(f"--top must be a fraction in (0, 1], got {self.top}")
        if self.count is not None and self.count < 0:
            problems.append(f"--count must be >= 0, got {self.count}")
        if self.top is not None and self.count is not None:
            problems.append("give --top or --count, not both")
        if not self.pairs and self.top is None and self.count is None and self.min_irm is None \
                and not self.drop_ties:
            problems.append("nothing to select by: give --top, --count, --min-irm or --drop-ties")
        if problems:
            raise ConfigError("; ".join(problems))



@dataclass(frozen=True)
class Choice:
    """Which rows a selection keeps (`indices`, in input order) and why the others went."""

    indices: np.ndarray
    cutoff: float | None
    beyond_top: int
    ties_dropped: int
    below_min: int


def fraction_count(fraction: float, n: int) -> int:
    """How many of `n` rows a fraction keeps: floor(fraction * n), robust to 0.7 * 10 = 6.999..."""
    return max(0, math.floor(fraction * n + EPS))


def top_mask(scores: np.ndarray, ids: pa.Array | pa.ChunkedArray, k: int) -> np.ndarray:
    """Boolean mask of the `k` best rows: `scores` descending, ties at the cut broken by `ids` ascending.

    O(n): the k-th largest score comes from a partition; only the rows tied with it are sorted (by id).
    """
    n = len(scores)
    mask = np.zeros(n, bool)
    if k <= 0:
        return mask
    if k >= n:
        mask[:] = True
        return mask
    cut = np.partition(scores, n - k)[n - k]
    mask = scores > cut
    tied = np.flatnonzero(scores == cut)
    need = k - int(mask.sum())
    order = pc.sort_indices(ids.take(pa.array(tied))).to_numpy() if len(tied) > need else np.arange(need)
    mask[tied[order[:need]]] = True
    return mask


def choose(scores: np.ndarray, ids, *, top: float | None = None, count: int | None = None,
           min_value: float | None = None, drop_ties: bool = False) -> Choice:
    """Keep the best `top` fraction (or `count`) of all rows, then drop ties (score exactly 0) and rows below
    `min_value` from those. Kept rows stay in input order."""
    n = len(scores)
    k = n if top is None and count is None else fraction_count(top, n) if top is not None else min(count, n)
    head = top_mask(scores, ids, k)
    ties = head & (scores == 0) if drop_ties else np.zeros(n, bool)
    below = head & ~ties & (scores < min_value) if min_value is not None else np.zeros(n, bool)
    kept = np.flatnonzero(head & ~ties & ~below)
    cutoff = float(scores[kept].min()) if len(kept) else None
    return Choice(kept, cutoff, n - k, int(ties.sum()), int(below.sum()))


@dataclass(frozen=True)
class SelectSummary:
    rows_in: int
    rows_out: int
    choice: Choice
    pairs: PairStats | None
    warning: str | None = None  # the cut lies under the scores' noise floor (`precision.select_warning`)


def select(config: SelectConfig) -> SelectSummary:
    """Read scored pairs (or, with `pairs`, scored candidates), keep the best rows, write them with provenance."""
    from sera_cli.data import lineage, provenance
    from sera_cli.data.contract import (
        PAIR_COLUMNS,
        check_candidates,
        check_ids,
        is_candidates,
        require_columns,
        with_ids,
    )
    from sera_cli.data.tables import check_writable, inputs_of, read_inputs, write_parquet

    config.check()
    check_writable(config.output, inputs_of(config))
    inputs = read_inputs(list(config.inputs))
    table, stats = inputs.table, None
    if config.pairs:
        check_candidates(inputs)
        score_column(inputs, table, "reward")
        table, stats = build_pairs(inputs)
    elif is_candidates(table):
        raise InputError(inputs.sources[0].name, "holds candidates (one response per row), not pairs",
                         hint="add --pairs to build the max-IRM pair of each prompt")
    else:
        check_ids(inputs)
        if "id" not in table.column_names:  # ids are made from the pair's texts
            require_columns(inputs, PAIR_COLUMNS, "preference pairs without an 'id' column")
    table = with_ids(table)
    scores = score_column(inputs, table, config.by, locate=not config.pairs)
    choice = choose(scores, table.column("id"), top=config.top, count=config.count,
                    min_value=config.min_irm, drop_ties=config.drop_ties)
    parents = lineage.parents(inputs)
    prov = provenance.record("select", config.as_dict(), parents=parents, rows_in=table.num_rows,
                             rows_out=len(choice.indices), cutoff=choice.cutoff,
                             pairs=asdict(stats) if stats else None, logps=lineage.common_logps(parents))
    keep = np.zeros(table.num_rows, bool)
    keep[choice.indices] = True
    write_parquet(provenance.attach(table.filter(pa.array(keep)), prov), config.output)
    warning = None
    if config.by == "irm" and choice.beyond_top + choice.below_min + choice.ties_dropped:  # rows were cut
        from sera_cli.stages.score.precision import select_warning

        warning = select_warning(choice.cutoff, parents)  # type: ignore[arg-type]
    return SelectSummary(table.num_rows, len(choice.indices), choice, stats, warning)


def score_column(inputs: Inputs, table: pa.Table, column: str, *, locate: bool = True) -> np.ndarray:
    """A numeric column as float64; a missing, non-numeric, null, NaN or infinite value is an error naming the row."""
    if column not in table.column_names:
        have = ", ".join(table.column_names)
        raise InputError(inputs.sources[0].name, f"has no column '{column}' to rank by (has: {have})",
                         hint="score it first with 'sera score'")
    col = table.column(column)
    if not (pa.types.is_floating(col.type) or pa.types.is_integer(col.type)):
        raise InputError(inputs.sources[0].name, f"has type {col.type}; expected numbers", column=column)
    values = pc.cast(col, pa.float64())
    bad = pc.invert(pc.fill_null(pc.is_finite(values), False))
    if pc.any(bad).as_py():
        row = int(pc.index(bad, True).as_py())
        file, local = inputs.locate(row) if locate else (inputs.name, row)
        value = values[row].as_py()
        problem = "is null or NaN" if value is None or value != value else f"is {value}, not a finite number"
        raise InputError(file, problem, row=local,
                         column=column, hint="drop the row or rescore it")
    return values.to_numpy()
