"""Where people-facing output goes: stderr, so stdout stays free for Parquet in pipelines."""

from __future__ import annotations

from rich.console import Console

console = Console(stderr=True, highlight=False)
