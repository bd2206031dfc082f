"""Reading and writing Parquet tables: files, globs, stdin/stdout ('-'), atomic replacement.

Every reader reports problems as `InputError` naming the file; every writer writes to a temporary file beside
the target and renames it, so a failed or interrupted run never leaves a half-written output.
"""

from __future__ import annotations

import glob
import io
import os
import re
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from sera_cli.data import provenance
from sera_cli.data.errors import InputError, first_line

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


def is_pattern(spec: str) -> bool:
    """Whether an input name is read as a glob pattern: it has glob characters and no file or folder has exactly
    this name (a file named 'a[1].parquet' is that file, never the pattern's 'a1.parquet')."""
    return any(ch in spec for ch in "*?[") and spec != STDIO and not os.path.lexists(spec)


def expand(specs: list[str]) -> list[str]:
    """Expand globs; '-' stays as stdin. A name is a literal path when a file of that exact name exists, and a
    pattern only otherwise (`is_pattern`); a pattern that matches nothing is an error naming it and the rule."""
    paths: list[str] = []
    for spec in specs:
        if spec == STDIO:
            paths.append(spec)
        elif is_pattern(spec) and not _dataset_name(spec):
            found = sorted(glob.glob(spec))
            if not found:
                raise InputError(spec, "no file has this name, and read as a glob pattern it matches no file")
            paths.extend(found)
        else:
            paths.append(spec)
    if paths.count(STDIO) > 1:
        raise InputError(STDIO, "standard input can be read only once")
    return paths


def _dataset_name(spec: str) -> bool:
    from sera_cli.data.hub_data import is_dataset_name

    return is_dataset_name(spec)  # 'org/name:train[:100]' is a split's slice, not a glob


def read_parquet(path: str) -> pa.Table:
    """One Parquet file (or stdin for '-'), an `.arrow` file, a `datasets` `save_to_disk` folder or a Hub dataset
    name (`sera_cli.data.hub_data`), with a one-line error for anything unreadable."""
    name = "<stdin>" if path == STDIO else path
    try:
        if path == STDIO:
            data = sys.stdin.buffer.read()
            if not data:
                raise InputError(name, "standard input is empty", hint="pipe a Parquet file into it")
            return pq.read_table(io.BytesIO(data))
        if not os.path.exists(path):
            from sera_cli.data.hub_data import is_dataset_name, read_dataset

            if is_dataset_name(path):
                return read_dataset(path)
            raise InputError(name, "no such file")
        if os.path.isdir(path):
            from sera_cli.data.arrow_data import is_dataset_folder, read_dataset_folder

            if is_dataset_folder(path):
                return read_dataset_folder(path)
            raise InputError(name, "is a folder, not a Parquet file",
                             hint="give a Parquet file, an .arrow file or a datasets save_to_disk folder")
        if os.path.getsize(path) == 0:
            raise InputError(name, "is empty (0 bytes)", hint="was it written completely?")
        if path.endswith(".arrow"):
            from sera_cli.data.arrow_data import read_arrow

            return read_arrow(path)
        return pq.read_table(path)
    except InputError:
        raise
    except (pa.ArrowException, OSError) as err:
        first = first_line(err)
        raise InputError(name, f"not a readable Parquet file: {first}",
                         hint="truncated or not Parquet? 'sera convert' reads JSONL") from None


def read_schema(path: str) -> pa.Schema:
    """The schema (and footer metadata) of a Parquet file, or a one-line `InputError` naming it."""
    try:
        return pq.read_schema(path)
    except (pa.ArrowException, OSError) as err:
        raise InputError(path, f"not a readable Parquet file: {first_line(err)}",
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
        sources.append(Source(name, start, table.num_rows, provenance.read(table, name)))
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
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds.

    Any `OSError` of the write (disk full, no permission, a file where a folder should be, a name too long, a
    read-only or failing file system) becomes one `InputError` naming `path` and the cause; the temporary is
    removed either way, and so are temporaries of `path` left by earlier processes that are gone."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(target)
        yield tmp
        os.replace(tmp, target)
    except OSError as err:
        raise write_error(target, err) from None
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # e.g. the name is too long to have existed
            pass


def write_error(path: str | os.PathLike, err: OSError) -> InputError:
    """One line for a failed write of `path`: the path and the system's cause (ENOSPC, EACCES, ENOTDIR, ...)."""
    cause = err.strerror or first_line(err)
    if detail := re.search(r"\[errno \d+\] (.+)$", cause):  # Arrow's 'Failed to open ... Detail: [errno 2] ...'
        cause = detail.group(1)
    other = err.filename if err.filename and os.fspath(err.filename) != os.fspath(path) else None
    if other and not Path(os.fspath(other)).name.startswith(f".{Path(path).name}.tmp-"):
        cause += f" ({other})"  # a parent folder, say, rather than the output's own temporary
    return InputError(str(path), f"cannot be written: {cause}")


def remove_stale_temporaries(target: Path) -> None:
    """Remove `.NAME.tmp-PID` files beside `target` whose process is gone (a killed earlier run of it)."""
    from sera_cli.data.locking import holds

    try:
        names = [p for p in target.parent.glob(f".{glob.escape(target.name)}.tmp-*") if p.is_file()]
    except OSError:
        return
    for p in names:
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not holds(p, int(pid)):
            try:
                p.unlink()
            except OSError:
                pass


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


# The fields of a command's config that name something it reads: files, globs, stdin, caches, model folders.
INPUT_FIELDS = ("inputs", "shards", "data", "offline", "generated", "prev", "cache", "answers", "eval",
                "prompts", "policy", "policies", "ref", "baseline", "judge", "chat_template", "judge_reward",
                "judge_reward_ref", "judge_rm", "judge_heldout", "prev_policy", "prev_ref")
_noted: list[str] = []  # inputs read by option callbacks (--config) of the command being run


def note_input(path: str) -> None:
    """Count a file an option callback read (`--config FILE`) as an input of the running command."""
    _noted.append(path)


def forget_noted_inputs() -> None:
    """(The CLI edge, after each command) the noted inputs belong to that command only."""
    _noted.clear()


def inputs_of(config: Any = None, *extra: str | os.PathLike | None) -> list[str]:
    """Every input of a command: the files, globs, stdin ('-'), caches and model folders its `config` names (the
    `INPUT_FIELDS` it has), the `extra` ones, and what option callbacks read (`--config FILE`). Outputs are
    checked against all of them (`refuse_overwrite`, `check_writable`)."""
    names: list[str] = []
    for field in INPUT_FIELDS:
        value = getattr(config, field, None) if config is not None else None
        values = value if isinstance(value, list | tuple) else [value]
        names.extend(str(v) for v in values if isinstance(v, str | os.PathLike) and str(v))
    names.extend(str(v) for v in extra if v)
    names.extend(_noted)
    return list(dict.fromkeys(names))


def _same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return False


def _stdin_is(output: str | os.PathLike) -> bool:
    """Whether standard input is the file `output` (`sera select - -o x.parquet < x.parquet`)."""
    try:
        st, out = os.fstat(sys.stdin.fileno()), os.stat(output)
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        return False
    return (st.st_dev, st.st_ino) == (out.st_dev, out.st_ino)


def refuse_overwrite(output: str | os.PathLike, inputs: Iterable[str | os.PathLike | None], *,
                     folder: bool = False) -> None:
    """Fail when writing `output` would replace an input: the same path by any spelling, a symlink or hard link
    to it, the file given on standard input ('-'), an existing file inside an input folder (a model folder, a
    cache), or, for an output `folder` (replaced or written into as a whole), an input inside it. Input globs are
    expanded as `expand` would; names that do not exist (model names, Hub ids) cannot be replaced and are
    skipped. The `--config` file of the running command is counted too (`note_input`)."""
    if not output or str(output) == STDIO:
        return
    out = os.path.realpath(output)
    exists = os.path.lexists(output)
    for spec in dict.fromkeys([*(str(s) for s in inputs if s), *_noted]):
        if spec == STDIO:
            if exists and _stdin_is(output):
                raise InputError(str(output), "is the file given on standard input", hint=_NEVER_REPLACED)
            continue
        for path in sorted(glob.glob(spec)) if is_pattern(spec) else [spec]:
            if not os.path.exists(path):
                continue
            real = os.path.realpath(path)
            if real == out or (exists and _same_file(path, output)):
                raise InputError(str(output), f"is the input {path}", hint=_NEVER_REPLACED)
            if folder and Path(real).is_relative_to(out):
                raise InputError(str(output), f"holds the input {path}", hint=_NEVER_REPLACED)
            if not folder and os.path.isfile(output) and os.path.isdir(real) and Path(out).is_relative_to(real):
                raise InputError(str(output), f"is a file of the input folder {path}", hint=_NEVER_REPLACED)


_NEVER_REPLACED = "outputs never replace inputs: choose another output path"


def check_writable(path: str, inputs: Iterable[str | os.PathLike | None] = ()) -> None:
    """Fail before any work when the output cannot be written (missing permission, a folder or a device in the
    way, a name that says folder) or would replace one of the `inputs`, or is a terminal's standard output."""
    if path == STDIO:
        refuse_terminal_stdout(path)
        return
    try:
        _check_writable(path, inputs)
    except OSError as err:  # a name too long, a loop of links, ...
        raise write_error(path, err) from None


def check_folder_writable(path: str, inputs: Iterable[str | os.PathLike | None] = (), *, what: str = "") -> None:
    """Fail before any work when a folder the command writes into (`--logging-dir`, `--cache`) cannot be made or
    written, or is, or holds, one of the `inputs`. `what` names the option in the message."""
    label = f"{what} " if what else ""
    try:
        refuse_overwrite(path, inputs, folder=True)
        folder = Path(path)
        if folder.exists() and not folder.is_dir():
            raise InputError(path, f"{label}is a file; give a folder")
        ancestor = folder
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise InputError(path, f"{label}cannot be made: {ancestor} is a file, not a folder")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise InputError(path, f"{label}cannot be written: no permission on {ancestor}")
    except OSError as err:
        raise write_error(path, err) from None


def _check_writable(path: str, inputs: Iterable[str | os.PathLike | None]) -> None:
    refuse_overwrite(path, inputs)
    target = Path(path)
    if str(path).endswith(("/", os.sep)) or target.is_dir():
        raise InputError(path, "is a folder; give a file name for the output")
    if target.exists() and not target.is_file():
        raise InputError(path, "is not a regular file (a device, pipe or socket); give a file name for the output, "
                               "or '-' for standard output")
    parent = target.parent if str(target.parent) else Path(".")
    ancestor = parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if ancestor.exists() and not ancestor.is_dir():
        raise InputError(path, f"cannot be written: {ancestor} is a file, not a folder")
    if parent.exists() and not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(path, "cannot be written: no permission on its folder")
