"""`sera merge`: join the shards of one `--shard i/n` job into the file an unsharded run writes."""

from __future__ import annotations

from typing import Annotated

import typer

from sera_cli.commands.options import ConfigOpt, OutputOpt


def merge(
    shards: Annotated[list[str], typer.Argument(help="The shard files (or a glob), in any order.", show_default=False)],
    output: OutputOpt = "-",
    config_file: ConfigOpt = None,
) -> None:
    """Merge the shards of one 'sera score --shard i/n' (or 'sera generate --shard i/n') job, checked to be the
    same job, complete and disjoint, in shard order; the provenance keeps every shard.

    Example: sera merge scored-0.parquet scored-1.parquet scored-2.parquet -o scored.parquet
    """
    from sera_cli.data.console import console
    from sera_cli.stages.merge import MergeConfig
    from sera_cli.stages.merge import merge as run

    console.print(run(MergeConfig(shards=tuple(shards), output=output)).line(), soft_wrap=True)


def register(app: typer.Typer) -> None:
    from sera_cli.commands.edge import guarded

    app.command("merge")(guarded(merge))
