"""The entry of `sera eval`: an LLM judge's verdicts (`judging`) or a reward's (`reward_judge`), written as the
judgments and summary tables."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from sera_cli.data import provenance
from sera_cli.data.hashing import file_digest
from sera_cli.data.tables import write_parquet
from sera_cli.stages.eval.cache import JudgmentCache
from sera_cli.stages.eval.config import EvalConfig
from sera_cli.stages.eval.judging import (
    JUDGMENTS,
    SUMMARY,
    EvalResult,
    check_outputs,
    collect_answers,
    judge_missing,
    judgment_rows,
    make_judge,
    plan,
    summarise,
)
from sera_cli.stages.eval.questions import read_questions


def evaluate(config: EvalConfig) -> EvalResult:
    """Run the whole eval (resuming from the caches) and write judgments.parquet and summary.parquet."""
    if config.judge_reward or config.judge_rm:  # a reward, not an LLM's reply, decides (`reward_judge`)
        from sera_cli.stages.eval.reward_judge import evaluate_by_reward

        return evaluate_by_reward(config)
    config.check()
    check_outputs(config)
    questions = read_questions(config.prompts, config.turns)
    out = Path(config.output_dir)
    cache_dir = Path(config.cache_dir) if config.cache_dir else out
    answers, made, model_ids = collect_answers(config, questions, cache_dir)
    judge = make_judge(config)
    jobs = plan(config, questions, answers, judge.identity())
    cache = JudgmentCache(cache_dir)
    try:
        judged, seconds = judge_missing(judge, jobs, cache, config.progress)
        texts = cache.get_many(sorted({j.key for j in jobs}))
    finally:
        cache.close()
    rows = judgment_rows(jobs, texts, judge.name)
    summary = summarise(jobs, rows, config.mode, judge.name, config.bootstrap, config.seed)
    prov = provenance.record(
        "eval", {k: v for k, v in config.as_dict().items() if k != "progress"}, models=model_ids,
        judge=judge.identity(), prompts={"file": config.prompts, "digest": file_digest(config.prompts),
                                         "questions": len(questions)},
        templates=sorted({j.template for j in jobs}), judgments={"new": judged, "cached": len(jobs) - judged},
        generated=made)
    write_parquet(provenance.attach(pa.Table.from_pylist(rows, schema=JUDGMENTS), prov),
                  str(out / "judgments.parquet"))
    write_parquet(provenance.attach(pa.Table.from_pylist(summary, schema=SUMMARY), prov), str(out / "summary.parquet"))
    return EvalResult(summary, out / "judgments.parquet", out / "summary.parquet", made, judged,
                      len({j.key for j in jobs}) - judged, seconds)
