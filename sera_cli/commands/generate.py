"""`sera generate`: parse options, call `sera_cli.generation.run.generate`, print one summary line."""

from __future__ import annotations

from typing import Annotated

import typer

from sera_cli import options as o


def generate_command(
    inputs: o.InputsArg,
    output: o.OutputOpt = "-",
    policy: o.PolicyOpt = "smollm2-135m",
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
    engine: Annotated[str, typer.Option("--engine", help="hf (transformers), vllm, or auto: vllm where it is "
                                        "installed and a GPU is present, else hf.")] = "auto",
    dtype: o.DtypeOpt = "auto",
    device: o.DeviceOpt = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Sequences per generate call (hf engine).",
                                            min=1)] = 64,
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
    reward: Annotated[str, typer.Option("--reward", help="With --score: dpo (needs --ref), ipo (dpo averaged per token) or simpo.")] = "dpo",
    beta: o.BetaOpt = 0.1,
    max_length: o.MaxLengthOpt = o.MAX_LENGTH,
    max_prompt_length: o.MaxPromptLengthOpt = o.MAX_PROMPT_LENGTH,
    cache: o.CacheOpt = None,
    trust_remote_code: o.TrustRemoteCodeOpt = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Sample N distinct responses per prompt from the policy: one row per response (a candidates table).

    Example: sera generate prompts.parquet --policy pi1/ --n 4 --seed 1 -o candidates.parquet
    """
    from sera_cli.chunk_store import parse_shard
    from sera_cli.console import console
    from sera_cli.generation.config import GenerateConfig
    from sera_cli.generation.run import generate

    config = GenerateConfig(
        inputs=tuple(inputs), output=output, policy=policy, engine=engine, n=n, temperature=temperature, top_p=top_p,
        max_new_tokens=max_new_tokens, seed=seed, max_redraws=max_redraws, dtype=dtype, device=device,
        batch_size=batch_size, tensor_parallel_size=tensor_parallel_size,
        gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager, chunk_prompts=chunk_prompts,
        resume=resume, shard=parse_shard(shard), trust_remote_code=trust_remote_code, progress=not quiet,
        score=score, ref=ref, reward=reward, beta=beta, max_length=max_length, max_prompt_length=max_prompt_length,
        cache=cache)
    console.print(generate(config).line(), soft_wrap=True)


def register(app: typer.Typer) -> None:
    from sera_cli.app import guarded

    app.command("generate")(guarded(generate_command))
