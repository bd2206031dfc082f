"""Each stage's config derived from the run config, one function per stage: what `sera run` passes to score,
train, generate, select, mix and eval. The schedule (`loop`) says which models and files; these say how the
run's settings map onto each stage's fields, in one place.

The configs are imported inside the functions: building the schedule stays light until a stage runs.
"""

from __future__ import annotations

from pathlib import Path

from sera_cli.stages.run.config import RunConfig
from sera_cli.stages.run.layout import Layout
from trainers.losses import LOSSES, REWARDS, reward_of

ONE_MODEL = next(n for n, r in REWARDS.items() if not r.needs_ref)  # a reward that scores one model's log-probs


def reward(run: RunConfig) -> str:
    """The implicit reward whose margin selects pairs: the one the run's loss trains on (`trainers.losses`):
    reference-free for SimPO, length-averaged for IPO, summed otherwise."""
    return reward_of(run.loss)


def _cache(run: RunConfig, lay: Layout) -> str | None:
    return str(lay.cache) if run.cache else None


def score_config(run: RunConfig, lay: Layout, *, data: Path, output: Path, policy: str, ref: str,
                 prev: Path | None = None):
    """Score `data` with (policy, ref) by the run's reward, ensembled with `prev`'s IRM when given."""
    from sera_cli.stages.score.config import ScoreConfig

    r = reward(run)
    return ScoreConfig(inputs=(str(data),), output=str(output), policy=policy, ref=ref if REWARDS[r].needs_ref else None,
                       reward=r, beta=run.beta, prev=str(prev) if prev else None,
                       ensemble_lambda=run.ensemble_lambda, prev_missing="current", dtype=run.dtype,
                       precision_check=run.precision_check, device=run.device, max_length=run.max_length, max_prompt_length=run.max_prompt_length,
                       batch_tokens=run.batch_tokens, cache=_cache(run, lay), resume=True,
                       trust_remote_code=run.trust_remote_code, ray_address=run.ray_address,
                       ray_actors=run.ray_actors)


def reference_config(run: RunConfig, lay: Layout, *, data: Path, output: Path, ref: str):
    """The training rows' log-probs under `ref` alone (reference-free scoring gives them, through the cache)."""
    from sera_cli.stages.score.config import ScoreConfig

    return ScoreConfig(inputs=(str(data),), output=str(output), policy=ref, reward=ONE_MODEL, dtype=run.dtype,
                       precision_check=0, device=run.device, max_length=run.max_length, max_prompt_length=run.max_prompt_length,
                       batch_tokens=run.batch_tokens, cache=_cache(run, lay), resume=True,
                       trust_remote_code=run.trust_remote_code, ray_address=run.ray_address,
                       ray_actors=run.ray_actors)


def train_config(run: RunConfig, *, key: str, data: Path, output: Path, policy: str, ref: str, t: int):
    """Train `policy` (reference `ref`, unless the loss is reference-free) on `data` as iteration t."""
    from trainers.config import TrainConfig

    logging_dir = str(Path(run.logging_dir) / key.replace("/", "-")) if run.logging_dir else None
    return TrainConfig(inputs=(str(data),), output=str(output), policy=policy,
                       ref=ref if LOSSES[run.loss].needs_ref else None, loss=run.loss, beta=run.beta, eps=run.eps,
                       lr=run.lr, batch_size=run.batch_size, micro_batch=min(run.micro_batch, run.batch_size),
                       epochs=run.epochs, seed=run.seed + t, lora_r=run.lora_r, dtype=run.dtype,
                       device=run.device, max_length=run.max_length, max_prompt_length=run.max_prompt_length,
                       ref_batch_tokens=run.batch_tokens, save_steps=0, overwrite=True,
                       trust_remote_code=run.trust_remote_code, report_to=run.report_to, logging_dir=logging_dir)


def generate_config(run: RunConfig, *, prompts: Path, output: Path, policy: str, t: int):
    """N responses per prompt with `policy`, seeded by iteration t."""
    from sera_cli.stages.generate.config import GenerateConfig

    return GenerateConfig(inputs=(str(prompts),), output=str(output), policy=policy, engine=run.engine, n=run.n,
                          temperature=run.temperature, top_p=run.top_p, max_new_tokens=run.max_new_tokens,
                          seed=run.seed + t, dtype=run.dtype, device=run.device, resume=True,
                          trust_remote_code=run.trust_remote_code, ray_address=run.ray_address,
                          ray_actors=run.ray_actors)


def select_config(run: RunConfig, *, scored: Path, output: Path):
    """The top k1 of the scored offline rows by IRM."""
    from sera_cli.stages.select.api import SelectConfig

    return SelectConfig(inputs=(str(scored),), output=str(output), top=run.k1)


def pair_config(*, candidates: Path, output: Path, count: int):
    """Max- vs min-reward pairs from the rewarded candidates, the top `count` of them."""
    from sera_cli.stages.select.api import SelectConfig

    return SelectConfig(inputs=(str(candidates),), output=str(output), pairs=True, count=count)


def mix_config(run: RunConfig, *, selected: Path, pairs: Path | None, output: Path, k2: float, n: int, t: int):
    """Iteration t's training set: the selected offline rows and (k2 > 0) the generated pairs, n rows."""
    from sera_cli.stages.mix import MixConfig

    return MixConfig(offline=str(selected), generated=str(pairs) if pairs else None, output=str(output), k1=run.k1,
                     k2=k2, n=n, seed=run.seed + t, iteration=t, allow_shortfall=True)


def eval_config(run: RunConfig, lay: Layout, *, output_dir: Path, policy: str, baseline: str):
    """`sera eval` of `policy` against `baseline` on the run's prompts, with the run's judge."""
    from sera_cli.stages.eval.config import EvalConfig

    return EvalConfig(policies=(policy,), baseline=baseline, prompts=run.eval, output_dir=str(output_dir),
                      cache_dir=str(lay.root / "eval-cache"), mode=run.eval_mode, judge=run.judge,
                      judge_url=run.judge_url, judge_model=run.judge_model, max_new_tokens=run.eval_max_new_tokens,
                      judge_max_tokens=run.judge_max_tokens, seed=run.seed, engine=run.engine, dtype=run.dtype,
                      device=run.device, trust_remote_code=run.trust_remote_code)
