"""The settings of one `sera eval`, as a typed, frozen config (the CLI fills it; the library reads it)."""

from __future__ import annotations

from dataclasses import dataclass

from sera_cli.data.errors import ConfigError
from sera_cli.data.numbers import config_problems
from trainers.config import Settings

MODES = ("pairwise", "single")


@dataclass(frozen=True, kw_only=True)
class EvalConfig(Settings):
    """The settings of one `sera eval`: the policies, the baseline, the questions and the judge."""

    policies: tuple[str, ...]
    prompts: str
    output_dir: str
    baseline: str | None = None
    mode: str = "pairwise"
    turns: str = "first"
    answers: str | None = None  # precomputed answers: prompt_id, model, response
    # the judge: a local model, or an OpenAI-compatible endpoint
    judge: str | None = None
    judge_url: str | None = None
    judge_model: str | None = None
    judge_api_key_env: str = "OPENAI_API_KEY"
    judge_concurrency: int = 8
    judge_retries: int = 4
    judge_timeout: float = 120.0
    judge_backoff: float = 1.0  # seconds before the first retry; doubled at each retry
    judge_max_tokens: int = 512
    judge_batch_size: int = 16  # local judge: prompts per generate call (and per cache commit)
    judge_prefill: str = ""  # local judge: the start of its reply (e.g. "[[")
    # or a reward judge (`reward_judge`): a DPO model's implicit reward, or a sequence-classification reward model
    judge_reward: str | None = None
    judge_reward_ref: str | None = None
    judge_rm: str | None = None
    judge_heldout: str | None = None  # preference pairs: a reward judge's own accuracy, reported beside its verdicts
    # answer generation (the generate stage's engines)
    temperature: float = 0.0
    max_new_tokens: int = 512
    seed: int = 0
    engine: str = "auto"
    dtype: str = "auto"
    device: str = "auto"
    batch_size: int = 64
    cache_dir: str | None = None  # answers and judgments cache; default: the output folder
    bootstrap: int = 1000
    trust_remote_code: bool = False
    progress: bool = True


    def check(self) -> None:
        """Every problem with the settings at once, as one ConfigError."""
        p = config_problems(self)
        if not self.policies:
            p.append("give at least one --policy")
        if self.mode not in MODES:
            p.append(f"--mode {self.mode}: expected pairwise or single")
        elif self.mode == "pairwise" and not self.baseline:
            p.append("--mode pairwise needs --baseline (the model every policy is compared with, e.g. the SFT model)")
        if self.turns not in ("first", "all"):
            p.append(f"--turns {self.turns}: expected first or all")
        rewarded = bool(self.judge_reward or self.judge_rm)
        if sum(map(bool, (self.judge, self.judge_url, self.judge_reward, self.judge_rm))) > 1:
            p.append("give one judge: --judge (a local model), --judge-url with --judge-model, --judge-reward with "
                     "--judge-reward-ref, or --judge-rm")
        elif self.judge_url and not self.judge_model:
            p.append("--judge-url needs --judge-model (the model name the endpoint serves)")
        elif not (self.judge_url or self.judge or rewarded):
            p.append("give a judge: --judge MODEL (local) or --judge-url URL --judge-model NAME")
        if self.judge_reward and not self.judge_reward_ref:
            p.append("--judge-reward needs --judge-reward-ref (the reference the DPO model was trained from)")
        if self.judge_reward_ref and not self.judge_reward:
            p.append("--judge-reward-ref is used only with --judge-reward")
        if self.judge_heldout and not rewarded:
            p.append("--judge-heldout measures a reward judge: give --judge-reward or --judge-rm")
        if rewarded and self.mode != "pairwise":
            p.append("a reward judge compares answers with the baseline's: use --mode pairwise")
        if self.judge_prefill and self.judge_url:
            p.append("--judge-prefill applies to a local judge (--judge), not to --judge-url")
        if self.judge_model and not self.judge_url:
            p.append("--judge-model is used only with --judge-url")
        if self.judge_url and not self.judge_url.startswith(("http://", "https://")):
            p.append(f"--judge-url {self.judge_url}: expected http://host:port/v1 or https://...")
        labels = [s.rstrip("/") for s in self.policies] + ([self.baseline.rstrip("/")] if self.baseline else [])
        if len(set(labels)) != len(labels):
            p.append("each --policy and the --baseline must be a different model (name)")
        if self.judge_concurrency < 1 or self.judge_retries < 0 or self.judge_timeout <= 0:
            p.append("--judge-concurrency must be >= 1, --judge-retries >= 0 and --judge-timeout > 0")
        if self.judge_max_tokens < 1 or self.max_new_tokens < 1:
            p.append("--judge-max-tokens and --max-new-tokens must be >= 1")
        if self.temperature < 0:
            p.append(f"--temperature must be >= 0 (got {self.temperature})")
        if self.bootstrap < 0:
            p.append(f"--bootstrap must be >= 0 (got {self.bootstrap})")
        if p:
            raise ConfigError("; ".join(p))
