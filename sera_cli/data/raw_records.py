"""Reading raw records (one dict per row) from JSONL, JSON or Parquet files, gzipped or not, or JSONL on stdin."""

from __future__ import annotations

import gzip
import io
import json
import sys
from pathlib import Path
from typing import Any

from sera_cli.data.errors import InputError
from sera_cli.data.tables import STDIO


def _text(path: str) -> str:
    if path == STDIO:
        return sys.stdin.read()
    p = Path(path)
    if not p.exists():
        raise InputError(path, "no such file")
    if p.is_dir():
        raise InputError(path, "is a folder, not a data file")
    try:
        if path.endswith(".gz"):
            with gzip.open(p, "rt", encoding="utf-8") as f:
                return f.read()
        return p.read_text(encoding="utf-8")
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise InputError(path, f"cannot be read: {err}") from None


def _jsonl(path: str, text: str) -> list[dict[str, Any]]:
    rows = []
    for i, line in enumerate(io.StringIO(text)):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise InputError(path, f"not valid JSON: {err.msg} at character {err.pos}", row=i,
                             hint="JSONL needs one JSON object per line") from None
    return rows


def _json(path: str, text: str) -> list[dict[str, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(path, f"not valid JSON: {err.msg} at line {err.lineno}") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) == 1 and all(isinstance(r, dict) for r in lists[0]):
            return lists[0]  # {"data": [...]}
        if data and all(isinstance(v, list) for v in data.values()):
            lengths = {len(v) for v in data.values()}
            if len(lengths) == 1:  # columns: {"prompt": [...], "chosen": [...]}
                return [dict(zip(data, values, strict=True)) for values in zip(*data.values(), strict=True)]
        raise InputError(path, "is a JSON object, not a list of records", hint="expected [{...}, {...}]")
    if not isinstance(data, list):
        raise InputError(path, "is not a JSON list of records")
    return data


def read_records(path: str) -> list[dict[str, Any]]:
    """The rows of one file as dicts; row numbers in errors are 0-based line (JSONL) or record indices."""
    name = path.removesuffix(".gz")
    from sera_cli.data.arrow_data import is_dataset_folder
    from sera_cli.data.hub_data import is_dataset_name

    if name.endswith((".parquet", ".arrow")) or is_dataset_folder(path) or is_dataset_name(path):
        from sera_cli.data.tables import read_parquet

        rows = read_parquet(path).to_pylist()
    elif name.endswith(".json"):
        rows = _json(_name(path), _text(path))
    else:
        rows = _jsonl(_name(path), _text(path))
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise InputError(_name(path), f"is a {type(row).__name__}, not a JSON object", row=i)
    if not rows:
        raise InputError(_name(path), "has no rows")
    return rows


def _name(path: str) -> str:
    return "<stdin>" if path == STDIO else path
