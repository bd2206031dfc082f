"""`sera report`: a table, report.md and report.png for one run, or several side by side."""

from __future__ import annotations

from typing import Annotated

import typer


def report(
    workdirs: Annotated[list[str], typer.Argument(help="One or more `sera run` workdirs.", show_default=False)],
    output_dir: Annotated[str | None, typer.Option(
        "--output-dir", "-o", help="Where report.md and report.png go (default: the workdir; for several runs "
                                   "./sera-report).", show_default=False)] = None,
) -> None:
    """Report what each iteration of a `sera run` did; several workdirs go side by side.

    Per iteration: rows selected and generated, IRM statistics (and how well a low IRM finds flipped labels when the data has a `flipped` column), train loss and reward accuracy, held-out reward accuracy and the reward-length correlation. Prints a table and writes report.md and report.png.

    Example: sera report runs/sera runs/idpo -o compare
    """
    from sera_cli import report as rep
    from sera_cli.console import console

    files = rep.write(workdirs, output_dir)
    console.print(rep.rich_table(files.reports))
    console.print(f"wrote {files.markdown} and {files.figure}")


def register(app: typer.Typer) -> None:
    from sera_cli.app import guarded

    app.command("report")(guarded(report))
