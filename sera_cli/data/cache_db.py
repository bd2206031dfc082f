"""The SQLite files behind the caches (`judgments.sqlite`, `logps.sqlite`): a damaged one is one line, not a
traceback, and names the file and what to do (delete it: a cache only saves work, so nothing is lost but time)."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from sera_cli.data.errors import InputError


@contextlib.contextmanager
def cache_errors(path: Path | str) -> Iterator[None]:
    """Run a cache's SQLite calls; a corrupt, truncated or non-SQLite file (sqlite3.DatabaseError) becomes one
    InputError naming it. Operational failures (a locked or read-only database, a full disk) name it too."""
    try:
        yield
    except sqlite3.DatabaseError as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise InputError(str(path), f"is not a usable cache database: {first}",
                         hint="delete it to start the cache afresh; it only saves work, so nothing else is lost"
                         ) from None
