"""Turning files in common preference layouts (see `convert_layouts`) into the pairs table (prompt, chosen,
rejected, id), with skipped rows counted by reason, and optional label flips for noisy-label experiments.

Scalar fields besides the texts are kept; fields of a nested object (such as UltraFeedback's
`metadata.score_chosen`) are lifted to the top level.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sera_cli.data.errors import ConfigError, InputError
from sera_cli.data.layouts import MESSAGES, NATURAL, READERS, TEXT, Skip, detect, extras, to_format
from trainers.config import Settings


def convert_records(file: str, records: list[dict[str, Any]], layout: str, fmt: str):
    """Rows of one file as columns: (columns, skipped rows by reason, layout, format)."""
    layout = detect(file, records[0]) if layout == "auto" else layout
    fmt = NATURAL[layout] if fmt == "auto" else fmt
    read = READERS[layout]
    texts: dict[str, list] = {c: [] for c in TEXT}
    kept: list[dict[str, Any]] = []
    skipped: dict[str, list[int]] = {}
    for i, rec in enumerate(records):
        try:
            row = to_format(read(rec, fmt), fmt)
        except Skip as why:
            skipped.setdefault(str(why), []).append(i)
            continue
        except KeyError as err:
            raise InputError(file, f"missing column {err}", row=i) from None
        except (TypeError, AttributeError):
            raise InputError(file, f"does not fit the {layout} layout", row=i, column="chosen",
                             hint="choose the layout with --layout") from None
        except ValueError as err:
            raise ConfigError(f"{file}, row {i}: {err}; use --format conversational") from None
        for c, value in zip(TEXT, row, strict=True):
            texts[c].append(value)
        kept.append(extras(rec))
    return _columns(texts, kept, fmt), skipped, layout, fmt


def _columns(texts: dict[str, list], kept: list[dict[str, Any]], fmt: str) -> dict[str, pa.Array]:
    typ = MESSAGES if fmt == "conversational" else pa.string()
    cols = {c: pa.array(v, typ) for c, v in texts.items()}
    names: dict[str, None] = {}
    for rec in kept:
        names.update(dict.fromkeys(rec))
    for name in names:
        if name in cols or name == "id":
            continue
        values = [rec.get(name) for rec in kept]
        try:
            cols[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            cols[name] = pa.array([None if v is None else str(v) for v in values], pa.string())
    return cols


@dataclass(frozen=True, kw_only=True)
class ConvertConfig(Settings):
    """The settings of one `sera convert`: raw preference files in, the pairs table out."""

    inputs: tuple[str, ...]
    output: str
    layout: str = "auto"
    format: str = "auto"
    flip: float | None = None
    seed: int = 0

    def check(self) -> None:
        """Every problem with the settings at once, as one ConfigError."""
        problems = []
        if self.layout not in ("auto", *READERS):
            problems.append(f"--layout must be auto, {', '.join(READERS)}; got {self.layout!r}")
        if self.format not in ("auto", "conversational", "standard"):
            problems.append(f"--format must be auto, conversational or standard; got {self.format!r}")
        if self.flip is not None and not 0.0 <= self.flip <= 1.0:
            problems.append(f"--flip must be a fraction in [0, 1], got {self.flip}")
        if problems:
            raise ConfigError("; ".join(problems))



@dataclass(frozen=True)
class FileReport:
    file: str
    layout: str
    rows: int
    kept: int
    skipped: dict[str, list[int]]


@dataclass(frozen=True)
class ConvertSummary:
    files: tuple[FileReport, ...]
    rows: int
    format: str
    flipped: int


def flip_rows(table: pa.Table, fraction: float, seed: int) -> tuple[pa.Table, int]:
    """Swap chosen and rejected (and their scores) in round(fraction * rows) rows drawn with `seed`;
    mark them in a boolean `flipped` column (xor-ed with an existing one)."""
    n = table.num_rows
    k = round(fraction * n)
    mask = np.zeros(n, bool)
    mask[np.random.default_rng(seed).choice(n, size=k, replace=False)] = True
    flags = pa.array(mask)
    for a, b in (("chosen", "rejected"), ("score_chosen", "score_rejected")):
        if a in table.column_names and b in table.column_names:
            ca, cb = table.column(a), table.column(b)
            table = table.set_column(table.schema.get_field_index(a), a, pc.if_else(flags, cb, ca))
            table = table.set_column(table.schema.get_field_index(b), b, pc.if_else(flags, ca, cb))
    if "flipped" in table.column_names:
        flags = pc.xor(flags, pc.cast(table.column("flipped"), pa.bool_()))
        table = table.drop_columns(["flipped"])
    return table.append_column("flipped", flags), k


def convert(config: ConvertConfig) -> ConvertSummary:
    """Read every input, convert it to pairs, flip a fraction if asked, and write Parquet with provenance."""
    from sera_cli.data import provenance
    from sera_cli.data.contract import with_ids
    from sera_cli.data.raw_records import read_records
    from sera_cli.data.tables import check_writable, expand, inputs_of, write_parquet

    config.check()
    check_writable(config.output, inputs_of(config))
    tables, reports, formats = [], [], {}
    for path in expand(list(config.inputs)):
        records = read_records(path)
        cols, skipped, layout, fmt = convert_records("<stdin>" if path == "-" else path, records, config.layout,
                                                     config.format)
        formats[path] = fmt
        if len(set(formats.values())) > 1:
            detail = ", ".join(f"{f} is {k}" for f, k in formats.items())
            raise ConfigError(f"the inputs convert to different formats ({detail}); choose one with --format")
        tables.append(pa.table(cols))
        name = "<stdin>" if path == "-" else path
        reports.append(FileReport(name, layout, len(records), tables[-1].num_rows, skipped))
    table = pa.concat_tables(tables, promote_options="permissive")
    if table.num_rows == 0:
        reasons = {why for r in reports for why in r.skipped}
        raise InputError(", ".join(r.file for r in reports), "no row could be converted: every row was "
                         f"skipped ({'; '.join(sorted(reasons))})", hint="check --layout")
    flipped = 0
    if config.flip is not None:
        table, flipped = flip_rows(table, config.flip, config.seed)
    table = with_ids(table)
    prov = provenance.record("convert", config.as_dict(), source_rows=table.num_rows, format=fmt,
                             files=[asdict(r) for r in reports], flipped=flipped)
    write_parquet(provenance.attach(table, prov), config.output)
    return ConvertSummary(tuple(reports), table.num_rows, fmt, flipped)
