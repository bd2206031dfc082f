"""`sera run --eval PROMPTS --judge ...`: at the end of each iteration, judge pi_t against pi_0 (`sera eval`).

The stage writes `iter-t/eval/` (judgments.parquet, summary.parquet) and shares one answer and judgment cache,
`WORKDIR/eval-cache/`, across iterations, so pi_0 answers the questions once per run and a rerun pays nothing.
"""

from __future__ import annotations

from sera_cli.stages.run import stage_configs
from sera_cli.stages.run.config import RunConfig
from sera_cli.stages.run.layout import Layout
from sera_cli.stages.run.ledger import Stage


def eval_stage(config: RunConfig, lay: Layout, t: int, policy: str, baseline: str) -> Stage:
    out = lay.iteration(t) / "eval"
    ec = stage_configs.eval_config(config, lay, output_dir=out, policy=policy, baseline=baseline)
    inputs = {"prompts": config.eval, "policy": policy, "baseline": baseline,
              **({"judge": config.judge} if config.judge else {})}
    settings = {"mode": config.eval_mode, "judge_url": config.judge_url, "judge_model": config.judge_model,
                "max_new_tokens": config.eval_max_new_tokens, "judge_max_tokens": config.judge_max_tokens,
                "seed": config.seed, "dtype": config.dtype}

    def run() -> dict:
        from sera_cli.stages.eval.api import evaluate

        r = evaluate(ec)
        s = r.summary[0]
        keep = ("win_rate", "lc_win_rate", "mean_grade", "parse_failures")
        return {**{k: s[k] for k in keep if s[k] is not None}, "judged": r.judged, "cached": r.cached}

    judge = config.judge or f"{config.judge_model} at {config.judge_url}"
    return Stage(f"iter-{t}/eval", lay.eval_summary(t), inputs, settings, run,
                 f"judge pi_{t} against pi_0 on {config.eval} ({config.eval_mode}, judge {judge})")
