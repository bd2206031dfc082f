"""`sera inspect`: what the margins of a scored file say (distribution, accuracy, length bias, flips)."""

from __future__ import annotations

from typing import Annotated

import typer

from sera_cli.commands.options import InputsArg, JsonOpt, K1Opt


def inspect(
    inputs: InputsArg,
    k1: K1Opt = 0.7,
    bins: Annotated[int, typer.Option("--bins", help="Histogram bins.", min=1)] = 20,
    plot: Annotated[str | None, typer.Option(
        "--plot", help="Also draw the histogram and the IRM-vs-length scatter to this PNG file.")] = None,
    json: JsonOpt = False,
) -> None:
    """Describe a scored file: IRM quantiles and histogram, reward accuracy, Spearman correlation with the
    length difference, and how well IRM finds flipped labels (AUROC) when a 'flipped' column or
    score_chosen/score_rejected exist.

    Example: sera inspect scored.parquet --plot irm.png
    """
    import json as json_lib

    from sera_cli.data.console import console
    from sera_cli.stages.inspect.api import InspectConfig, render
    from sera_cli.stages.inspect.api import inspect as run

    config = InspectConfig(inputs=tuple(inputs), k1=k1, bins=bins, plot=plot)
    report = run(config)
    if json:
        print(json_lib.dumps(report))
    else:
        print("\n".join(render(report)))
    if plot:
        console.print(f"plot -> {plot}", soft_wrap=True)


def register(app: typer.Typer) -> None:
    from sera_cli.commands.edge import guarded

    app.command("inspect")(guarded(inspect))
