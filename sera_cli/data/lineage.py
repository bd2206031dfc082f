"""Provenance across stages: each input file's identity and provenance, and facts looked up along the parents.

Every stage that derives a file stores, under `parents`, one entry per input file: that file's own provenance
(if it has one) plus `file` (its name) and `file_digest` (a hash of its bytes). A stage that computes log-probs
records their identities under `logps`; a stage that only moves rows (select, mix, sql, merge) records `logps`
only when every parent agrees on them, so the identity behind stored log-prob columns is resolved per input
file, and through every parent of a derived file, never taken from the first file alone.
"""

from __future__ import annotations

import os
from collections import deque
from typing import Any

from sera_cli.data import provenance
from sera_cli.data.hashing import digest, file_digest
from sera_cli.data.tables import STDIO, Inputs, read_schema


def entry(name: str, prov: dict[str, Any] | None, path: str | None = None) -> dict[str, Any]:
    """One parent: its provenance, its file name and (for a file on disk) the hash of its bytes."""
    out = dict(prov or {})
    out["file"] = name
    if path is not None and os.path.isfile(path):
        out["file_digest"] = file_digest(path)
    return out


def parents(inputs: Inputs) -> list[dict[str, Any]]:
    """One entry per input file, in input order, with or without provenance of its own."""
    return [entry(s.name, s.prov, None if s.name in ("<stdin>", STDIO) else s.name) for s in inputs.sources]


def of_file(path: str) -> dict[str, Any] | None:
    """A file as a parent entry (its provenance read from the Parquet footer only); None if it does not exist."""
    if not os.path.isfile(path):
        return None
    raw = (read_schema(path).metadata or {}).get(provenance.KEY) if path.endswith(".parquet") else None
    return entry(path, provenance.parse(raw, path), path)


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


def logps_sources(prov: dict[str, Any] | None, label: str) -> list[tuple[str, dict[str, Any] | None]]:
    """(file, log-prob identities) for every origin of a table's log-prob columns; None where unknown.

    A node that records `logps` made (or vouches for) them; otherwise each of its parents is asked, labelled
    with its own file name. A node with neither (a file sera did not write) is unknown.
    """
    if not prov:
        return [(label, None)]
    if isinstance(prov.get("logps"), dict):
        return [(label, prov["logps"])]
    found = [leaf for p in prov.get("parents") or [] for leaf in logps_sources(p, p.get("file") or label)]
    return found or [(label, None)]


def ref_sources(prov: dict[str, Any] | None, label: str) -> list[tuple[str, dict[str, Any] | None]]:
    """(file, reference log-prob identity) for every origin of a table's `logp_ref_*` columns; None: unknown."""
    return [(name, (logps or {}).get("ref")) for name, logps in logps_sources(prov, label)]


def common_logps(parent_list: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The log-prob identities every parent's columns share, or None when they differ or any is unknown.
    What a stage that only moves rows records as its own `logps`."""
    found = logps_sources({"parents": parent_list}, "")
    if any(logps is None for _, logps in found):
        return None
    distinct = {digest(logps): logps for _, logps in found}
    return next(iter(distinct.values())) if len(distinct) == 1 else None
