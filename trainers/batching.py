"""Which sequences run together: length-sorted batches within a token budget, and windows of prompts."""

from __future__ import annotations

from collections.abc import Sequence


def longest_first(lengths: Sequence[int]) -> list[int]:
    """Indices by decreasing length, ties in input order."""
    return sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))


def length_batches(lengths: Sequence[int], batch_tokens: int, extra: Sequence[int] | None = None,
                   extra_tokens: float = float("inf")) -> list[list[int]]:
    """Indices grouped longest first so that each batch's padded size stays within `batch_tokens` (and, with
    `extra`, the batch size times its largest `extra` stays within `extra_tokens`)."""
    extra = extra if extra is not None else [0] * len(lengths)
    out: list[list[int]] = []
    top = 0
    for i in longest_first(lengths):
        size = len(out[-1]) + 1 if out else 0
        if out and size * lengths[out[-1][0]] <= batch_tokens and size * max(top, extra[i]) <= extra_tokens:
            out[-1].append(i)
            top = max(top, extra[i])
        else:
            out.append([i])
            top = extra[i]
    return out


def windows(lengths: Sequence[int], window_tokens: int) -> list[list[int]]:
    """Prompt indices, longest first, cut into runs of at most `window_tokens` prompt tokens (at least one)."""
    out: list[list[int]] = []
    total = 0
    for i in longest_first(lengths):
        if not out or total + lengths[i] > window_tokens:
            out.append([])
            total = 0
        out[-1].append(i)
        total += lengths[i]
    return out
