"""`sera run`: the SeRA loop (or a baseline) in a resumable workdir, ending with the report; `sera demo`."""

from __future__ import annotations

import warnings
from typing import Annotated, Any, Literal

import typer

from sera_cli.backends.trackers import TRACKERS
from sera_cli.commands import options as o
from sera_cli.stages.eval.config import MODES
from sera_cli.stages.run.config import METHODS
from trainers.losses import LOSSES

Int = int | None
Float = float | None
Str = str | None
# fixed choices, typed as choices, from their one home each
Method = Literal[METHODS]
Loss = Literal[tuple(LOSSES)]
Engine = o.Engine
EvalMode = Literal[MODES]


def _opt(flag: str, help: str, **kw: Any):
    """An option whose help ends with its default (from RunConfig, so help and behaviour cannot drift)."""
    from sera_cli.stages.run.config import DEMO_PRESET, RunConfig

    name = flag.split("/")[0].removeprefix("--").replace("-", "_")
    if hasattr(RunConfig, name):
        default = getattr(RunConfig, name)
        shown = {True: "on", False: "off", None: "none"}.get(default, default) if isinstance(default, bool | None) \
            else default
        demo = f"; demo {DEMO_PRESET[name]}" if DEMO_PRESET.get(name, default) != default else ""
        help = f"{help} (default {shown}{demo})"
    return typer.Option(flag, help=help, show_default=False, **kw)


def run(
    data: Annotated[list[str] | None, typer.Argument(
        help="Offline preference pairs (Parquet files or globs, or Hub dataset names org/name, see --split). "
             "None: the embedded demo set.", show_default=False)] = None,
    split: o.SplitOpt = None,
    subset: o.SubsetOpt = None,
    config: Annotated[Str, _opt("--config", "TOML file with any of these settings; flags override it.")] = None,
    method: Annotated[Method | None, _opt("--method", "sera, sera-select (k2 = 0), iterative-dpo or dpo.")] = None,
    policy: Annotated[Str, _opt("--policy", "pi_0, the SFT policy: HF folder, Hub id, .gguf, adapter or "
                                            "'smollm2-135m'.")]
    = None,
    revision: Annotated[Str, _opt("--revision", "Hub revision of --policy: the same as --policy org/name@REV.")] = None,
    workdir: Annotated[Str, _opt("--workdir", "Where every stage's output is kept. A rerun skips the stages that are up to date.")] = None,
    iterations: Annotated[Int, _opt("--iterations", "Iterations T.")] = None,
    k1: Annotated[Float, _opt("--k1", "Fraction of the offline rows kept by IRM each iteration.")]
    = None,
    k2: Annotated[Float, _opt("--k2", "Generated pairs kept, as a fraction of the offline rows.")]
    = None,
    n: Annotated[Int, _opt("--n", "Responses generated per prompt.")] = None,
    ensemble_lambda: Annotated[Float, _opt("--ensemble-lambda", "Weight of the previous IRM in the ensemble (Eq. 7).")]
    = None,
    loss: Annotated[Loss | None, _opt("--loss", "dpo, ipo, slic, simpo, cdpo or rdpo.")] = None,
    beta: Annotated[Float, _opt("--beta", "Implicit-reward scale beta.")] = None,
    eps: Annotated[Float, _opt("--eps", "cdpo and rdpo: the assumed label-flip rate.")] = None,
    cross_fit: Annotated[Int, _opt("--cross-fit", "Cross-fitted IRM: score each of K folds of the offline data "
                                                  "with a model trained without it (0: in-sample, as the paper).")]
    = None,
    heldout: Annotated[Float, _opt("--heldout", "Fraction of the data held out for evaluation.")]
    = None,
    rows: Annotated[Int, _opt("--rows", "Use a seeded sample of this many offline rows.")] = None,
    seed: Annotated[Int, _opt("--seed", "Random seed.")] = None,
    gen_prompts: Annotated[Int, _opt("--gen-prompts", "Generate for a seeded sample of this many training "
                                                      "prompts per iteration (none: all).")] = None,
    max_new_tokens: Annotated[Int, _opt("--max-new-tokens", "Most tokens per generated response.")]
    = None,
    temperature: Annotated[Float, _opt("--temperature", "Sampling temperature.")] = None,
    top_p: Annotated[Float, _opt("--top-p", "Nucleus sampling mass.")] = None,
    engine: Annotated[Engine | None, _opt("--engine", "Generation engine: auto, hf or vllm.")] = None,
    lr: Annotated[Float, _opt("--lr", "Learning rate.")] = None,
    batch_size: Annotated[Int, _opt("--batch-size", "Pairs per optimizer step.")] = None,
    micro_batch: Annotated[Int, _opt("--micro-batch", "Pairs per forward pass.")] = None,
    epochs: Annotated[Int, _opt("--epochs", "Epochs per iteration.")] = None,
    lora_r: Annotated[Int, _opt("--lora-r", "LoRA rank; 0 is full fine-tuning.")] = None,
    report_to: Annotated[Str, _opt("--report-to", f"Log each train stage's steps to {', '.join(TRACKERS[1:])} or "
                                                  "none, as 'sera train --report-to'.",
                                   callback=o.choice("--report-to", TRACKERS))] = None,
    logging_dir: Annotated[Str, _opt("--logging-dir", "The trackers' folder, one subfolder per train stage "
                                                      "(none: beside each model).")] = None,
    dtype: Annotated[Str, _opt("--dtype", "dtype of every model (scoring, generation, training): auto "
                                          "(float32 on CPU), float32, bfloat16 or float16.", callback=o.check_dtype)] = None,
    precision_check: Annotated[Int, _opt("--precision-check", "Score stages: rescore N random pairs in float32 "
                                                              "and record the IRM's noise floor (none: 32 unless "
                                                              "the dtype is float32).")] = None,
    device: Annotated[Str, _opt("--device", "auto, cpu, cuda or cuda:N.", callback=o.check_device)] = None,
    max_length: Annotated[Int, _opt("--max-length", "Most tokens of prompt+response.")] = None,
    max_prompt_length: Annotated[Int, _opt("--max-prompt-length", "Most prompt tokens.")] = None,
    batch_tokens: Annotated[Int, _opt("--batch-tokens", "Padded tokens per scoring batch.")] = None,
    cache: Annotated[bool | None, _opt("--cache/--no-cache", "Share a log-prob cache across stages.")]
    = None,
    ray: Annotated[bool, typer.Option("--ray", help="Run the score and generate stages on this machine's Ray "
                                                    "(as 'sera score --ray').")] = False,
    ray_address: Annotated[Str, _opt("--ray-address", "Run the score and generate stages on the Ray cluster at "
                                                      "ADDR (as 'sera score --ray-address').")] = None,
    ray_actors: Annotated[Int, _opt("--ray-actors", "Actors of the Ray stages (none: one per GPU, else 2).")] = None,
    eval: Annotated[Str, _opt("--eval", "Prompts file (as for 'sera eval --prompts'): judge pi_t against pi_0 "
                                        "at the end of each iteration.")] = None,
    judge: Annotated[Str, _opt("--judge", "Judge for --eval: a local chat model (HF folder, .gguf, "
                                          "'smollm2-135m').")] = None,
    judge_url: Annotated[Str, _opt("--judge-url", "Judge for --eval: an OpenAI-compatible endpoint.")] = None,
    judge_model: Annotated[Str, _opt("--judge-model", "The model name --judge-url serves.")] = None,
    eval_mode: Annotated[EvalMode | None, _opt("--eval-mode", "pairwise (win rate against pi_0) or single (1-10).")] = None,
    eval_max_new_tokens: Annotated[Int, _opt("--eval-max-new-tokens", "Most new tokens per evaluated answer.")]
    = None,
    judge_max_tokens: Annotated[Int, _opt("--judge-max-tokens", "Most tokens of a judge's reply.")] = None,
    report: Annotated[bool, typer.Option("--report/--no-report", help="Print and write the report at the end.")]
    = True,
    chat_template: o.ChatTemplateOpt = None,
) -> None:
    """Run SeRA (Algorithm 1) or a baseline for T iterations in a resumable workdir, then print the report.

    Iteration 1 trains pi_1 from the SFT policy on the offline data. Each later iteration scores the offline data with (pi_{t-1}, pi_{t-2}), keeps the top k1 by IRM, generates N responses per prompt with pi_{t-1}, keeps the top k2 max-IRM pairs, mixes them and trains pi_t from pi_{t-1} with reference pi_{t-1}. A rerun skips every stage that is up to date.

    With no data it runs the embedded demo: SmolLM2-135M on 240 short questions with 20% flipped labels, with the settings of sera_cli/demo/sera-demo.toml.

    Example: sera run pairs.parquet --iterations 3 --k1 0.7 --k2 0.3 --workdir runs/sera

    Example: sera run --config sera.toml --method iterative-dpo --workdir runs/idpo

    Example: sera run trl-lib/ultrafeedback_binarized --split 'train[:2000]' --workdir runs/uf
    """
    from sera_cli.backends.chat_templates import use_chat_template
    from sera_cli.backends.hub import with_revision
    from sera_cli.parallel.ray_pool import address

    use_chat_template(chat_template)
    flags = {k: v for k, v in locals().items() if k not in ("config", "report", "revision", "with_revision", "ray",
                                                            "address", "chat_template", "use_chat_template")}
    flags["data"] = tuple(data) if data else None
    flags["ray_address"] = address(ray, ray_address)
    flags["policy"] = with_revision(policy, revision)
    _run(config, flags, report)


def demo(
    workdir: Annotated[str, typer.Option("--workdir", help="Where the demo keeps its files.")] = "sera-demo",
    method: Annotated[Method, typer.Option("--method", help="sera, sera-select, iterative-dpo or dpo.")] = "sera",
) -> None:
    """Run a small SeRA on SmolLM2-135M and the embedded demo set (under 10 minutes on 2 CPU cores).

    Same as `sera run` with no data. The demo set has 20% flipped labels; the report shows how well the implicit reward margin finds them.

    Example: sera demo --workdir sera-demo
    """
    from sera_cli.backends.chat_templates import use_chat_template

    use_chat_template(None)
    _run(None, {"workdir": workdir, "method": method}, True)


def _run(config_file: str | None, flags: dict[str, Any], report: bool) -> None:
    from sera_cli.data.console import console
    from sera_cli.stages.run.api import run as run_loop
    from sera_cli.stages.run.config import load

    config = load(config_file, flags)
    header = [f"[bold]sera run[/]: method {config.method}, {config.iterations} iteration(s), "
              f"policy {config.policy}, workdir {config.workdir}"]

    def on_stage(stage, event: str, record) -> None:
        while header:  # once the checks have passed and the first stage comes: a run that fails them says one line
            console.print(header.pop())
        if event == "start":
            console.print(f"[bold cyan]{stage.key}[/] {stage.title}")
        elif event == "ran":
            facts = ", ".join(f"{k.replace('_', ' ')} {v:.4g}" if isinstance(v, float) else f"{k.replace('_', ' ')} {v}"
                              for k, v in (record.get("summary") or {}).items())
            console.print(f"  [green]done[/] in {record['seconds']:,.0f} s" + (f": {facts}" if facts else ""))
        else:
            console.print(f"[dim]{stage.key} up to date, skipped[/]")

    try:
        with warnings.catch_warnings():  # libraries' deprecation notices are not the user's business here
            warnings.simplefilter("ignore", FutureWarning)
            summary = run_loop(config, on_stage)
    except KeyboardInterrupt:
        console.print(f"interrupted: the finished stages are kept in {config.workdir}; run the same command "
                      "again to go on from there")
        raise typer.Exit(130) from None
    console.print(summary.line())
    if report:  # the table on stdout, then the workdir and what to run next (sera_cli.commands.run_output)
        from pathlib import Path

        from sera_cli.commands.run_output import print_report

        print_report(Path(config.workdir))


PANELS = {
    o.IO: ("config", "split", "subset", "workdir", "report", "report_to", "logging_dir"),
    "Method": ("method", "iterations", "k1", "k2", "n", "ensemble_lambda", "cross_fit", "heldout", "rows", "seed"),
    o.MODELS: ("policy", "revision", "max_length", "max_prompt_length", "chat_template"),
    "Loss and training": ("loss", "beta", "eps", "lr", "batch_size", "micro_batch", "epochs", "lora_r"),
    "Generation": ("gen_prompts", "max_new_tokens", "temperature", "top_p", "engine"),
    o.PERFORMANCE: ("dtype", "precision_check", "device", "batch_tokens", "cache", "ray", "ray_address",
                    "ray_actors"),
    "Evaluation": ("eval", "judge", "judge_url", "judge_model", "eval_mode", "eval_max_new_tokens",
                   "judge_max_tokens"),
}


def register(app: typer.Typer) -> None:
    from sera_cli.commands.edge import guarded

    app.command("run")(guarded(o.panels(run, PANELS)))
    app.command("demo")(guarded(demo))
