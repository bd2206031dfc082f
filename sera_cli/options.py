"""Options defined once, shared by every command that takes them."""

from __future__ import annotations

from typing import Annotated

import typer

from trainers.encode import MAX_LENGTH, MAX_PROMPT_LENGTH  # noqa: F401  (the length options' defaults)

InputsArg = Annotated[list[str], typer.Argument(
    help="Parquet file(s) or globs; '-' reads Parquet from stdin.", show_default=False)]
InputArg = Annotated[str, typer.Argument(help="A Parquet file; '-' reads it from stdin.", show_default=False)]
OutputOpt = Annotated[str, typer.Option("--output", "-o", help="Output Parquet file; '-' writes to stdout.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed.")]
BetaOpt = Annotated[float, typer.Option("--beta", help="Implicit-reward scale beta (paper Eq. 5).", min=0.0)]
PolicyOpt = Annotated[str, typer.Option(
    "--policy", help="Policy: HF folder or Hub id (cache first), .gguf file, PEFT adapter folder, or 'smollm2-135m' (embedded).")]
RefOpt = Annotated[str | None, typer.Option(
    "--ref", help="Reference model (same forms as --policy). Required for DPO rewards; never defaults to "
                  "the policy.")]
DTYPES = ("auto", "float32", "bfloat16", "float16")
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
DEVICES = ("auto", "cpu", "cuda")


def choice(option: str, choices: tuple[str, ...], aliases: dict[str, str] | None = None):
    """A callback that accepts one of `choices` (or an alias of one, as TRL and vLLM spell them) and otherwise
    fails with a one-line usage error that lists the choices. `None` (not given) passes through."""

    def check(value):
        if value is None:
            return value
        v = (aliases or {}).get(str(value).lower(), str(value).lower())
        if v not in choices and not (option == "--device" and v.startswith("cuda:")):
            raise typer.BadParameter(f"{value!r} is not one of {', '.join(choices)}", param_hint=option)
        return v

    return check


check_dtype = choice("--dtype", DTYPES, DTYPE_ALIASES)
check_device = choice("--device", DEVICES)
DtypeOpt = Annotated[str, typer.Option(
    "--dtype", help="auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16 or float16 (bf16, fp16, fp32).",
    callback=check_dtype, metavar="DTYPE")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.", callback=check_device,
                                        metavar="DEVICE")]
MaxLengthOpt = Annotated[int, typer.Option(
    "--max-length", help="Most tokens of prompt+response; responses are cut from the right.", min=2)]
MaxPromptLengthOpt = Annotated[int, typer.Option(
    "--max-prompt-length", help="Most prompt tokens when a row does not fit; cut from the left.", min=1)]
TrustRemoteCodeOpt = Annotated[bool, typer.Option(
    "--trust-remote-code", help="Allow model code from the model folder to run.")]
ResumeOpt = Annotated[bool, typer.Option(
    "--resume", help="Keep the finished chunks of an interrupted run with the same inputs and settings.")]
ShardOpt = Annotated[str | None, typer.Option(
    "--shard", help="i/n: process only the i-th of n disjoint slices (0-based), e.g. 0/4.")]
CacheOpt = Annotated[str | None, typer.Option(
    "--cache", help="Log-prob cache folder: rows already scored by the same model cost nothing.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout (for machines).")]
K1Opt = Annotated[float, typer.Option(
    "--k1", help="Fraction of the offline set kept by IRM (paper section 3.2).", min=0.0)]
K2Opt = Annotated[float, typer.Option(
    "--k2", help="Fraction (of the offline set size N) of generated pairs kept by IRM (paper section 3.3).",
    min=0.0)]
