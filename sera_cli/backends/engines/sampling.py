"""Seeds, stopping and distinctness for sampling N responses per prompt (pure functions; no torch).

- Seeds. A prompt's draws in re-draw round r use `draw_seed(seed, prompt_id, r)`, and sample j of that draw
  `row_seed(draw_seed, j)`, so what a prompt gets does not depend on its row, chunk, shard or batch.
- Random numbers. The transformers engine samples by Gumbel-max with one uniform number per (sequence, step,
  token id) from a counter-based generator (`uniforms`, SplitMix64), so a sequence's random numbers are the same
  whatever else shares its batch, and a float-rounding change of the logits flips a sample only when two
  candidates' noisy scores tie to within that rounding.
- Distinctness. Responses are compared after stripping surrounding whitespace; an empty response counts as a
  duplicate. A prompt short of N distinct responses draws the missing number again, up to `max_redraws` rounds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sera_cli.data.hashing import digest

_MASK64 = (1 << 64) - 1


def draw_seed(seed: int, prompt_id: str, round_: int) -> int:
    """The seed of one prompt's draw in one re-draw round (63 bits, so every engine accepts it)."""
    return int(digest(["sera-generate", seed, prompt_id, round_])[:16], 16) >> 1


def row_seed(seed: int, j: int) -> int:
    """The seed of the j-th sample of a draw."""
    return int(digest(["sera-sample", seed, j])[:16], 16) >> 1


def uniforms(seeds: np.ndarray, step: int, tokens: np.ndarray) -> np.ndarray:
    """A uniform number in (0, 1) for each (row seed, step, token id): SplitMix64's finaliser of their mix.

    seeds [B] and tokens [B, K] give [B, K]; the number of a (seed, step, token) never depends on anything else.
    """
    with np.errstate(over="ignore"):
        z = (seeds.astype(np.uint64)[:, None] + np.uint64((step * 0x9E3779B97F4A7C15) & _MASK64)
             + tokens.astype(np.uint64) * np.uint64(0xD1B54A32D192ED03))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return ((z >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53)


def trim(ids: Sequence[int], stop_ids: Sequence[int], max_new_tokens: int) -> tuple[list[int], str]:
    """Generated ids up to and including the first stop token, and 'stop' or 'length'.

    An engine that ended a sequence before `max_new_tokens` without a stop token in it (one that drops the stop
    token) also finished with 'stop'.
    """
    stops = set(stop_ids)
    for i, t in enumerate(ids):
        if t in stops:
            return list(ids[:i + 1]), "stop"
    ids = list(ids)
    return ids, "stop" if len(ids) < max_new_tokens else "length"


def distinct_key(text: str) -> str | None:
    """What two responses are compared by; None for an empty response (never kept)."""
    key = text.strip()
    return key or None


@dataclass(frozen=True)
class Request:
    """What an engine is asked for: `count` samples of one prompt (token ids), drawn with `seed`."""

    prompt_ids: list[int]
    count: int
    seed: int


@dataclass(frozen=True)
class Draw:
    """Ask for `count` samples of prompt `key` (an index into the caller's prompts) with one seed."""

    key: int
    count: int
    seed: int
    round: int


def collect(prompt_ids: Sequence[str], n: int, seed: int, max_redraws: int,
            draw: Callable[[list[Draw]], list[list[Any]]], text: Callable[[Any], str] = lambda s: s.text
            ) -> tuple[list[list[Any]], int]:
    """Up to `n` distinct samples per prompt, and the number of samples still missing after the re-draws.

    `draw(draws)` returns, for each draw, a list of `count` samples; `text(sample)` is what is compared.
    Samples are kept in the order drawn (round, then sample index).
    """
    kept: list[list[Any]] = [[] for _ in prompt_ids]
    seen: list[set[str]] = [set() for _ in prompt_ids]
    for r in range(max_redraws + 1):
        draws = [Draw(i, n - len(kept[i]), draw_seed(seed, pid, r), r)
                 for i, pid in enumerate(prompt_ids) if len(kept[i]) < n]
        if not draws:
            break
        for d, samples in zip(draws, draw(draws), strict=True):
            for s in samples:
                key = distinct_key(text(s))
                if key is not None and key not in seen[d.key] and len(kept[d.key]) < n:
                    seen[d.key].add(key)
                    kept[d.key].append(s)
    return kept, sum(n - len(k) for k in kept)
