"""`sera eval`: parse options, call `sera_cli.stages.eval.api.evaluate`, print the table (or JSON)."""

from __future__ import annotations

from typing import Annotated, Literal

import typer

from sera_cli.commands import options as o
from sera_cli.stages.eval.config import MODES

Mode = Literal[MODES]
Engine = o.Engine


def eval_command(
    policy: Annotated[list[str], typer.Option("--policy", help="A policy to evaluate (HF folder, .gguf, PEFT "
                                              "adapter, 'smollm2-135m', or a model name in --answers); repeat "
                                              "for several.", show_default=False)],
    prompts: Annotated[str, typer.Option("--prompts", help="Questions: Parquet/JSONL with a 'prompt' column, "
                                         "FastChat question.jsonl (question_id, category, turns), AlpacaEval "
                                         "JSON (instruction) or WizardLM's test set.", show_default=False)],
    output_dir: Annotated[str, typer.Option("--output", "-o", help="Output folder: judgments.parquet, "
                                            "summary.parquet, and the answer and judgment caches.",
                                            show_default=False)],
    baseline: Annotated[str | None, typer.Option("--baseline", help="The model each policy is compared with "
                                                 "(pairwise), e.g. the SFT model.")] = None,
    judge: Annotated[str | None, typer.Option("--judge", help="A local judge model (HF folder, .gguf, "
                                              "'smollm2-135m'); it needs a chat template.")] = None,
    judge_revision: Annotated[str | None, typer.Option(
        "--judge-revision", help="Hub revision of --judge: the same as --judge org/name@REV.")] = None,
    judge_url: Annotated[str | None, typer.Option("--judge-url", help="An OpenAI-compatible endpoint instead, "
                                                  "e.g. http://host:8000/v1.")] = None,
    judge_model: Annotated[str | None, typer.Option("--judge-model", help="The model name the endpoint "
                                                    "serves.")] = None,
    judge_api_key_env: Annotated[str, typer.Option("--judge-api-key-env", help="Environment variable that holds "
                                                   "the endpoint's API key (if it needs one).")] = "OPENAI_API_KEY",
    judge_concurrency: Annotated[int, typer.Option("--judge-concurrency", help="Most requests in flight.",
                                                   min=1)] = 8,
    judge_retries: Annotated[int, typer.Option("--judge-retries", help="Retries of a failed request (backoff "
                                               "1 s, 2 s, 4 s, ...).", min=0)] = 4,
    judge_timeout: Annotated[float, typer.Option("--judge-timeout", help="Seconds to wait for one "
                                                 "response.")] = 120.0,
    judge_max_tokens: Annotated[int, typer.Option("--judge-max-tokens", help="Most tokens of a judge's reply.",
                                                  min=1)] = 512,
    judge_batch_size: Annotated[int, typer.Option("--judge-batch-size", help="Local judge: prompts per generate "
                                                  "call; each finished batch is cached.", min=1)] = 16,
    judge_prefill: Annotated[str, typer.Option("--judge-prefill", help="Local judge: start its reply with this "
                                               "text (e.g. '[[' so a small judge completes a verdict); the "
                                               "verdict is still parsed from the reply.")] = "",
    judge_reward: Annotated[str | None, typer.Option(
        "--judge-reward",
        help="Judge by a DPO-trained model's implicit reward instead of an LLM: log pi - log pi_ref of each "
             "answer (needs --judge-reward-ref); the larger reward wins.")] = None,
    judge_reward_ref: Annotated[str | None, typer.Option(
        "--judge-reward-ref", help="The reference of --judge-reward.")] = None,
    judge_rm: Annotated[str | None, typer.Option(
        "--judge-rm",
        help="Judge by a reward model (any AutoModelForSequenceClassification with one output).")] = None,
    judge_heldout: Annotated[str | None, typer.Option(
        "--judge-heldout",
        help="Held-out preference pairs (Parquet): a reward judge's own accuracy on them (chosen over rejected) is "
             "reported beside its verdicts.")] = None,
    mode: Annotated[Mode, typer.Option("--mode", help="pairwise (win rate against --baseline, both answer "
                                      "orders) or single (1-10 grade).")] = "pairwise",
    turns: Annotated[Literal["first", "all"], typer.Option("--turns", help="first, or all (MT-bench's second turn is judged too, "
                                       "as '<id>:turn2').")] = "first",
    answers: Annotated[str | None, typer.Option("--answers", help="Precomputed answers (Parquet: prompt_id, "
                                                "model, response[, turn]) for models named in it.")] = None,
    temperature: Annotated[float, typer.Option("--temperature", help="Answer sampling temperature (0: greedy).",
                                               min=0.0)] = 0.0,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Most new tokens per answer.",
                                                min=1)] = 512,
    seed: o.SeedOpt = 0,
    engine: Annotated[Engine, typer.Option("--engine", help="Answer generation: hf, vllm or auto (as 'sera "
                                        "generate').")] = "auto",
    dtype: o.DtypeOpt = "auto",
    device: o.DeviceOpt = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Sequences per generate call (hf engine).",
                                            min=1)] = 64,
    bootstrap: Annotated[int, typer.Option("--bootstrap", help="Bootstrap resamples for the 95% interval.",
                                           min=0)] = 1000,
    trust_remote_code: o.TrustRemoteCodeOpt = False,
    chat_template: o.ChatTemplateOpt = None,
    json_out: o.JsonOpt = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
    config_file: o.ConfigOpt = None,
) -> None:
    """Judge policies with an LLM the way the SeRA paper does: win rate against a baseline, or 1-10 grades.

    Answers are generated (greedy by default) and cached per model in the output folder; judgments are cached too, so a rerun, an added policy or an interrupted eval pays only for what is new. Pairwise mode judges each question in both answer orders: a win needs both to agree, otherwise it is a tie (counted 0.5).

    Example: sera eval --policy runs/sera/iter-2/model --baseline sft/ --prompts question.jsonl --judge smollm2-135m -o eval/
    """
    import json

    from sera_cli.backends.chat_templates import use_chat_template
    from sera_cli.backends.hub import with_revision
    from sera_cli.data.console import console
    from sera_cli.stages.eval.api import evaluate
    from sera_cli.stages.eval.config import EvalConfig
    from sera_cli.stages.eval.table import rich_table

    use_chat_template(chat_template)
    judge = with_revision(judge, judge_revision, "--judge-revision", "--judge")
    config = EvalConfig(
        policies=tuple(policy), prompts=prompts, output_dir=output_dir, baseline=baseline, mode=mode, turns=turns,
        answers=answers, judge=judge, judge_url=judge_url, judge_model=judge_model,
        judge_api_key_env=judge_api_key_env, judge_concurrency=judge_concurrency, judge_retries=judge_retries,
        judge_timeout=judge_timeout, judge_max_tokens=judge_max_tokens, judge_batch_size=judge_batch_size,
        judge_prefill=judge_prefill, judge_reward=judge_reward, judge_reward_ref=judge_reward_ref, judge_rm=judge_rm,
        judge_heldout=judge_heldout, temperature=temperature,
        max_new_tokens=max_new_tokens, seed=seed, engine=engine, dtype=dtype, device=device, batch_size=batch_size,
        bootstrap=bootstrap, trust_remote_code=trust_remote_code, progress=not quiet and not json_out)
    result = evaluate(config)
    if json_out:
        print(json.dumps({"summary": result.summary, "judgments": str(result.judgments), "judged": result.judged,
                          "judge_heldout": result.judge_heldout,
                          "cached": result.cached, "generated": result.generated}, default=str))
        return
    console.print(rich_table(result.summary))
    order = ("a win is the larger reward" if config.judge_reward or config.judge_rm else
             "a win needs both answer orders to agree")
    console.print(f"Win rate: ties count half; {order}. LC win rate: the judge's "
                  "preference regressed on the answer-length difference, read at equal length.", soft_wrap=True)
    if acc := result.judge_heldout:
        console.print(f"judge's held-out accuracy: {acc['accuracy']:.1%} of {acc['pairs']:,} pairs of {acc['file']} "
                      "(chosen rewarded above rejected)", soft_wrap=True)
    console.print(result.line(), soft_wrap=True)


def register(app: typer.Typer) -> None:
    from sera_cli.commands.edge import guarded

    app.command("eval")(guarded(eval_command))
