"""One process at a time: a pid file taken with O_EXCL; a lock whose process is gone is taken over.

`sera run` locks its workdir with it, and score and generate lock an output's partial folder (`chunk_store`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from sera_cli.errors import ConfigError


@contextmanager
def pid_lock(path: Path, busy: Callable[[int], str]) -> Iterator[None]:
    """Hold `path` (a file holding this process's pid) for the block; `busy(pid)` is the one-line error when a
    live process holds it. The folder of `path` is made if missing."""
    for _ in range(3):
        path.parent.mkdir(parents=True, exist_ok=True)
        mine = path.with_name(f"{path.name}.{os.getpid()}")
        try:
            mine.write_text(str(os.getpid()))
            os.link(mine, path)  # atomic: the lock appears with its pid in it, or not at all
            break
        except FileNotFoundError:  # the folder went away meanwhile (its owner finished): retry
            continue
        except FileExistsError:
            pid = holder(path)  # our own pid here is a leftover of an earlier process that had it
            if pid and pid != os.getpid() and alive(pid):
                raise ConfigError(busy(pid)) from None
            path.unlink(missing_ok=True)
        finally:
            mine.unlink(missing_ok=True)
    else:
        raise ConfigError(f"cannot take the lock file {path}")
    try:
        yield
    finally:
        if holder(path) == os.getpid():
            path.unlink(missing_ok=True)


def holder(path: Path) -> int:
    """The pid written in a lock file (0 when it is missing, empty or unreadable)."""
    try:
        return int(path.read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
