"""`sera generate`: parse options, call `sera_cli.stages.generate.api.generate`, print one summary line."""

from __future__ import annotations

from typing import Annotated

import typer

from sera_cli.commands import options as o
from sera_cli.stages.generate.config import CACHE_TOKENS


def generate_command(
    inputs: o.InputsArg,
    output: o.OutputOpt = "-",
    policy: o.PolicyOpt = "smollm2-135m",
    revision: o.RevisionOpt = None,
    split: o.SplitOpt = None,
    subset: o.SubsetOpt = None,
    config_file: o.ConfigOpt = None,
    n: Annotated[int, typer.Option("--n", help="Distinct responses per prompt (paper: 4).", min=1)] = 4,
    temperature: Annotated[float, typer.Option("--temperature", help="Sampling temperature (paper: 0.7).",
                                               min=0.0)] = 0.7,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass (paper: 0.95).")] = 0.95,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Most new tokens per response.",
                                                min=1)] = 512,
    seed: o.SeedOpt = 0,
    max_redraws: Annotated[int, typer.Option("--max-redraws", help="Rounds of re-drawing for prompts whose "
                                             "responses repeat (or are empty); what is still missing is reported.",
                                             min=0)] = 3,
    engine: Annotated[o.Engine, typer.Option("--engine", help="hf (transformers), vllm, or auto: vllm where it is "
                                        "installed and a GPU is present, else hf.")] = "auto",
    dtype: o.DtypeOpt = "auto",
    device: o.DeviceOpt = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Sequences per decoding batch (hf engine; 256 = a "
                                            "default chunk of 64 prompts x 4; the samples do not depend on it).",
                                            min=1)] = 256,
    cache_tokens: Annotated[int, typer.Option(
        "--cache-tokens", help="Most key/value positions a decoding batch holds (hf engine): rows x (longest "
        "prompt + --max-new-tokens); batches of long prompts get fewer rows.", min=1)] = CACHE_TOKENS,
    tensor_parallel_size: Annotated[int, typer.Option("--tensor-parallel-size", help="GPUs to split the model "
                                                      "over (vllm engine).", min=1)] = 1,
    gpu_memory_utilization: Annotated[float | None, typer.Option(
        "--gpu-memory-utilization", help="Share of memory vLLM may take (default 0.9 on a GPU, 0.3 on CPU).")] = None,
    enforce_eager: Annotated[bool, typer.Option("--enforce-eager", help="vllm: skip graph compilation (faster "
                                                "start, slower generation).")] = False,
    chunk_prompts: Annotated[int, typer.Option("--chunk-prompts", help="Prompts per resumable chunk; batches "
                                               "never cross chunks.", min=1)] = 64,
    resume: o.ResumeOpt = False,
    shard: o.ShardOpt = None,
    score: Annotated[bool, typer.Option("--score", help="Also score every response (as 'sera score' does): "
                                        "logp_policy, logp_ref, ntok, reward.")] = False,
    ref: o.RefOpt = None,
    ref_revision: o.RefRevisionOpt = None,
    reward: Annotated[o.Reward, typer.Option("--reward", help="With --score: dpo (needs --ref), ipo (dpo averaged per token) or simpo.")] = "dpo",
    beta: o.BetaOpt = 0.1,
    max_length: o.MaxLengthOpt = o.MAX_LENGTH,
    max_prompt_length: o.MaxPromptLengthOpt = o.MAX_PROMPT_LENGTH,
    cache: o.CacheOpt = None,
    precision_check: o.PrecisionCheckOpt = None,
    prev_policy: Annotated[str | None, typer.Option(
        "--prev-policy",
        help="With --score: the previous iteration's policy; each reward becomes lambda * r_prev + (1 - lambda) "
             "* r_now, r_prev under (--prev-policy, --prev-ref) (SeRA Eq. 7 on generated samples).")] = None,
    prev_ref: Annotated[str | None, typer.Option(
        "--prev-ref", help="With --prev-policy: the previous iteration's reference.")] = None,
    ensemble_lambda: Annotated[float, typer.Option(
        "--ensemble-lambda", help="lambda of the ensemble with --prev-policy.")] = 0.3,
    ray: o.RayOpt = False,
    ray_address: o.RayAddressOpt = None,
    ray_actors: o.RayActorsOpt = None,
    trust_remote_code: o.TrustRemoteCodeOpt = False,
    chat_template: o.ChatTemplateOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Sample N distinct responses per prompt from the policy: one row per response (a candidates table).

    Example: sera generate prompts.parquet --policy pi1/ --n 4 --seed 1 -o candidates.parquet
    """
    from sera_cli.backends.chat_templates import use_chat_template

    use_chat_template(chat_template)
    from sera_cli.backends.hub import with_revision
    from sera_cli.data.chunk_store import parse_shard
    from sera_cli.data.console import console
    from sera_cli.data.hub_data import with_split
    from sera_cli.parallel.ray_pool import address
    from sera_cli.stages.generate.api import generate
    from sera_cli.stages.generate.config import GenerateConfig

    policy, ref = with_revision(policy, revision), with_revision(ref, ref_revision, "--ref-revision", "--ref")
    config = GenerateConfig(
        inputs=with_split(inputs, split, subset), output=output, policy=policy, engine=engine, n=n, temperature=temperature, top_p=top_p,
        max_new_tokens=max_new_tokens, seed=seed, max_redraws=max_redraws, dtype=dtype, device=device,
        batch_size=batch_size, cache_tokens=cache_tokens, tensor_parallel_size=tensor_parallel_size,
        gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager, chunk_prompts=chunk_prompts,
        resume=resume, shard=parse_shard(shard), trust_remote_code=trust_remote_code, progress=not quiet,
        score=score, ref=ref, reward=reward, beta=beta, max_length=max_length, max_prompt_length=max_prompt_length,
        cache=cache, ray_address=address(ray, ray_address), ray_actors=ray_actors, precision_check=precision_check,
        prev_policy=prev_policy, prev_ref=prev_ref, ensemble_lambda=ensemble_lambda)
    if line := generate(config).line():  # empty on the other ranks of a launch
        console.print(line, soft_wrap=True)


PANELS = {
    o.IO: ("output", "split", "subset", "config_file", "quiet"),
    o.MODELS: ("policy", "revision", "max_length", "max_prompt_length", "trust_remote_code", "chat_template"),
    "Sampling": ("n", "temperature", "top_p", "max_new_tokens", "seed", "max_redraws"),
    o.REWARD: ("score", "ref", "ref_revision", "reward", "beta", "prev_policy", "prev_ref", "ensemble_lambda",
               "precision_check"),
    o.PERFORMANCE: ("engine", "dtype", "device", "batch_size", "cache_tokens", "tensor_parallel_size",
                    "gpu_memory_utilization", "enforce_eager", "cache"),
    o.RESUME: ("chunk_prompts", "resume", "shard", "ray", "ray_address", "ray_actors"),
}


def register(app: typer.Typer) -> None:
    from sera_cli.commands.edge import guarded

    app.command("generate")(guarded(o.panels(generate_command, PANELS)))
