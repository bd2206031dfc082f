"""`sera sql`: read-only DuckDB SQL over the named files, each a view named after its file stem."""

from __future__ import annotations

from typing import Annotated

import typer

from sera_cli.commands.options import JsonOpt


def sql(
    query: Annotated[str, typer.Argument(help="One SELECT query; each file is a view named after its stem.",
                                         show_default=False)],
    inputs: Annotated[list[str], typer.Argument(help="Parquet (or CSV/JSONL) files or globs.", show_default=False)],
    output: Annotated[str | None, typer.Option(
        "--output", "-o", help="Write the result to a .parquet, .csv or .jsonl file ('-': Parquet on stdout).")] = None,
    json: JsonOpt = False,
    max_rows: Annotated[int, typer.Option("--max-rows", help="Rows shown in the terminal table.", min=1)] = 40,
) -> None:
    """Query files with SQL (DuckDB). Read-only: the query sees only the named files (no other file, URL or
    extension) and writes nothing; -o must differ from every input.

    Example: sera sql "SELECT count(*) AS n, avg(irm) AS mean_irm FROM scored WHERE irm > 0" scored.parquet
    """
    from rich.console import Console

    from sera_cli.data.console import console
    from sera_cli.stages.sql import SqlConfig, as_json, render
    from sera_cli.stages.sql import sql as run

    config = SqlConfig(query=query, inputs=tuple(inputs), output=output, json=json, max_rows=max_rows)
    table = run(config)
    if config.json:
        print(as_json(table))
    elif config.output:
        console.print(f"wrote {table.num_rows:,} rows -> {config.output}", soft_wrap=True)
    else:
        out = Console(highlight=False)
        out.print(render(table, config.max_rows, out.width))


def register(app: typer.Typer) -> None:
    from sera_cli.commands.edge import guarded

    app.command("sql")(guarded(sql))
