"""The judgments cache: the judge's text for each judge prompt, in SQLite beside the outputs.

A judgment's key is the hash of (judge identity, template name, the judge's messages), and the messages hold the
template text, the question and both answers, so a judgment is paid for once: an interrupted eval resumes with
what finished, and adding a policy later judges only its own questions. Each judgment is committed as it
arrives (SQLite transactions are atomic, so a killed run leaves whole rows only).
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

from sera_cli.data.cache_db import cache_errors
from sera_cli.data.hashing import digest

FILE = "judgments.sqlite"


def judgment_key(judge: dict[str, Any], template: str, messages: list[dict[str, str]]) -> str:
    return digest([judge, template, messages])


class JudgmentCache:
    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / FILE
        with cache_errors(self.path):
            self.db = sqlite3.connect(self.path)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("CREATE TABLE IF NOT EXISTS judgments (key TEXT PRIMARY KEY, judge TEXT, template "
                            "TEXT, text TEXT NOT NULL, at TEXT)")
            self.db.commit()

    def get_many(self, keys: list[str]) -> dict[str, str]:
        out: dict[str, str] = {}
        with cache_errors(self.path):
            for start in range(0, len(keys), 500):
                part = keys[start:start + 500]
                q = f"SELECT key, text FROM judgments WHERE key IN ({','.join('?' * len(part))})"
                out.update(self.db.execute(q, part).fetchall())
        return out

    def put(self, key: str, judge: str, template: str, text: str) -> None:
        with cache_errors(self.path):
            self.db.execute("INSERT OR REPLACE INTO judgments VALUES (?, ?, ?, ?, ?)",
                            (key, judge, template, text, time.strftime("%Y-%m-%dT%H:%M:%S")))
            self.db.commit()

    def close(self) -> None:
        self.db.close()
