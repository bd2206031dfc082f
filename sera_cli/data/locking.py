"""One process at a time: a pid file taken with O_EXCL; a lock whose process is gone is taken over (a dead pid, a
pid now used by a process that started after the lock was written, or by a process that is not Python).

`sera run` locks its workdir with it, and score and generate lock an output's partial folder (`chunk_store`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from sera_cli.data.errors import ConfigError


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
            if pid and pid != os.getpid() and holds(path, pid):
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


def holds(path: Path, pid: int) -> bool:
    """Whether process `pid` still holds the lock file `path`: it is alive, and it is the process that wrote the
    lock, not a later one that was given the same pid after the holder died (it started after the lock was
    written). A lock naming a live but unrelated process is thus taken over, never waited on forever."""
    if not alive(pid) or not could_be_sera(pid):
        return False
    started = start_time(pid)
    try:
        written = path.stat().st_mtime
    except OSError:
        return False
    return started is None or started <= written + 1.0  # 1 s: the clock tick of /proc's start times


def could_be_sera(pid: int) -> bool:
    """Whether process `pid` may be a sera run: a Python process (its command line names python or sera), or
    one /proc does not describe. A lock naming, say, a shell or a daemon is not held by a sera run."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").lower()
    except OSError:
        return True
    return not cmdline or b"python" in cmdline or b"sera" in cmdline


def start_time(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch), from /proc; None where /proc does not say."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22, after the command name in parentheses
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        if stat.rsplit(")", 1)[1].split()[0] == "Z":  # a zombie holds nothing
            return float("inf")
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
