"""Reading and writing Parquet tables: files, globs, stdin/stdout ('-'), atomic replacement.

Every reader reports problems as `InputError` naming the file; every writer writes to a temporary file beside
the target and renames it, so a failed or interrupted run never leaves a half-written output.
"""

from __future__ import annotations

import glob
import io
import os
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from sera_cli import provenance
from sera_cli.errors import InputError, first_line

STDIO = "-"


@dataclass(frozen=True)
class Source:
    """One input file's place in a concatenated table: rows [start, start + rows), and its own provenance."""

    name: str
    start: int
    rows: int
    prov: dict | None = None


@dataclass(frozen=True)
class Inputs:
    """Tables read from one or more files, concatenated, with the map back to each file's rows."""

    table: pa.Table
    sources: tuple[Source, ...]

    def locate(self, row: int) -> tuple[str, int]:
        """(file name, row within that file) for a row of the concatenated table."""
        for s in self.sources:
            if s.start <= row < s.start + s.rows:
                return s.name, row - s.start
        raise IndexError(row)

    @property
    def name(self) -> str:
        return ", ".join(s.name for s in self.sources)


def expand(specs: list[str]) -> list[str]:
    """Expand globs; '-' stays as stdin. A pattern that matches nothing is an error naming it."""
    paths: list[str] = []
    for spec in specs:
        if spec == STDIO:
            paths.append(spec)
        elif any(ch in spec for ch in "*?[") and not _dataset_name(spec):
            found = sorted(glob.glob(spec))
            if not found:
                raise InputError(spec, "no file matches this pattern")
            paths.extend(found)
        else:
            paths.append(spec)
    if paths.count(STDIO) > 1:
        raise InputError(STDIO, "standard input can be read only once")
    return paths


def _dataset_name(spec: str) -> bool:
    from sera_cli.hub_data import is_dataset_name

    return is_dataset_name(spec)  # 'org/name:train[:100]' is a split's slice, not a glob


def read_parquet(path: str) -> pa.Table:
    """One Parquet file (or stdin for '-'), an `.arrow` file, a `datasets` `save_to_disk` folder or a Hub dataset
    name (`sera_cli.hub_data`), with a one-line error for anything unreadable."""
    name = "<stdin>" if path == STDIO else path
    try:
        if path == STDIO:
            data = sys.stdin.buffer.read()
            if not data:
                raise InputError(name, "standard input is empty", hint="pipe a Parquet file into it")
            return pq.read_table(io.BytesIO(data))
        if not os.path.exists(path):
            from sera_cli.hub_data import is_dataset_name, read_dataset

            if is_dataset_name(path):
                return read_dataset(path)
            raise InputError(name, "no such file")
        if os.path.isdir(path):
            from sera_cli.arrow_data import is_dataset_folder, read_dataset_folder

            if is_dataset_folder(path):
                return read_dataset_folder(path)
            raise InputError(name, "is a folder, not a Parquet file",
                             hint="give a Parquet file, an .arrow file or a datasets save_to_disk folder")
        if os.path.getsize(path) == 0:
            raise InputError(name, "is empty (0 bytes)", hint="was it written completely?")
        if path.endswith(".arrow"):
            from sera_cli.arrow_data import read_arrow

            return read_arrow(path)
        return pq.read_table(path)
    except InputError:
        raise
    except (pa.ArrowException, OSError) as err:
        first = first_line(err)
        raise InputError(name, f"not a readable Parquet file: {first}",
                         hint="truncated or not Parquet? 'sera convert' reads JSONL") from None


def read_inputs(specs: list[str], *, allow_empty: bool = False) -> Inputs:
    """Read and concatenate several Parquet inputs. Their columns must agree."""
    tables, sources, start = [], [], 0
    for path in expand(specs):
        table = read_parquet(path)
        name = "<stdin>" if path == STDIO else path
        if table.num_rows == 0 and not allow_empty:
            raise InputError(name, "has no rows")
        tables.append(table)
        sources.append(Source(name, start, table.num_rows, provenance.read(table)))
        start += table.num_rows
    if not tables:
        raise InputError("<none>", "no input files given")
    if len(tables) == 1:
        return Inputs(tables[0], tuple(sources))
    first = tables[0]
    for t, s in zip(tables[1:], sources[1:], strict=True):
        if set(t.column_names) != set(first.column_names):
            missing = sorted(set(first.column_names) ^ set(t.column_names))
            raise InputError(s.name, f"columns differ from {sources[0].name}: {', '.join(missing)}")
    try:
        table = pa.concat_tables([t.select(first.column_names) for t in tables], promote_options="permissive")
    except pa.ArrowException as err:
        raise InputError(sources[-1].name, f"column types differ from {sources[0].name}: {err}") from None
    # No one file's provenance describes the concatenation: each file's stays on its Source.
    return Inputs(table.replace_schema_metadata(None), tuple(sources))


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def refuse_terminal_stdout(path: str) -> None:
    """Parquet is binary: '-' into a terminal (no pipe or redirect) would print bytes on the screen."""
    if path == STDIO and sys.stdout.isatty():
        raise InputError(STDIO, "standard output is a terminal, and Parquet is binary",
                         hint="pipe it (| sera ...), redirect it (> out.parquet) or give -o FILE")


def write_parquet(table: pa.Table, path: str) -> None:
    """Write a table to a file atomically, or to stdout for '-'."""
    if path == STDIO:
        refuse_terminal_stdout(path)
        buf = io.BytesIO()
        pq.write_table(table, buf)
        sys.stdout.buffer.write(buf.getvalue())
        sys.stdout.buffer.flush()
        return
    if os.path.isdir(path):
        raise InputError(path, "is a folder; give a file name for the output")
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def refuse_overwrite(output: str | os.PathLike, inputs: Iterable[str | os.PathLike | None], *,
                     folder: bool = False) -> None:
    """Fail when writing `output` would replace an input: the same path, a symlink or hard link to it, or, for an
    output `folder` (replaced or written into as a whole), an input inside it. Globs are expanded; inputs that do
    not exist (model names, stdin) cannot be replaced and are skipped."""
    if not output or str(output) == STDIO:
        return
    out = os.path.realpath(output)
    for spec in (str(s) for s in inputs if s):
        for path in glob.glob(spec) if any(ch in spec for ch in "*?[") else [spec]:
            if path == STDIO or not os.path.exists(path):
                continue
            real = os.path.realpath(path)
            if real == out or (os.path.exists(output) and os.path.samefile(path, output)):
                raise InputError(str(output), f"is the input {path}", hint=_NEVER_REPLACED)
            if folder and Path(real).is_relative_to(out):
                raise InputError(str(output), f"holds the input {path}", hint=_NEVER_REPLACED)


_NEVER_REPLACED = "outputs never replace inputs: choose another output path"


def check_writable(path: str, inputs: Iterable[str | os.PathLike | None] = ()) -> None:
    """Fail before any work when the output cannot be written (missing permission, folder in the way) or would
    replace one of the `inputs`, or is a terminal's standard output."""
    if path == STDIO:
        refuse_terminal_stdout(path)
        return
    refuse_overwrite(path, inputs)
    target = Path(path)
    if target.is_dir():
        raise InputError(path, "is a folder; give a file name for the output")
    parent = target.parent if str(target.parent) else Path(".")
    if parent.exists() and not os.access(parent, os.W_OK):
        raise InputError(path, "cannot be written: no permission on its folder")
