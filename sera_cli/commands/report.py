"""`sera report`: a table, report.md and report.png for one run, or several side by side."""

from __future__ import annotations

from typing import Annotated

import typer

from sera_cli.commands import options as o


def report(
    workdirs: Annotated[list[str], typer.Argument(help="One or more `sera run` workdirs, or `sera eval` output "
                                                  "folders (shown beside them).", show_default=False)],
    output_dir: Annotated[str | None, typer.Option(
        "--output-dir", "-o", help="Where report.md and report.png go (default: the workdir; for several runs "
                                   "./sera-report).", show_default=False)] = None,
    as_json: o.JsonOpt = False,
) -> None:
    """Report what each iteration of a `sera run` did; several workdirs go side by side.

    Per iteration: rows selected and generated, IRM statistics (and how well a low IRM finds flipped labels when the data has a `flipped` column), train loss and reward accuracy, held-out reward accuracy and the reward-length correlation. Prints a table on stdout (`--json`: the numbers as JSON) and writes report.md and report.png.

    An eval folder (`sera eval -o DIR`) prints its win-rate table beside the runs' tables; a run made with `--eval` shows its judge's win rate against pi_0 per iteration.

    Example: sera report runs/sera runs/idpo -o compare
    """
    import json

    from rich.console import Console

    from sera_cli.data.console import console
    from sera_cli.stages.eval.table import is_eval_folder, read_summary, rich_table
    from sera_cli.stages.report import api as rep

    out = Console(highlight=False)  # the report is the command's output: stdout, so `> r.txt` keeps it
    evals = [w for w in workdirs if is_eval_folder(w)]
    runs = [w for w in workdirs if w not in evals]
    files = rep.write(runs, output_dir) if runs else None
    if as_json:
        doc = {"runs": rep.as_json(files.reports) if files else [],
               "evals": {f: read_summary(f) for f in evals}}
        print(json.dumps(doc, indent=2, default=str))
    else:
        if files:
            out.print(rep.rich_table(files.reports))
        for folder in evals:
            out.print(rich_table(read_summary(folder), title=f"sera eval {folder}"))
    if files:
        console.print(f"wrote {files.markdown} and {files.figure}")


def register(app: typer.Typer) -> None:
    from sera_cli.commands.edge import guarded

    app.command("report")(guarded(report))
