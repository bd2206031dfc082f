"""The settings of one `score` run, as a typed, frozen config (the CLI fills it; the library reads it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sera_cli.data.errors import ConfigError
from sera_cli.data.numbers import config_problems
from trainers.config import Settings
from trainers.encode import MAX_LENGTH, MAX_PROMPT_LENGTH
from trainers.losses import REWARDS

DEFAULT_PAIRS = 32  # --precision-check when the dtype is not float32 (`precision`)

@dataclass(frozen=True, kw_only=True)
class ScoreConfig(Settings):
    """The settings of one `sera score`: the models, the reward, the ensemble and how the work runs."""

    inputs: tuple[str, ...]
    output: str
    policy: str
    ref: str | None = None
    reward: str = "dpo"  # a name of `trainers.losses.REWARDS`; ipo: the dpo reward averaged per token
    beta: float = 0.1
    prev: str | None = None
    ensemble_lambda: float = 0.3
    prev_missing: Literal["error", "current"] = "error"
    dtype: str = "auto"
    device: str = "auto"
    # rescore this many random pairs in float32 and record the IRM's noise floor (`precision`); None: 32 when the
    # dtype is not float32, else 0
    precision_check: int | None = None
    precision_seed: int = 0
    max_length: int | None = MAX_LENGTH
    max_prompt_length: int | None = MAX_PROMPT_LENGTH
    batch_tokens: int = 1024
    low_memory: bool = False
    cache: str | None = None
    resume: bool = False
    shard: tuple[int, int] | None = None
    chunk_rows: int = 256
    trust_remote_code: bool = False
    progress: bool = True
    # --ray / --ray-address: the chunks are scored by an actor pool on a Ray cluster (`ray_stages`)
    ray_address: str | None = None  # "local": the Ray of this machine (joined, else started); "auto", "ray://..."
    ray_actors: int | None = None  # None: one per GPU of the cluster, else 2


    def precision_pairs(self, dtype: str) -> int:
        """Pairs the precision check rescores in float32 when the scores are computed in `dtype` (resolved)."""
        if dtype == "float32":
            return 0
        return DEFAULT_PAIRS if self.precision_check is None else self.precision_check

    def check(self) -> None:
        """Every problem with the settings at once, as one ConfigError."""
        problems = config_problems(self)
        if self.reward not in REWARDS:
            problems.append(f"--reward {self.reward}: expected {' or '.join([', '.join(list(REWARDS)[:-1]), list(REWARDS)[-1]])}")
        elif REWARDS[self.reward].needs_ref and not self.ref:
            problems.append(f"--reward {self.reward} needs --ref (the reference model is never taken silently "
                            "from the policy)")
        elif not REWARDS[self.reward].needs_ref and self.ref:
            problems.append(f"--reward {self.reward} is reference-free: drop --ref")
        if self.beta <= 0:
            problems.append(f"--beta must be > 0 (got {self.beta})")
        if not 0.0 <= self.ensemble_lambda <= 1.0:
            problems.append(f"--ensemble-lambda must be in [0, 1] (got {self.ensemble_lambda})")
        if self.shard and not 0 <= self.shard[0] < self.shard[1]:
            problems.append(f"--shard {self.shard[0]}/{self.shard[1]}: need 0 <= i < n")
        if self.resume and self.output == "-":
            problems.append("--resume needs a file output (-o FILE), not stdout")
        if self.precision_check is not None and self.precision_check < 0:
            problems.append(f"--precision-check must be >= 0 (got {self.precision_check})")
        if self.ray_actors is not None and self.ray_actors < 1:
            problems.append(f"--ray-actors must be >= 1 (got {self.ray_actors})")
        if problems:
            raise ConfigError("; ".join(problems))
