"""Mixing the training set of one SeRA iteration: the top k1*N offline pairs and the top k2*N generated pairs
by IRM, without duplicate (prompt, chosen, rejected) triples, shuffled (SeRA paper, section 3.3).

N is the size of the original offline set; k1 + k2 may exceed 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from sera_cli.data.errors import ConfigError, InputError, first_line
from sera_cli.data.numbers import config_problems
from sera_cli.stages.select.api import fraction_count, top_mask
from trainers.config import Settings

KEY = ("prompt", "chosen", "rejected")


@dataclass(frozen=True, kw_only=True)
class MixConfig(Settings):
    """The settings of one `sera mix`: the top k1*N offline and k2*N generated pairs of one iteration."""

    offline: str
    generated: str | None
    output: str
    k1: float = 0.7
    k2: float = 0.3
    n: int | None = None
    seed: int = 0
    iteration: int = 1
    allow_shortfall: bool = False

    def check(self) -> None:
        """Every problem with the settings at once, as one ConfigError."""
        problems = config_problems(self)
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



@dataclass(frozen=True)
class MixPlan:
    """Rows kept from each source (in input order) and what was dropped or missing."""

    offline: np.ndarray
    generated: np.ndarray
    duplicates: int
    short_offline: int
    short_generated: int


def key_hash(keys) -> np.ndarray:
    """A 64-bit hash of each row's (prompt, chosen, rejected): equal triples hash equal; rows that share a
    hash are compared in full before anything is dropped."""
    import polars as pl

    parts = [pl.col(c).hash(seed=i + 1) for i, c in enumerate(KEY)]
    return keys.select((parts[0] ^ parts[1] ^ parts[2]).alias("h"))["h"].to_numpy()


def best_copies(keys, h: np.ndarray, scores: np.ndarray, ids) -> np.ndarray:
    """Mask of the rows to keep: each row whose triple occurs once, and the best-ranked copy (score
    descending, then id) of each repeated triple."""
    import polars as pl

    keep = ~pl.Series(h).is_duplicated().to_numpy()
    if keep.all():
        return keep
    rows = np.flatnonzero(~keep)
    small = keys[pl.Series(rows)].with_columns(_row=pl.Series(rows), _s=pl.Series(scores[rows]),
                                                _id=pl.from_arrow(ids.take(pa.array(rows))))
    best = small.sort(["_s", "_id"], descending=[True, False]).unique(subset=list(KEY), keep="first")
    keep[best["_row"].to_numpy()] = True
    return keep


def repeats(keys, h: np.ndarray, candidates: np.ndarray, other_keys, other_h: np.ndarray,
            other_kept: np.ndarray) -> np.ndarray:
    """Mask of the `candidates` rows whose triple equals one of the `other_kept` rows of the other table."""
    import polars as pl

    def isin(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return pl.Series(a).is_in(pl.Series(b).implode()).to_numpy()

    hit = candidates & isin(h, other_h[other_kept])
    if not hit.any():
        return hit
    rows = np.flatnonzero(hit)
    others = np.flatnonzero(other_kept & isin(other_h, h[rows]))
    mine = keys[pl.Series(rows)].with_columns(_row=pl.Series(rows))
    same = mine.join(other_keys[pl.Series(others)].unique(), on=list(KEY), how="semi")
    out = np.zeros(len(h), bool)
    out[same["_row"].to_numpy()] = True
    return out


def top_among(scores: np.ndarray, ids, allowed: np.ndarray, k: int) -> np.ndarray:
    """Mask of the `k` best rows among the `allowed` ones."""
    if allowed.all():
        return top_mask(scores, ids, k)
    idx = np.flatnonzero(allowed)
    mask = np.zeros(len(scores), bool)
    mask[idx[top_mask(scores[idx], ids.take(pa.array(idx)), k)]] = True
    return mask


def plan(off_keys, off_scores: np.ndarray, off_ids, want_off: int,
         gen_keys=None, gen_scores: np.ndarray | None = None, gen_ids=None, want_gen: int = 0) -> MixPlan:
    """Choose the rows of a mix. `*_keys` are polars frames with the KEY columns (see `key_frame`). Repeated
    triples keep their best copy; a generated pair equal to a kept offline pair is dropped before the
    generated rows are ranked."""
    h_off = key_hash(off_keys)
    off_ok = best_copies(off_keys, h_off, off_scores, off_ids)
    off_sel = top_among(off_scores, off_ids, off_ok, want_off)
    duplicates, short_off = len(off_ok) - int(off_ok.sum()), max(0, want_off - int(off_ok.sum()))
    gen_rows, short_gen = np.zeros(0, np.int64), 0
    if gen_keys is not None:
        h_gen = key_hash(gen_keys)
        gen_ok = best_copies(gen_keys, h_gen, gen_scores, gen_ids)
        gen_ok &= ~repeats(gen_keys, h_gen, gen_ok, off_keys, h_off, off_sel)
        duplicates += len(gen_ok) - int(gen_ok.sum())
        gen_rows = np.flatnonzero(top_among(gen_scores, gen_ids, gen_ok, want_gen))
        short_gen = max(0, want_gen - int(gen_ok.sum()))
    return MixPlan(np.flatnonzero(off_sel), gen_rows, duplicates, short_off, short_gen)


@dataclass(frozen=True)
class MixSummary:
    n: int
    want_offline: int
    want_generated: int
    plan: MixPlan
    rows: int
    same_scorer: bool


def _load(spec: str):
    """A scored pairs file: its Inputs, its text kind, its IRMs and ids. Files sera wrote had their texts
    checked when they were scored, so only their column types are checked again."""
    from sera_cli.data import provenance
    from sera_cli.data.contract import PAIR_COLUMNS, check_pairs, column_kind, with_ids
    from sera_cli.data.tables import Inputs, read_inputs
    from sera_cli.stages.select.api import score_column

    inputs = read_inputs([spec])
    names = inputs.table.column_names
    if provenance.read(inputs.table) is None or not set(PAIR_COLUMNS) <= set(names):
        kind = check_pairs(inputs)
    else:
        kinds = {c: column_kind(inputs, c) for c in PAIR_COLUMNS}
        kind = check_pairs(inputs) if len(set(kinds.values())) > 1 else kinds["prompt"]
    inputs = Inputs(with_ids(inputs.table), inputs.sources)
    return inputs, kind, score_column(inputs, inputs.table, "irm")


def key_frame(table: pa.Table):
    """The (prompt, chosen, rejected) columns as a polars frame, messages reduced to {role, content}."""
    import polars as pl

    frame = pl.from_arrow(table.select(list(KEY)))
    field = pl.element().struct.field
    return frame.with_columns(pl.col(c).list.eval(pl.struct(role=field("role"), content=field("content")))
                              for c in KEY if frame.schema[c] != pl.String)


def assemble(tables: list[pa.Table], rows: list[np.ndarray], sources: list[str], seed: int) -> pa.Table:
    """The chosen rows of each table, shuffled with `seed` in one gather, with a `source` column."""
    tables = [t.drop_columns([c for c in ("source", "iteration") if c in t.column_names]) for t in tables]
    starts = np.cumsum([0] + [t.num_rows for t in tables])
    chosen = np.concatenate([r + start for r, start in zip(rows, starts, strict=False)])
    chosen = chosen[np.random.default_rng(seed).permutation(len(chosen))]
    # One gather from the chunked concatenation: combining the chunks first would touch twice the memory.
    table = pa.concat_tables(tables, promote_options="permissive").take(chosen)
    origin = np.searchsorted(starts, chosen, side="right") - 1
    names = pa.array(sources, pa.string())
    return table.append_column("source", names.take(pa.array(origin)))


def mix(config: MixConfig) -> MixSummary:
    """Read the offline and generated pairs, choose, shuffle, write with provenance."""
    from sera_cli.data import lineage, provenance
    from sera_cli.data.tables import check_writable, inputs_of, write_parquet

    config.check()
    check_writable(config.output, inputs_of(config))
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
        gen_args = (key_frame(gen.table), gen_scores, gen.table.column("id"), want_gen)
    chosen = plan(key_frame(off.table), off_scores, off.table.column("id"), want_off, *gen_args)
    _check_shortfall(config, chosen, off, gen, want_off, want_gen)
    tables, rows = [off.table], [chosen.offline]
    if gen is not None:
        tables.append(gen.table)
        rows.append(chosen.generated)
    try:
        table = assemble(tables, rows, ["offline", "generated"][:len(tables)], config.seed)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as err:
        raise InputError(gen.name, f"has columns whose types clash with {off.name}: {first_line(err)}",
                         hint="drop or cast the clashing column with 'sera sql'") from None
    table = table.append_column("iteration", pa.repeat(pa.scalar(config.iteration, pa.int32()), table.num_rows))
    all_parents = off_parents + (gen_parents or [])
    same = gen is None or lineage.common_logps(off_parents) == lineage.common_logps(gen_parents)
    prov = provenance.record(
        "mix", config.as_dict(), parents=all_parents, source_rows=n,
        rows={"offline": len(chosen.offline), "generated": len(chosen.generated)},
        duplicates=chosen.duplicates, shortfall={"offline": chosen.short_offline, "generated": chosen.short_generated},
        logps=lineage.common_logps(all_parents))
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
