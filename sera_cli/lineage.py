"""Provenance across stages: the provenance of each input file, and facts looked up along the chain of parents."""

from __future__ import annotations

import json
from collections import deque
from typing import Any

import pyarrow.parquet as pq

from sera_cli import provenance
from sera_cli.io import STDIO, Inputs


def parents(inputs: Inputs) -> list[dict[str, Any]]:
    """The provenance of every input file that has one (stdin: the table's own), in input order."""
    found = []
    for source in inputs.sources:
        if source.name == "<stdin>" or source.name == STDIO:
            prov = provenance.read(inputs.table)
        else:
            prov = of_file(source.name)
        if prov is not None:
            found.append(prov)
    return found


def of_file(path: str) -> dict[str, Any] | None:
    """The provenance of a Parquet file, read from its footer only; None for other files or none stored."""
    if not path.endswith(".parquet"):
        return None
    raw = (pq.read_schema(path).metadata or {}).get(provenance.KEY)
    return json.loads(raw) if raw else None


def find(prov: dict[str, Any] | list | None, key: str) -> Any:
    """The value of `key` in `prov` or, breadth first, in its parents (under "parents"); None if absent."""
    queue: deque = deque([prov])
    while queue:
        node = queue.popleft()
        if isinstance(node, list):
            queue.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        if node.get(key) is not None:
            return node[key]
        queue.append(node.get("parents"))
    return None
