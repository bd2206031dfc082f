"""`sera mix`: one iteration's training set from the top offline and generated pairs."""

from __future__ import annotations

from typing import Annotated

import typer

from sera_cli.commands.options import ConfigOpt, K1Opt, K2Opt, OutputOpt, SeedOpt


def mix(
    offline: Annotated[str, typer.Option("--offline", help="Scored (selected) offline pairs, Parquet.")],
    generated: Annotated[str | None, typer.Option(
        "--generated", help="Pairs built from generated candidates (sera select --pairs), Parquet.")] = None,
    output: OutputOpt = "-",
    k1: K1Opt = 0.7,
    k2: K2Opt = 0.3,
    n: Annotated[int | None, typer.Option(
        "--n", help="N, the size of the original offline set. Default: read from the offline file's provenance.",
        min=1)] = None,
    seed: SeedOpt = 0,
    iteration: Annotated[int, typer.Option("--iteration", help="Value of the 'iteration' column.", min=0)] = 1,
    allow_shortfall: Annotated[bool, typer.Option(
        "--allow-shortfall", help="Take all there is when a source has fewer pairs than asked, instead of "
                                  "failing.")] = False,
    config_file: ConfigOpt = None,
) -> None:
    """Mix the top k1*N offline pairs and the top k2*N generated pairs by IRM, de-duplicated and shuffled.

    Adds the columns 'source' (offline/generated) and 'iteration'. k1 + k2 may exceed 1.

    Example: sera mix --offline selected.parquet --generated generated.parquet --k1 0.7 --k2 0.3 -o train.parquet
    """
    from sera_cli.data.console import console
    from sera_cli.stages.mix import MixConfig
    from sera_cli.stages.mix import mix as run

    config = MixConfig(offline=offline, generated=generated, output=output, k1=k1, k2=k2, n=n, seed=seed,
                       iteration=iteration, allow_shortfall=allow_shortfall)
    s = run(config)
    p = s.plan
    short = p.short_offline + p.short_generated
    notes = [f"{p.duplicates:,} duplicates dropped"]
    if short:
        notes.append(f"short by {p.short_offline:,} offline and {p.short_generated:,} generated")
    if not s.same_scorer:
        notes.append("the inputs were scored by different models")
    console.print(f"wrote {s.rows:,} rows: {len(p.offline):,} offline (k1*N = {s.want_offline:,}) + "
                  f"{len(p.generated):,} generated (k2*N = {s.want_generated:,}), N = {s.n:,}; "
                  f"{'; '.join(notes)} -> {output}", soft_wrap=True)


def register(app: typer.Typer) -> None:
    from sera_cli.commands.edge import guarded

    app.command("mix")(guarded(mix))
