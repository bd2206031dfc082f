"""`sera convert`: HH-RLHF, UltraFeedback or prompt/chosen/rejected files into the pairs table."""

from __future__ import annotations

from typing import Annotated, Literal

import typer

from sera_cli.commands.options import ConfigOpt, OutputOpt, SeedOpt, SplitOpt, SubsetOpt

SHOWN_ROWS = 5
LAYOUTS = Literal["auto", "hh", "ultrafeedback", "plain", "implicit"]  # "auto" and convert_layouts.READERS
FORMATS = Literal["auto", "conversational", "standard"]


def convert(
    inputs: Annotated[list[str], typer.Argument(
        help="JSONL, JSON or Parquet files (gzip allowed) or globs, .arrow files, datasets save_to_disk folders, "
             "or Hub dataset names (org/name, see --split); '-' reads JSONL from stdin.", show_default=False)],
    output: OutputOpt = "-",
    layout: Annotated[LAYOUTS, typer.Option(
        "--layout", help="Input layout: auto, hh (HH-RLHF dialogues), ultrafeedback (message lists), plain "
                         "(prompt/chosen/rejected strings) or implicit (chosen/rejected strings that begin with "
                         "the prompt, as TRL's implicit-prompt datasets).")] = "auto",
    format: Annotated[FORMATS, typer.Option(
        "--format", help="Output texts: auto (messages for hh and ultrafeedback, strings for plain), "
                         "conversational ({role, content} message lists) or standard (strings).")] = "auto",
    flip: Annotated[float | None, typer.Option(
        "--flip", help="Swap chosen and rejected in this fraction of rows (drawn with --seed) and mark them in a "
                       "'flipped' column, for noisy-label experiments.")] = None,
    seed: SeedOpt = 0,
    split: SplitOpt = None,
    subset: SubsetOpt = None,
    config_file: ConfigOpt = None,
) -> None:
    """Convert preference data to the pairs table: prompt, chosen, rejected, id (plus kept fields such as
    score_chosen/score_rejected). HH-RLHF rows whose two dialogues differ before the last turn are skipped and
    reported.

    Example: sera convert hh-rlhf/helpful-base/test.jsonl.gz -o pairs.parquet

    Example: sera convert train_clean.jsonl --flip 0.2 --seed 0 -o noisy.parquet

    Example: sera convert trl-lib/ultrafeedback_binarized --split test -o pairs.parquet
    """
    from sera_cli.data.console import console
    from sera_cli.data.hub_data import with_split
    from sera_cli.stages.convert import ConvertConfig
    from sera_cli.stages.convert import convert as run

    config = ConvertConfig(inputs=with_split(inputs, split, subset), output=output, layout=layout, format=format,
                           flip=flip, seed=seed)
    summary = run(config)
    for report in summary.files:
        console.print(f"{report.file}: {_n(report.rows, 'row')} ({report.layout}) -> {_n(report.kept, 'pair')}",
                      soft_wrap=True)
        for why, rows in report.skipped.items():
            shown = ", ".join(str(r) for r in rows[:SHOWN_ROWS]) + (", ..." if len(rows) > SHOWN_ROWS else "")
            console.print(f"  skipped {_n(len(rows), 'row')} {why} (rows {shown})", soft_wrap=True)
    flipped = f", {summary.flipped:,} flipped" if config.flip is not None else ""
    console.print(f"wrote {summary.rows:,} {summary.format} pair{'s' * (summary.rows != 1)}{flipped} -> {output}",
                  soft_wrap=True)


def _n(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'s' * (count != 1)}"


def register(app: typer.Typer) -> None:
    from sera_cli.commands.edge import guarded

    app.command("convert")(guarded(convert))
