"""The settings of one `score` run, as a typed, frozen config (the CLI fills it; the library reads it)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from trainers.encode import MAX_LENGTH, MAX_PROMPT_LENGTH


@dataclass(frozen=True)
class ScoreConfig:
    inputs: tuple[str, ...]
    output: str
    policy: str
    ref: str | None = None
    reward: Literal["dpo", "ipo", "simpo"] = "dpo"  # ipo: the dpo reward averaged per token
    beta: float = 0.1
    prev: str | None = None
    ensemble_lambda: float = 0.3
    prev_missing: Literal["error", "current"] = "error"
    dtype: str = "auto"
    device: str = "auto"
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
    extra: dict[str, Any] = field(default_factory=dict)
    # --ray / --ray-address: the chunks are scored by an actor pool on a Ray cluster (`ray_stages`)
    ray_address: str | None = None  # "local": the Ray of this machine (joined, else started); "auto", "ray://..."
    ray_actors: int | None = None  # None: one per GPU of the cluster, else 2

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
