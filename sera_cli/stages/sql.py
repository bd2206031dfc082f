"""SQL over sera's files with DuckDB: each file is a view named after its file stem; only read-only queries run.

`scored.parquet` becomes the view `scored`, `iter-1.parquet` the view `iter_1`. Parquet, CSV and JSON(L) files
can be queried. sera reads the named files itself (Parquet lazily, through Arrow) and hands them to a DuckDB
connection locked at start: a read-only empty database, no file system or network access (so no COPY, ATTACH,
read_text, glob or remote reads), no extension install or load, configuration locked. The query can thus read
the named files and nothing else, and write nothing.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from sera_cli.data.errors import ConfigError, InputError, SeraError
from trainers.config import Settings

READERS = {".parquet": "read_parquet", ".csv": "read_csv_auto", ".tsv": "read_csv_auto",
           ".jsonl": "read_json_auto", ".ndjson": "read_json_auto", ".json": "read_json_auto"}
ALLOWED = ("SELECT", "EXPLAIN")
OUTPUTS = (".parquet", ".csv", ".jsonl")
# DuckDB settings that make the query connection unable to touch anything but the registered inputs.
NO_EXTENSIONS = {"autoinstall_known_extensions": False, "autoload_known_extensions": False,
                 "allow_community_extensions": False}
LOCKDOWN = {**NO_EXTENSIONS, "enable_external_access": False, "python_enable_replacements": False,
            "lock_configuration": True}
LOCKED = ("attached in read-only mode", "the configuration has been locked")  # how DuckDB says it refused
READ_ONLY = "sera sql is read-only: it reads only the files it is given and writes nothing"


class QueryError(SeraError):
    """DuckDB rejected the query."""


@dataclass(frozen=True, kw_only=True)
class SqlConfig(Settings):
    """The settings of one `sera sql`: a read-only query over the named files."""

    query: str
    inputs: tuple[str, ...]
    output: str | None = None
    json: bool = False
    max_rows: int = 40

    def check(self) -> None:
        """Every problem with the settings at once, as one ConfigError."""
        problems = []
        if self.output and self.json:
            problems.append("give -o or --json, not both")
        if self.output and self.output != "-" and Path(self.output).suffix not in OUTPUTS:
            problems.append(f"-o {self.output}: the output must end in {', '.join(OUTPUTS)} (or be '-')")
        if problems:
            raise ConfigError("; ".join(problems))



def view_name(path: str) -> str:
    """The view a file is queried as: its name without data suffixes, other characters as '_'."""
    name = Path(path).name
    for _ in range(2):
        stem, suffix = Path(name).stem, Path(name).suffix
        if suffix in (".gz", ".zst", *READERS):
            name = stem
    name = re.sub(r"\W", "_", name)
    return f"_{name}" if name[:1].isdigit() or not name else name


def _reader(path: str) -> str:
    suffixes = [s for s in Path(path).suffixes if s not in (".gz", ".zst")]
    return READERS.get(suffixes[-1] if suffixes else "", "read_parquet")


def _first_line(err: Exception) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return lines[0] if lines else type(err).__name__


def check_kind(query: str) -> None:
    """A friendly first refusal of statements that are not one SELECT (or EXPLAIN), by DuckDB's own parser.
    What makes the query read-only is the locked connection of `run_query`, not this check."""
    import duckdb

    try:
        statements = duckdb.extract_statements(query)
    except duckdb.Error as err:
        raise QueryError(f"query failed: {_first_line(err)}") from None
    kinds = [s.type.name for s in statements]
    if len(kinds) != 1 or kinds[0] not in ALLOWED:
        raise QueryError(f"sera sql runs one read-only SELECT query; got {', '.join(kinds) or 'nothing'}")


def source(path: str):
    """One input as Arrow, read by sera rather than by the query: a lazy dataset for Parquet (its footer is read
    now, so a truncated file fails here), the whole table for CSV and JSON(L)."""
    import duckdb
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    if not Path(path).is_file():
        raise InputError(path, "no such file" if not Path(path).exists() else "is a folder, not a file")
    reader = _reader(path)
    try:
        if reader == "read_parquet":
            return ds.dataset(path, format="parquet", schema=pq.read_schema(path))
        return _read_text_table(path, reader)
    except (duckdb.Error, pa.ArrowException, OSError) as err:
        kind = "Parquet" if reader == "read_parquet" else "CSV" if reader == "read_csv_auto" else "JSON"
        hint = f"truncated, or not {kind}?"
        raise InputError(path, f"not a readable {kind} file: {_first_line(err)}", hint=hint) from None


def _read_text_table(path: str, reader: str) -> pa.Table:
    """A CSV or JSON(L) file read by DuckDB's reader, through a connection locked like the query's: the file is
    linked under a plain name (no glob characters, so DuckDB reads exactly this file, never a pattern's
    matches) in a fresh folder; the connection may read that folder and the file's own, loads no extension, and
    its configuration is locked."""
    import duckdb

    with tempfile.TemporaryDirectory(prefix="sera-sql-read-") as folder:
        link = Path(folder) / ("input" + "".join(Path(path).suffixes[-2:]))
        os.symlink(os.path.abspath(path), link)
        with duckdb.connect(":memory:", config=dict(NO_EXTENSIONS)) as con:
            real = os.path.dirname(os.path.realpath(path))
            con.execute("SET allowed_directories = $1", [[f"{folder}/", f"{real.rstrip('/')}/"]])
            con.execute("SET enable_external_access = false")
            con.execute("SET lock_configuration = true")
            try:
                return con.sql(f"SELECT * FROM {reader}($1)", params=[str(link)]).to_arrow_table()
            except duckdb.Error as err:  # its message names the file as the user did
                raise duckdb.Error(str(err).replace(str(link), path)) from None


def locked_connection(folder: Path, sources: dict[str, Any]):
    """A DuckDB connection that can read the registered `sources` and nothing else: a read-only (empty) database,
    no file system or network access, no extension install or load, configuration locked at start."""
    import duckdb

    db = folder / "inputs.duckdb"
    duckdb.connect(str(db)).close()
    con = duckdb.connect(str(db), read_only=True, config={**LOCKDOWN, "temp_directory": str(folder / "spill")})
    for name, data in sources.items():
        con.register(name, data)
    return con


def run_query(query: str, paths: list[str]) -> pa.Table:
    """The result of one read-only query over the files, each registered as a view named by `view_name`."""
    import duckdb

    check_kind(query)
    sources: dict[str, Any] = {}
    seen: dict[str, str] = {}
    for path in paths:
        name = view_name(path)
        if name in seen:
            raise InputError(path, f"would be the view '{name}' like {seen[name]}", hint="rename one of them")
        seen[name] = path
        sources[name] = source(path)
    with tempfile.TemporaryDirectory(prefix="sera-sql-") as folder:
        con = locked_connection(Path(folder), sources)
        try:
            return con.sql(query).to_arrow_table()
        except duckdb.Error as err:
            raise _query_error(err, seen) from None
        finally:
            con.close()


def _query_error(err: Exception, files: dict[str, str]) -> SeraError:
    """One line for a failed query: the file when reading an input failed, else DuckDB's first line."""
    import duckdb

    first = _first_line(err)
    for name, path in files.items():
        if f"registered as '{name}' failed" in first:
            return InputError(path, f"not a readable Parquet file: {first.split(' failed: ', 1)[-1]}",
                              hint="truncated, or not Parquet?")
    if isinstance(err, duckdb.PermissionException) or any(m in first for m in LOCKED):
        return QueryError(f"query failed: {first} ({READ_ONLY})")
    return QueryError(f"query failed: {first}")


def _plain(value: Any) -> Any:
    """A JSON-safe value: NaN and infinities as null, at any depth (a MAP comes as a list of tuples)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def as_json(table: pa.Table) -> str:
    return json.dumps([_plain(r) for r in table.to_pylist()], ensure_ascii=False, default=str)


def _not_parquet(typ: pa.DataType) -> pa.DataType | None:
    """The part of an Arrow type that Parquet cannot store (intervals, unions), at any depth, or None."""
    if pa.types.is_interval(typ) or pa.types.is_union(typ):
        return typ
    for i in range(typ.num_fields):
        if (inner := _not_parquet(typ.field(i).type)) is not None:
            return inner
    return None


def write_result(table: pa.Table, path: str, prov: dict[str, Any]) -> None:
    """Write a result as Parquet (with provenance), CSV or JSONL, atomically."""
    from sera_cli.data import provenance
    from sera_cli.data.tables import atomic_path, write_parquet

    suffix = Path(path).suffix
    if path == "-" or suffix == ".parquet":
        for f in table.schema:
            if (typ := _not_parquet(f.type)) is not None:
                raise InputError("<stdout>" if path == "-" else path,
                                 f"Parquet cannot hold the column '{f.name}' of type {typ}",
                                 hint=f"cast it in the query, e.g. CAST({f.name} AS VARCHAR), or write .jsonl")
        write_parquet(provenance.attach(table, prov), path)
        return
    with atomic_path(path) as tmp:
        if suffix == ".csv":
            import pyarrow.csv as pacsv

            try:
                pacsv.write_csv(table, tmp)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
                nested = [f.name for f in table.schema if pa.types.is_nested(f.type)]
                odd = [f for f in table.schema if _not_parquet(f.type) is not None]  # intervals
                what = (f"the nested column '{nested[0]}'" if nested else
                        f"the column '{odd[0].name}' of type {odd[0].type}" if odd else "a column of this result")
                raise InputError(path, f"CSV cannot hold {what}",
                                 hint="write .parquet or .jsonl instead") from None
        else:
            with open(tmp, "w", encoding="utf-8") as f:
                for row in table.to_pylist():
                    f.write(json.dumps(_plain(row), ensure_ascii=False, default=str) + "\n")


def cell(value: Any, width: int = 60) -> str:
    """One value as terminal text: messages as 'role: content', floats to 6 digits, cut to `width`."""
    if isinstance(value, list) and value and all(isinstance(m, dict) and "content" in m for m in value):
        text = " | ".join(f"{m.get('role')}: {m.get('content')}" for m in value)
    elif isinstance(value, float):
        text = f"{value:.6g}"
    elif isinstance(value, str):
        text = value
    else:
        text = json.dumps(_plain(value), ensure_ascii=False, default=str)
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 1] + "…"


def render(table: pa.Table, max_rows: int, screen: int = 120):
    """A rich table of the first `max_rows` rows, each column cut to fit a `screen` characters wide."""
    from rich.table import Table

    width = max(8, min(60, (screen - 1) // max(1, table.num_columns) - 3))
    shown = table.slice(0, max_rows)
    more = table.num_rows - shown.num_rows
    caption = f"{table.num_rows:,} rows" + (f"; the first {shown.num_rows} shown (write all with -o)" if more else "")
    out = Table(caption=caption)
    for name in table.column_names:
        out.add_column(name, no_wrap=True, overflow="ellipsis", max_width=width)
    for row in shown.to_pylist():
        out.add_row(*(cell(v, width) for v in row.values()))
    return out


def sql(config: SqlConfig) -> pa.Table:
    """Run the query; write it when an output is given. Returns the result."""
    from sera_cli.data import lineage, provenance
    from sera_cli.data.tables import check_writable, expand

    config.check()
    paths = expand(list(config.inputs))
    if "-" in paths:
        raise InputError("<stdin>", "sera sql reads files, not standard input", hint="give the file names")
    if config.output:
        check_writable(config.output, paths)
    table = run_query(config.query, paths)
    if config.output:
        # Every input file is a parent: a query may join, filter or compute over any of them.
        parents = [lineage.of_file(path) for path in paths]
        prov = provenance.record("sql", config.as_dict(), parents=parents, logps=lineage.common_logps(parents))
        write_result(table, config.output, prov)
    return table
