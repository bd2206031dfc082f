"""Options defined once, shared by every command that takes them."""

from __future__ import annotations

from typing import Annotated, Literal

import typer

from sera_cli.backends.engines import ENGINES
from sera_cli.backends.models import DEVICES, DTYPE_ALIASES, DTYPES  # noqa: F401  (listed once, where resolved)
from trainers.encode import MAX_LENGTH, MAX_PROMPT_LENGTH  # noqa: F401  (the length options' defaults)
from trainers.losses import REWARDS

InputsArg = Annotated[list[str], typer.Argument(
    help="Parquet file(s) or globs, .arrow files, datasets save_to_disk folders or Hub dataset names (org/name: "
         "the train split unless --split); '-' reads Parquet from stdin.", show_default=False)]
InputArg = Annotated[str, typer.Argument(help="A Parquet file; '-' reads it from stdin.", show_default=False)]
OutputOpt = Annotated[str, typer.Option("--output", "-o", help="Output Parquet file; without -o (or with '-') the "
                                        "Parquet goes to stdout, for a pipe or a redirect.", show_default=False)]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed, 0 to 2^53.")]
BetaOpt = Annotated[float, typer.Option("--beta", help="Implicit-reward scale beta (paper Eq. 5).", min=0.0)]
PolicyOpt = Annotated[str, typer.Option(
    "--policy", help="Policy: HF folder or Hub id (org/name[@revision], cache first), .gguf file, PEFT adapter "
                     "folder, or 'smollm2-135m' (embedded).")]
RefOpt = Annotated[str | None, typer.Option(
    "--ref", help="Reference model (same forms as --policy). Required for DPO rewards; never defaults to "
                  "the policy.")]
RevisionOpt = Annotated[str | None, typer.Option(
    "--revision", help="Hub revision (branch, tag or commit) of --policy: the same as --policy org/name@REV.")]
RefRevisionOpt = Annotated[str | None, typer.Option(
    "--ref-revision", help="Hub revision of --ref: the same as --ref org/name@REV.")]


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
    callback=check_dtype)]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.", callback=check_device)]
MaxLengthOpt = Annotated[int, typer.Option(
    "--max-length", help="Most tokens of prompt+response; responses are cut from the right.", min=2)]
MaxPromptLengthOpt = Annotated[int, typer.Option(
    "--max-prompt-length", help="Most prompt tokens when a row does not fit; cut from the left.", min=1)]
TrustRemoteCodeOpt = Annotated[bool, typer.Option(
    "--trust-remote-code", help="Allow model code from the model folder to run.")]
ChatTemplateOpt = Annotated[str | None, typer.Option(
    "--chat-template", help="Chat template for message rows: a Jinja file, or a model folder to take it from "
                            "(default: the tokenizer's own).")]
PrecisionCheckOpt = Annotated[int | None, typer.Option(
    "--precision-check", min=0,
    help="Rescore N random pairs (seed 0; for candidates, random prompts' max/min pairs) in float32 and record the "
         "IRM's sign agreement, median error and noise floor in the output's provenance (default: 32 when the dtype "
         "is not float32, else 0).")]
ResumeOpt = Annotated[bool, typer.Option(
    "--resume", help="Keep the finished chunks of an interrupted run with the same inputs and settings.")]
ShardOpt = Annotated[str | None, typer.Option(
    "--shard", help="i/n: process only the i-th of n disjoint slices (0-based), e.g. 0/4.")]
CacheOpt = Annotated[str | None, typer.Option(
    "--cache", help="Log-prob cache folder: rows already scored by the same model cost nothing.")]
RayOpt = Annotated[bool, typer.Option(
    "--ray", help="Run the chunks on an actor pool of this machine's Ray (the one 'ray start' made, else a new "
                  "one); needs pip install 'sera\\[ray]'.")]
RayAddressOpt = Annotated[str | None, typer.Option(
    "--ray-address", help="Run the chunks on the Ray cluster at ADDR: 'auto' (the cluster this machine joined), "
                          "or host:port.")]
RayActorsOpt = Annotated[int | None, typer.Option(
    "--ray-actors", help="Actors with --ray or --ray-address (default: one per GPU of the cluster, else 2).", min=1)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout (for machines).")]
K1Opt = Annotated[float, typer.Option(
    "--k1", help="Fraction of the offline set kept by IRM (paper section 3.2).", min=0.0)]
K2Opt = Annotated[float, typer.Option(
    "--k2", help="Fraction (of the offline set size N) of generated pairs kept by IRM (paper section 3.3).",
    min=0.0)]
SplitOpt = Annotated[str | None, typer.Option(
    "--split", help="The split of a Hub dataset input (default train); slices work, e.g. 'train[:1000]'.")]
SubsetOpt = Annotated[str | None, typer.Option(
    "--subset", help="The subset (config name) of a Hub dataset input.")]


def read_config(ctx: typer.Context, value: str | None) -> str | None:
    """`--config FILE.toml`: the file's settings (the option names, dashes or underscores) become the command's
    defaults, so defaults < config file < flags, as for `sera run --config`."""
    if value is None:
        return value
    import tomllib
    from pathlib import Path

    from sera_cli.data.tables import note_input

    note_input(value)  # an input of the command: no output may replace it
    try:
        raw = tomllib.loads(Path(value).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise typer.BadParameter(f"{value}: no such config file", param_hint="--config") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise typer.BadParameter(f"{value}: not valid TOML: {err}", param_hint="--config") from None
    names = {p.name for p in ctx.command.params if p.name != "config_file"}
    unknown = sorted(k for k in raw if k.replace("-", "_") not in names)
    if unknown:
        known = ", ".join(sorted(n.replace("_", "-") for n in names))
        raise typer.BadParameter(f"{value}: unknown setting(s) {', '.join(unknown)} (known: {known})",
                                 param_hint="--config")
    ctx.default_map = {**(ctx.default_map or {}), **{k.replace("-", "_"): v for k, v in raw.items()}}
    return value


ConfigOpt = Annotated[str | None, typer.Option(
    "--config", help="TOML file of option values; flags override it (each command's help gives an example).",
    callback=read_config, is_eager=True)]

IO, MODELS, REWARD, PERFORMANCE, RESUME = "Input/output", "Models", "Reward", "Performance", "Resume & sharding"


def panels(fn, groups: dict[str, tuple[str, ...]]):
    """`fn` (a command function) with its options shown in rich help panels, {title: parameter names}; the others
    stay under 'Options'. Each option's declaration is copied, so shared ones (`PolicyOpt`) are left as they are."""
    import copy
    import functools
    import inspect
    from typing import get_args, get_origin

    where = {name: title for title, names in groups.items() for name in names}
    signature = inspect.signature(fn, eval_str=True)
    params = []
    for p in signature.parameters.values():
        if p.name in where and get_origin(p.annotation) is Annotated:
            base, *meta = get_args(p.annotation)
            meta = [copy.copy(m) for m in meta]
            for m in meta:
                if hasattr(m, "rich_help_panel"):
                    m.rich_help_panel = where[p.name]
            p = p.replace(annotation=Annotated[(base, *meta)])
        params.append(p)
    unknown = set(where) - set(signature.parameters)
    if unknown:
        raise TypeError(f"{fn.__name__} has no parameter(s) {', '.join(sorted(unknown))}")  # a programming error

    @functools.wraps(fn)
    def command(*args, **kwargs):
        return fn(*args, **kwargs)

    command.__signature__ = signature.replace(parameters=params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    return command

Reward = Literal[tuple(REWARDS)]  # --reward: the implicit rewards of `trainers.losses`
Engine = Literal[ENGINES]  # --engine: `backends.engines.ENGINES`
