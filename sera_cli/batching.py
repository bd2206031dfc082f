"""Which sequences run together: length-sorted batches within a token budget, and windows of prompts."""

from __future__ import annotations

from collections.abc import Sequence


def length_batches(lengths: Sequence[int], batch_tokens: int, extra: Sequence[int] | None = None,
                   extra_tokens: int | None = None) -> list[list[int]]:
    """Indices grouped longest first so that each batch's padded size stays within `batch_tokens` (and, with
    `extra`, the batch size times its largest `extra` stays within `extra_tokens`)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    out: list[list[int]] = []
    top = 0
    for i in order:
        if out and (len(out[-1]) + 1) * lengths[out[-1][0]] <= batch_tokens and (
                extra is None or (len(out[-1]) + 1) * max(top, extra[i]) <= extra_tokens):
            out[-1].append(i)
            top = max(top, extra[i]) if extra is not None else 0
        else:
            out.append([i])
            top = extra[i] if extra is not None else 0
    return out


def windows(lengths: Sequence[int], window_tokens: int) -> list[list[int]]:
    """Prompt indices, longest first, cut into runs of at most `window_tokens` prompt tokens (at least one)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    out: list[list[int]] = []
    total = 0
    for i in order:
        if not out or total + lengths[i] > window_tokens:
            out.append([])
            total = 0
        out[-1].append(i)
        total += lengths[i]
    return out
