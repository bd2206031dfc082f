"""Mixing the training set of one SeRA iteration: the top k1*N offline pairs and the top k2*N generated pairs
by IRM, without duplicate (prompt, chosen, rejected) triples, shuffled (SeRA paper, section 3.3).

N is the size of the original offline set; k1 + k2 may exceed 1.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa

from sera_cli.errors import ConfigError, InputError
from sera_cli.selection import fraction_count, rank

KEY = ("prompt", "chosen", "rejected")


@dataclass(frozen=True)
class MixConfig:
    offline: str
    generated: str | None
    output: str
    k1: float = 0.7
    k2: float = 0.3
    n: int | None = None
    seed: int = 0
    iteration: int = 1
    allow_shortfall: bool = False

    def validate(self) -> None:
        problems = []
        if self.k1 < 0 or self.k2 < 0:
            problems.append(f"--k1 and --k2 must be >= 0, got {self.k1} and {self.k2}")
        if self.k1 + self.k2 <= 0:
            problems.append("--k1 + --k2 must be > 0")
        if self.generated is None and self.k2 > 0:
            problems.append(f"--k2 {self.k2} asks for generated pairs: give --generated or set --k2 0")
        if self.n is not None and self.n < 1:
            problems.append(f"--n must be >= 1, got {self.n}")
        if problems:
            raise ConfigError("; ".join(problems))

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class MixPlan:
    """Rows kept from each source (best first) and what was dropped or missing."""

    offline: np.ndarray
    generated: np.ndarray
    duplicates: int
    short_offline: int
    short_generated: int


def _distinct_ranked(keys, scores: np.ndarray, ids):
    """Rows in rank order, keeping the best-ranked copy of each (prompt, chosen, rejected)."""
    import polars as pl

    frame = keys.with_row_index("_row")
    order = pl.Series(rank(scores, ids))
    return frame[order].unique(subset=list(KEY), keep="first", maintain_order=True)


def plan(off_keys, off_scores: np.ndarray, off_ids, want_off: int,
         gen_keys=None, gen_scores: np.ndarray | None = None, gen_ids=None, want_gen: int = 0) -> MixPlan:
    """Choose the rows of a mix. `*_keys` are polars frames with the KEY columns; a generated pair that
    duplicates a kept offline pair is dropped before the generated rows are ranked."""
    off = _distinct_ranked(off_keys, off_scores, off_ids)
    duplicates = off_keys.height - off.height
    off_kept = off.head(want_off)
    gen_rows, short_gen = np.zeros(0, np.int64), 0
    if gen_keys is not None:
        gen = _distinct_ranked(gen_keys, gen_scores, gen_ids)
        fresh = gen.join(off_kept.select(KEY), on=list(KEY), how="anti", maintain_order="left")
        duplicates += gen_keys.height - fresh.height
        gen_rows = fresh.head(want_gen)["_row"].to_numpy().astype(np.int64)
        short_gen = max(0, want_gen - fresh.height)
    return MixPlan(off_kept["_row"].to_numpy().astype(np.int64), gen_rows, duplicates,
                   max(0, want_off - off.height), short_gen)


@dataclass(frozen=True)
class MixSummary:
    n: int
    want_offline: int
    want_generated: int
    plan: MixPlan
    rows: int
    same_scorer: bool


def _load(spec: str):
    """A scored pairs file: its Inputs, its text kind, its IRMs and ids."""
    from sera_cli.contract import check_pairs, with_ids
    from sera_cli.io import Inputs, read_inputs
    from sera_cli.selection import score_column

    inputs = read_inputs([spec])
    kind = check_pairs(inputs)
    inputs = Inputs(with_ids(inputs.table), inputs.sources)
    return inputs, kind, score_column(inputs, inputs.table, "irm")


def _keys(table: pa.Table):
    import polars as pl

    return pl.from_arrow(table.select(list(KEY)))


def _part(table: pa.Table, rows: np.ndarray, source: str) -> pa.Table:
    part = table.take(rows)
    part = part.drop_columns([c for c in ("source", "iteration") if c in part.column_names])
    return part.append_column("source", pa.array([source] * len(rows), pa.string()))


def mix(config: MixConfig) -> MixSummary:
    """Read the offline and generated pairs, choose, shuffle, write with provenance."""
    from sera_cli import lineage, provenance
    from sera_cli.io import check_writable, write_parquet

    config.validate()
    check_writable(config.output)
    off, off_kind, off_scores = _load(config.offline)
    off_parents = lineage.parents(off)
    n = config.n or lineage.find(off_parents, "source_rows")
    if n is None:
        raise ConfigError(f"{off.name}: its provenance does not record the size of the original offline set; "
                          "give --n")
    want_off, want_gen = fraction_count(config.k1, n), fraction_count(config.k2, n)
    gen = gen_parents = None
    gen_args: tuple = ()
    if config.generated is not None:
        gen, gen_kind, gen_scores = _load(config.generated)
        if gen_kind != off_kind:
            raise InputError(gen.name, f"holds {gen_kind} pairs but {off.name} holds {off_kind} pairs",
                             hint="convert both with the same --format")
        gen_parents = lineage.parents(gen)
        gen_args = (_keys(gen.table), gen_scores, gen.table.column("id"), want_gen)
    chosen = plan(_keys(off.table), off_scores, off.table.column("id"), want_off, *gen_args)
    _check_shortfall(config, chosen, off, gen, want_off, want_gen)
    parts = [_part(off.table, chosen.offline, "offline")]
    if gen is not None:
        parts.append(_part(gen.table, chosen.generated, "generated"))
    table = pa.concat_tables(parts, promote_options="permissive")
    table = table.append_column("iteration", pa.array([config.iteration] * table.num_rows, pa.int32()))
    table = table.take(np.random.default_rng(config.seed).permutation(table.num_rows))
    off_logps = lineage.find(off_parents, "logps")
    same = gen is None or off_logps == lineage.find(gen_parents, "logps")
    prov = provenance.record(
        "mix", config.as_dict(), parents=off_parents + (gen_parents or []), source_rows=n,
        rows={"offline": len(chosen.offline), "generated": len(chosen.generated)},
        duplicates=chosen.duplicates, shortfall={"offline": chosen.short_offline, "generated": chosen.short_generated},
        logps=off_logps if same else None)
    write_parquet(provenance.attach(table.replace_schema_metadata(None), prov), config.output)
    return MixSummary(n, want_off, want_gen, chosen, table.num_rows, same)


def _check_shortfall(config: MixConfig, chosen: MixPlan, off, gen, want_off: int, want_gen: int) -> None:
    if config.allow_shortfall:
        return
    for short, want, k, inputs in ((chosen.short_offline, want_off, "k1", off),
                                   (chosen.short_generated, want_gen, "k2", gen)):
        if short:
            have = want - short
            raise InputError(inputs.name, f"has {have} distinct pairs but {k} x N asks for {want}",
                             hint=f"lower --{k}, give a smaller --n, or add --allow-shortfall to take all {have}")
