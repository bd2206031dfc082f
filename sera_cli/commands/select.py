"""`sera select`: keep the scored pairs with the largest IRM, or build max-IRM pairs from scored candidates."""

from __future__ import annotations

from typing import Annotated

import typer

from sera_cli.commands.options import ConfigOpt, InputsArg, OutputOpt


def select(
    inputs: InputsArg,
    output: OutputOpt = "-",
    top: Annotated[float | None, typer.Option(
        "--top", help="Keep this fraction of the rows with the largest IRM (paper: k1 = 0.7).")] = None,
    count: Annotated[int | None, typer.Option("--count", help="Keep this many rows instead.", min=0)] = None,
    min_irm: Annotated[float | None, typer.Option(
        "--min-irm", help="Also drop rows whose score is below this value.")] = None,
    by: Annotated[str, typer.Option("--by", help="Column to rank by.")] = "irm",
    drop_ties: Annotated[bool, typer.Option(
        "--drop-ties", help="Also drop rows whose score is exactly 0 (for example chosen == rejected).")] = False,
    pairs: Annotated[bool, typer.Option(
        "--pairs", help="Input is scored candidates: build per prompt the pair with the largest IRM "
                        "(highest vs lowest reward) first; --top then keeps the best k2 fraction.")] = False,
    config_file: ConfigOpt = None,
) -> None:
    """Keep the rows with the largest implicit-reward margin (IRM); ties broken by id; rows keep their order.

    Example: sera select scored.parquet --top 0.7 -o selected.parquet

    Example: sera select candidates-scored.parquet --pairs --top 0.3 -o generated.parquet
    """
    from sera_cli.data.console import console
    from sera_cli.stages.select.api import SelectConfig
    from sera_cli.stages.select.api import select as run

    config = SelectConfig(inputs=tuple(inputs), output=output, top=top, count=count, min_irm=min_irm, by=by,
                          drop_ties=drop_ties, pairs=pairs)
    summary = run(config)
    built = ""
    if summary.pairs is not None:
        p = summary.pairs
        built = (f"built {p.pairs:,} pairs from {p.prompts:,} prompts (dropped {p.too_few:,} with fewer than two "
                 f"distinct responses, {p.all_equal:,} with all rewards equal); ")
    if summary.warning:
        console.print(summary.warning, soft_wrap=True)
    cut = f" ({config.by} >= {summary.choice.cutoff:.4g})" if summary.choice.cutoff is not None else ""
    console.print(f"{built}kept {summary.rows_out:,} of {summary.rows_in:,} rows{cut} -> {output}", soft_wrap=True)


def register(app: typer.Typer) -> None:
    from sera_cli.commands.edge import guarded

    app.command("select")(guarded(select))
