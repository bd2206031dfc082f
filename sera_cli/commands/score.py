"""`sera score`: parse options, call `sera_cli.stages.score.api.score`, print one summary line."""

from __future__ import annotations

from typing import Annotated, Literal

import typer

from sera_cli.commands import options as o


def score_command(
    inputs: o.InputsArg,
    output: o.OutputOpt = "-",
    policy: o.PolicyOpt = "smollm2-135m",
    ref: o.RefOpt = None,
    revision: o.RevisionOpt = None,
    ref_revision: o.RefRevisionOpt = None,
    split: o.SplitOpt = None,
    subset: o.SubsetOpt = None,
    config_file: o.ConfigOpt = None,
    reward: Annotated[o.Reward, typer.Option("--reward", help="dpo: beta*(log pi - log pi_ref), summed (Eq. 5); "
                                        "ipo: the same averaged per token (the margin IPO trains on); simpo: beta/|y| * log pi, "
                                        "reference-free.")] = "dpo",
    beta: o.BetaOpt = 0.1,
    prev: Annotated[str | None, typer.Option("--prev", help="Scored file of the previous iteration: "
                                             "irm = lambda*irm_prev + (1-lambda)*irm_now (Eq. 7), joined on id; for candidates, "
                                             "the same on reward.")] = None,
    ensemble_lambda: Annotated[float, typer.Option("--ensemble-lambda", help="lambda of the IRM ensemble.")] = 0.3,
    prev_missing: Annotated[Literal["error", "current"], typer.Option("--prev-missing", help="Rows absent from --prev: 'error' or "
                                              "'current' (use the current IRM).")] = "error",
    dtype: o.DtypeOpt = "auto",
    precision_check: o.PrecisionCheckOpt = None,
    device: o.DeviceOpt = "auto",
    max_length: o.MaxLengthOpt = o.MAX_LENGTH,
    max_prompt_length: o.MaxPromptLengthOpt = o.MAX_PROMPT_LENGTH,
    batch_tokens: Annotated[int, typer.Option(
        "--batch-tokens", min=1,
        help="Padded tokens per forward batch (1024 is fastest on CPU; raise it on a GPU, e.g. 16384).")] = 1024,
    low_memory: Annotated[bool, typer.Option("--low-memory", help="Keep one model in memory at a time.")] = False,
    cache: o.CacheOpt = None,
    resume: o.ResumeOpt = False,
    shard: o.ShardOpt = None,
    chunk_rows: Annotated[int, typer.Option("--chunk-rows", help="Rows per resumable chunk.", min=1)] = 256,
    ray: o.RayOpt = False,
    ray_address: o.RayAddressOpt = None,
    ray_actors: o.RayActorsOpt = None,
    trust_remote_code: o.TrustRemoteCodeOpt = False,
    chat_template: o.ChatTemplateOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Score preference pairs (or candidates) with implicit rewards: log-probs, rewards and IRM per row.

    Example: sera score pairs.parquet --policy pi1/ --ref smollm2-135m -o scored.parquet
    """
    from sera_cli.backends.chat_templates import use_chat_template

    use_chat_template(chat_template)
    from sera_cli.backends.hub import with_revision
    from sera_cli.data.chunk_store import parse_shard
    from sera_cli.data.console import console
    from sera_cli.data.errors import ConfigError
    from sera_cli.data.hub_data import with_split
    from sera_cli.parallel.ray_pool import address
    from sera_cli.stages.score.api import score
    from sera_cli.stages.score.config import ScoreConfig

    if prev_missing not in ("error", "current"):
        raise ConfigError(f"--prev-missing {prev_missing}: expected error or current")
    policy, ref = with_revision(policy, revision), with_revision(ref, ref_revision, "--ref-revision", "--ref")
    config = ScoreConfig(inputs=with_split(inputs, split, subset), output=output, policy=policy, ref=ref,
                         reward=reward, beta=beta,
                         prev=prev, ensemble_lambda=ensemble_lambda, prev_missing=prev_missing, dtype=dtype,
                         precision_check=precision_check, device=device, max_length=max_length, max_prompt_length=max_prompt_length,
                         batch_tokens=batch_tokens, low_memory=low_memory, cache=cache, resume=resume,
                         shard=parse_shard(shard), chunk_rows=chunk_rows, trust_remote_code=trust_remote_code,
                         progress=not quiet, ray_address=address(ray, ray_address), ray_actors=ray_actors)
    if line := score(config).line():  # empty on the other ranks of a launch
        console.print(line, soft_wrap=True)


PANELS = {
    o.IO: ("output", "split", "subset", "config_file", "quiet"),
    o.MODELS: ("policy", "ref", "revision", "ref_revision", "max_length", "max_prompt_length", "trust_remote_code",
               "chat_template"),
    o.REWARD: ("reward", "beta", "prev", "ensemble_lambda", "prev_missing"),
    o.PERFORMANCE: ("dtype", "precision_check", "device", "batch_tokens", "low_memory", "cache"),
    o.RESUME: ("resume", "shard", "chunk_rows", "ray", "ray_address", "ray_actors"),
}


def register(app: typer.Typer) -> None:
    from sera_cli.commands.edge import guarded

    app.command("score")(guarded(o.panels(score_command, PANELS)))
