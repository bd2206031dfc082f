"""SQL over sera's files with DuckDB: each file is a view named after its file stem; only read-only queries run.

`scored.parquet` becomes the view `scored`, `iter-1.parquet` the view `iter_1`. Parquet, CSV and JSON(L) files
can be queried; nothing is ever written to them.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from sera_cli.errors import ConfigError, InputError, SeraError

READERS = {".parquet": "read_parquet", ".csv": "read_csv_auto", ".tsv": "read_csv_auto",
           ".jsonl": "read_json_auto", ".ndjson": "read_json_auto", ".json": "read_json_auto"}
ALLOWED = ("SELECT", "EXPLAIN")
OUTPUTS = (".parquet", ".csv", ".jsonl")


class QueryError(SeraError):
    """DuckDB rejected the query."""


@dataclass(frozen=True)
class SqlConfig:
    query: str
    inputs: tuple[str, ...]
    output: str | None = None
    json: bool = False
    max_rows: int = 40

    def validate(self) -> None:
        if self.output and self.json:
            raise ConfigError("give -o or --json, not both")
        if self.output and self.output != "-" and Path(self.output).suffix not in OUTPUTS:
            raise ConfigError(f"-o {self.output}: the output must end in {', '.join(OUTPUTS)} (or be '-')")

    def as_dict(self) -> dict:
        return asdict(self)


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


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _first_line(err: Exception) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return lines[0] if lines else type(err).__name__


def run_query(query: str, paths: list[str]) -> pa.Table:
    """The result of one read-only query over the files, each registered as a view."""
    import duckdb

    try:
        statements = duckdb.extract_statements(query)
    except duckdb.Error as err:
        raise QueryError(f"query failed: {_first_line(err)}") from None
    kinds = [s.type.name for s in statements]
    if len(kinds) != 1 or kinds[0] not in ALLOWED:
        raise QueryError(f"sera sql runs one read-only SELECT query; got {', '.join(kinds) or 'nothing'}")
    con = duckdb.connect(":memory:")
    seen: dict[str, str] = {}
    for path in paths:
        if not Path(path).is_file():
            raise InputError(path, "no such file")
        name = view_name(path)
        if name in seen:
            raise InputError(path, f"would be the view '{name}' like {seen[name]}", hint="rename one of them")
        seen[name] = path
        con.execute(f'CREATE VIEW "{name}" AS SELECT * FROM {_reader(path)}({_quote(path)})')
    try:
        return con.sql(query).to_arrow_table()
    except duckdb.Error as err:
        raise QueryError(f"query failed: {_first_line(err)}") from None
    finally:
        con.close()


def _plain(value: Any) -> Any:
    """A JSON-safe value: NaN and infinities as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def as_json(table: pa.Table) -> str:
    return json.dumps([_plain(r) for r in table.to_pylist()], ensure_ascii=False, default=str)


def write_result(table: pa.Table, path: str, prov: dict[str, Any]) -> None:
    """Write a result as Parquet (with provenance), CSV or JSONL, atomically."""
    from sera_cli import provenance
    from sera_cli.io import atomic_path, write_parquet

    suffix = Path(path).suffix
    if path == "-" or suffix == ".parquet":
        write_parquet(provenance.attach(table, prov), path)
        return
    with atomic_path(path) as tmp:
        if suffix == ".csv":
            import pyarrow.csv as pacsv

            try:
                pacsv.write_csv(table, tmp)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
                nested = [f.name for f in table.schema if pa.types.is_nested(f.type)]
                raise InputError(path, f"CSV cannot hold the nested column '{(nested or ['?'])[0]}'",
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
    from sera_cli import provenance
    from sera_cli.io import check_writable, expand
    from sera_cli.lineage import of_file

    config.validate()
    if config.output:
        check_writable(config.output)
    paths = expand(list(config.inputs))
    if "-" in paths:
        raise InputError("<stdin>", "sera sql reads files, not standard input", hint="give the file names")
    table = run_query(config.query, paths)
    if config.output:
        parents = [p for p in (of_file(path) for path in paths) if p]
        write_result(table, config.output, provenance.record("sql", config.as_dict(), parents=parents))
    return table

