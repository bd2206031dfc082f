"""Content hashes: stable ids for rows and fingerprints for files and configs (xxh3-128, hex)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import xxhash


def digest(obj: Any) -> str:
    """Hash of a JSON-serialisable value; key order does not matter."""
    data = json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return xxhash.xxh3_128_hexdigest(data.encode())


def row_id(prompt: Any, chosen: Any, rejected: Any) -> str:
    """Stable id of a preference pair from its content (16 hex chars)."""
    return digest([prompt, chosen, rejected])[:16]


def file_digest(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    """Hash of a file's bytes (xxh3 streams at several GB/s, so large weights stay cheap)."""
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def tree_digest(folder: str | os.PathLike, suffixes: tuple[str, ...], of_file=None) -> str:
    """Hash of the files in a folder whose names end in one of `suffixes`, by name and content (each file's
    content digest by `of_file`, `file_digest` unless given: `backends.fingerprints` passes a memoised one)."""
    of_file = of_file or file_digest
    folder = Path(folder)
    parts = [(p.name, of_file(p)) for p in sorted(folder.iterdir()) if p.is_file() and p.name.endswith(suffixes)]
    return digest(parts)
