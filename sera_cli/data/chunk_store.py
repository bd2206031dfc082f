"""Resumable chunked work, one mechanism for every stage that writes chunks (score, generate, eval).

Work for an output is cut into chunks; each finished chunk is saved in the output's partial folder
(`.NAME.KIND.sera-partial` beside it) with a content key: the hash of what its numbers depend on (the model
fingerprint, the log-prob or engine identity, the settings) and of the chunk's token ids. `--resume` keeps a
saved chunk only when its key equals the key of the chunk it would now compute, so new weights in the same
folder, or other text under the same row ids, are recomputed (and counted), never reused.

While a process works on a partial folder it holds the folder's lock (a pid file, `locking.pid_lock`), so a
second run writing the same output stops with one line naming the process; without `--resume`, earlier saved
chunks are discarded with a one-line notice. Chunks are written to a temporary file and renamed.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from sera_cli.data.console import Progress, console
from sera_cli.data.errors import ConfigError
from sera_cli.data.hashing import digest
from sera_cli.data.locking import holder, holds, pid_lock
from sera_cli.data.tables import STDIO, atomic_path

SUFFIX = ".sera-partial"
LOCK = "lock"
_KEY = "sera_chunk_key"


def partial_dir(output: str, kind: str) -> Path:
    """The partial folder of `kind` work ("score", "generate", ...) for `output`. Beside a file output; for
    stdout (never resumed), a folder of this process under sera's cache."""
    if output == STDIO:
        from sera_cli.data.cache_folder import cache_dir

        return cache_dir() / "partial" / f"{kind}-{os.getpid()}"
    out = Path(output)
    return out.with_name(f".{out.name}.{kind}{SUFFIX}")


def partial_dirs(output: str | os.PathLike) -> list[Path]:
    """Every partial folder of a file output, of any kind."""
    out = Path(output)
    return sorted(out.parent.glob(f".{out.name}.*{SUFFIX}"))


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """`--shard i/n` as (i, n)."""
    if text is None:
        return None
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard {text}: expected i/n, e.g. 0/4") from None
    return i, n


def shard_rows(n_items: int, chunk: int, shard: tuple[int, int] | None) -> tuple[int, int]:
    """[start, stop) items of a shard: a contiguous run of whole chunks, so shards in order make a full run."""
    if shard is None:
        return 0, n_items
    n_chunks = -(-n_items // chunk)
    i, n = shard
    return min(i * n_chunks // n * chunk, n_items), min((i + 1) * n_chunks // n * chunk, n_items)


def shard_record(ids: list, chunk: int, shard: tuple[int, int]) -> dict[str, Any]:
    """What a shard's provenance says of its place in the job: index, count, its rows [start, stop) of the whole
    input, and the whole input's size and content (the digest of its row ids), so `sera merge` can check that
    shards belong together and cover the input once."""
    start, stop = shard_rows(len(ids), chunk, shard)
    return {"index": shard[0], "count": shard[1], "start": start, "stop": stop, "input_rows": len(ids),
            "input_ids": digest(ids)}


def with_rows(shard: dict[str, Any], table) -> dict[str, Any]:
    """A shard record with `rows`, the digest of the output's `id` column in order, so `sera merge` can check
    that a shard's rows are still the ones written, in their order."""
    if "id" not in table.column_names:
        return shard
    return {**shard, "rows": digest(table.column("id").to_pylist())}


def token_digest(sequences: Iterable[Sequence[int]]) -> str:
    """Hash of a chunk's token ids, sequence by sequence (lengths included, so boundaries count)."""
    h = xxhash.xxh3_128()
    for ids in sequences:
        a = np.asarray(ids, dtype=np.int64)
        h.update(np.int64(a.size).tobytes())
        h.update(a.tobytes())
    return h.hexdigest()


def chunk_key(identity: Any, tokens: str) -> str:
    """A chunk's content key: what computes it (`identity`, JSON-able) and what it is computed on (`tokens`)."""
    return digest({"identity": identity, "tokens": tokens})


class ChunkStore:
    """The partial folder of one output's work of one kind, used as `with ChunkStore(...) as store:`.

    Entering takes the folder's lock and tidies it (half-written files; earlier chunks unless `resume`);
    leaving releases the lock and keeps the chunks for a later `--resume` (unless `finish()` removed them; an
    empty folder goes).
    Chunks are `.npz` (a dict of arrays) or `.parquet` (a table), chosen by the name's suffix.
    """

    def __init__(self, output: str, kind: str, resume: bool):
        self.output, self.kind, self.resume = output, kind, resume
        self.dir = partial_dir(output, kind)
        self.resumed = self.stale = 0  # chunks reused / saved chunks whose content key no longer matched
        self._lock = None

    def __enter__(self) -> ChunkStore:
        if self.output == STDIO:
            _remove_orphans(self.dir.parent)
        self._lock = pid_lock(self.dir / LOCK, self._busy)
        self._lock.__enter__()
        self._tidy()
        return self

    def __exit__(self, *exc) -> None:
        self._lock.__exit__(*exc)
        try:
            self.dir.rmdir()  # a folder with no chunks (finished, or failed before the first) goes
        except OSError:  # chunks to resume from, or another process took the folder meanwhile
            pass

    def _busy(self, pid: int) -> str:
        return (f"{self.output}: another sera process (pid {pid}) is writing this output (its partial folder "
                f"{self.dir} is locked); wait for it to finish or choose another --output")

    def _tidy(self) -> None:
        entries = _entries(self.dir)
        for p in entries:
            if ".tmp" in p.name:  # a chunk write that never finished
                _remove(p)
        chunks = [p for p in entries if ".tmp" not in p.name]
        if chunks and not self.resume:
            for p in chunks:
                _remove(p)
            console.print(f"discarded {len(chunks):,} saved chunk(s) of an earlier unfinished run in {self.dir} "
                          "(pass --resume to reuse saved work)", soft_wrap=True, highlight=False, markup=False)

    def load(self, name: str, key: str) -> Any:
        """The saved chunk `name` if it was made with content key `key`; None when missing or stale (then
        counted, and recomputed by the caller)."""
        path = self.dir / name
        if not path.exists():
            return None
        try:
            data, saved = _read(path)
        except Exception:  # unreadable: as good as missing, and it will be overwritten
            data, saved = None, None
        if saved != key:
            self.stale += 1
            return None
        self.resumed += 1
        return data

    def save(self, name: str, key: str, data: dict[str, np.ndarray] | Any) -> None:
        """Write a chunk atomically (temporary file, then rename) with its content key."""
        with atomic_path(self.dir / name) as tmp:
            if name.endswith(".npz"):
                with open(tmp, "wb") as f:
                    np.savez(f, **data, **{_KEY: np.array(key)})
            else:
                import pyarrow.parquet as pq

                pq.write_table(data.replace_schema_metadata({**(data.schema.metadata or {}), _KEY: key}), tmp)

    def finish(self) -> None:
        """The work is done (or failed in a way a resume would repeat): remove the chunks and, on leaving, the
        folder."""
        for p in _entries(self.dir):
            _remove(p)


def _read(path: Path) -> tuple[Any, str | None]:
    if path.name.endswith(".npz"):
        with np.load(path) as z:
            return {k: z[k] for k in z.files if k != _KEY}, (str(z[_KEY]) if _KEY in z.files else None)
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    meta = dict(table.schema.metadata or {})
    key = meta.pop(_KEY.encode(), None)  # other metadata (a chunk's provenance) stays with the table
    return table.replace_schema_metadata(meta or None), key.decode() if key else None


def _entries(folder: Path) -> list[Path]:
    """What a partial folder holds besides its lock (and a lock being taken, `lock.PID`)."""
    return [p for p in folder.iterdir() if p.name.split(".")[0] != LOCK]


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _remove_orphans(folder: Path) -> None:
    """Partial folders of stdout runs whose process is gone (they can never be resumed)."""
    if not folder.is_dir():
        return
    for d in folder.iterdir():
        pid = holder(d / LOCK)
        if d.is_dir() and not (pid and holds(d / LOCK, pid)):
            shutil.rmtree(d, ignore_errors=True)


def progress(enabled: bool, counts: bool = False):
    """The progress bar of chunked work: done/total (`counts`) or a percentage, a rate field, elapsed time."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    done = MofNCompleteColumn() if counts else TextColumn("{task.percentage:>3.0f}%")
    columns = [TextColumn("{task.description}"), BarColumn(), done, TextColumn("{task.fields[rate]}"),
               TimeElapsedColumn()]
    return Progress(*columns, *([] if counts else [TimeRemainingColumn()]), console=console,
                    disable=not enabled, transient=False)
