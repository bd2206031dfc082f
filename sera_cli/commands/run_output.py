"""What `sera run` and `sera demo` leave on stdout at the end: the report table, then one line naming the workdir
and three commands to try on it next. Progress and stage lines go to stderr (sera_cli.data.console), so
`sera demo > out.txt` keeps the report and nothing else."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path


def next_commands(workdir: Path) -> list[str]:
    """Three commands that work on this workdir's files: the report again, the IRM plot of the last scored file,
    and a SQL question about it (by flipped label where the data marks its flips)."""
    import pyarrow.parquet as pq

    scored = sorted(workdir.glob("iter-*/scored.parquet"), key=lambda p: int(p.parent.name.split("-")[1]))
    heldout = sorted(workdir.glob("iter-*/heldout_scored.parquet"), key=lambda p: int(p.parent.name.split("-")[1]))
    target = (scored or heldout or [workdir / "iter-1" / "heldout_scored.parquet"])[-1]
    view = target.stem
    try:
        columns = set(pq.read_schema(target).names)
    except (OSError, ValueError):
        columns = set()
    if "flipped" in columns:
        query = (f"SELECT flipped, count(*) AS pairs, round(avg(irm), 3) AS mean_irm FROM {view} "
                 "GROUP BY flipped ORDER BY flipped")
    else:
        query = f"SELECT irm > 0 AS positive, count(*) AS pairs FROM {view} GROUP BY 1 ORDER BY 1"
    w, t = shlex.quote(str(workdir)), shlex.quote(str(target))
    return [f"sera report {w}", f"sera inspect {t} --plot {shlex.quote(str(workdir / 'irm.png'))}",
            f"sera sql {shlex.quote(query)} {t}"]


def print_report(workdir: Path) -> None:
    """Write report.md and report.png into the workdir, print the table on stdout, then the closing line (plain,
    never wrapped): the folder and what to run next."""
    from rich.console import Console

    from sera_cli.data.console import console
    from sera_cli.stages.report import api as rep

    files = rep.write([str(workdir)])
    Console(highlight=False).print(rep.rich_table(files.reports))
    console.print(f"report: {files.markdown}, figure: {files.figure}")
    sys.stdout.write(f"wrote {workdir}/; try next: " + "  |  ".join(next_commands(workdir)) + "\n")
    sys.stdout.flush()
