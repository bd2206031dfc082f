"""Content-addressed log-prob cache: a sequence scored once by a model is never scored again by it.

A key hashes the log-prob identity (model fingerprint, chat template, max lengths, dtype) with the exact token
ids and the prompt length, which fix the text after templating and truncation. Values live in SQLite, one file
per cache folder, safe for several processes (shards) at once.
"""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from sera_cli.data.cache_db import cache_errors
from sera_cli.data.hashing import digest


class LogpCache:
    def __init__(self, folder: str | Path, identity: dict[str, Any]):
        Path(folder).mkdir(parents=True, exist_ok=True)
        self._path = Path(folder) / "logps.sqlite"
        with cache_errors(self._path):
            self._db = sqlite3.connect(self._path, timeout=60)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS logps (key TEXT PRIMARY KEY, logp REAL, ntok INTEGER)")
        self._salt = digest(identity).encode()

    def keys(self, sequences: Sequence[tuple[list[int], int]]) -> list[str]:
        out = []
        for ids, plen in sequences:
            h = xxhash.xxh3_128(self._salt)
            h.update(np.asarray(ids, dtype=np.int64).tobytes())
            h.update(str(plen).encode())
            out.append(h.hexdigest())
        return out

    def get(self, keys: Sequence[str]) -> dict[str, tuple[float, int]]:
        found: dict[str, tuple[float, int]] = {}
        with cache_errors(self._path):
            for i in range(0, len(keys), 500):
                part = keys[i:i + 500]
                rows = self._db.execute(f"SELECT key, logp, ntok FROM logps WHERE key IN "
                                        f"({','.join('?' * len(part))})", part).fetchall()
                # a row whose value is not a finite number (a damaged file) is not a hit: it is computed again
                found.update({k: (lp, n) for k, lp, n in rows if isinstance(lp, float) and math.isfinite(lp)
                              and isinstance(n, int)})
        return found

    def put(self, keys: Sequence[str], logp: Sequence[float], ntok: Sequence[int]) -> None:
        with cache_errors(self._path), self._db:
            self._db.executemany("INSERT OR REPLACE INTO logps VALUES (?, ?, ?)",
                                 [(k, float(lp), int(n)) for k, lp, n in zip(keys, logp, ntok, strict=True)])

    def close(self) -> None:
        self._db.close()
