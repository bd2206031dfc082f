"""The eval summary as people read it: one row per model (rich table, markdown), and reading an eval folder back."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from sera_cli.data.errors import InputError

COLUMNS = [  # (header, summary column, format)
    ("model", "model", "s"), ("vs", "baseline", "s"), ("win rate", "win_rate", ".1%"),
    ("95% CI", None, ""), ("W/T/L", None, ""), ("LC win rate (length-controlled)", "lc_win_rate", ".1%"),
    ("mean grade", "mean_grade", ".2f"), ("mean length (chars)", "mean_length", ",.0f"),
    ("baseline length", "baseline_mean_length", ",.0f"), ("parse failures", "parse_failures", "d"),
]


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def table_rows(summary: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows; columns that are empty for every model (e.g. grades in pairwise mode) are left out."""
    single = all(r["mode"] == "single" for r in summary)
    pct = "" if single else "%"
    cells = []
    for r in summary:
        ci = "-" if r["ci_low"] is None else (
            f"{r['ci_low']:.2f}-{r['ci_high']:.2f}" if single else f"{r['ci_low']:.1%}-{r['ci_high']:.1%}")
        wtl = "-" if r["wins"] is None else f"{r['wins']}/{r['ties']}/{r['losses']}"
        special = {"95% CI": ci, "W/T/L": wtl}
        cells.append([special[head] if col is None else _fmt(r[col], spec) for head, col, spec in COLUMNS])
    keep = [i for i in range(len(COLUMNS)) if any(c[i] != "-" for c in cells) or i == 0]
    header = [COLUMNS[i][0] + (" (grade)" if COLUMNS[i][0] == "95% CI" and not pct else "") for i in keep]
    return header, [[c[i] for i in keep] for c in cells]


def rich_table(summary: list[dict[str, Any]], title: str = "sera eval"):
    from rich.table import Table

    header, body = table_rows(summary)
    judge = summary[0]["judge"] if summary else "-"
    table = Table(title=f"{title} (judge: {judge})", title_justify="left")
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i < 2 else "right")
    for row in body:
        table.add_row(*row)
    return table


def markdown(summary: list[dict[str, Any]]) -> str:
    header, body = table_rows(summary)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body]) + "\n"


def is_eval_folder(path: str | Path) -> bool:
    return (Path(path) / "summary.parquet").exists() and not (Path(path) / "run.json").exists()


def read_summary(folder: str | Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    path = Path(folder) / "summary.parquet"
    if not path.exists():
        raise InputError(str(folder), "has no summary.parquet: not a 'sera eval' output folder")
    return pq.read_table(path).to_pylist()
