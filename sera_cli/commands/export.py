"""`sera export trl`: scored pairs in TRL's DPOTrainer columns, with the stored reference log-probs."""

from __future__ import annotations

from typing import Annotated

import typer

from sera_cli.commands import options as o


def export(
    target: Annotated[str, typer.Argument(help="Where the data goes: trl (TRL's DPOTrainer).", show_default=False)],
    inputs: o.InputsArg,
    output: o.OutputOpt = "-",
    drop_truncated: Annotated[bool, typer.Option(
        "--drop-truncated", help="Drop rows sera truncated (TRL truncates differently, so their stored numbers "
                                 "would not be TRL's) instead of refusing the file.")] = False,
    config_file: o.ConfigOpt = None,
) -> None:
    """Export scored pairs for another tool. `trl`: prompt, chosen, rejected, id and the reference log-probs as
    `ref_chosen_logps`/`ref_rejected_logps`; `sera_cli.backends.trl_trainer.StoredReferenceDPOTrainer` trains on
    them with no reference model loaded and no reference pass.

    Example: sera export trl scored.parquet -o trl.parquet
    """
    from sera_cli.data.console import console
    from sera_cli.stages.export import ExportConfig
    from sera_cli.stages.export import export as run

    summary = run(ExportConfig(inputs=tuple(inputs), output=output, target=target, drop_truncated=drop_truncated))
    dropped = f" ({summary.dropped:,} truncated rows dropped)" if summary.dropped else ""
    length = f"; they were scored with --max-length {summary.max_length}: use DPOConfig(max_length>= that)" \
        if summary.max_length else ""
    console.print(f"wrote {summary.rows:,} pairs with reference log-probs for TRL{dropped} -> {output}{length}",
                  soft_wrap=True)


def register(app: typer.Typer) -> None:
    from sera_cli.commands.edge import guarded

    app.command("export")(guarded(export))
