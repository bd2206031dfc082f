"""The order of the batches: the seeded steps, each process's micro-batches, and less padding.

Less padding: inside each optimizer step, the pairs run longest first, so a micro-batch holds pairs of
similar length.

The seeded shuffle (`step_batches`) still decides which pairs form each step and the order of
the steps; that does not depend on the micro-batch size. Only the order inside a step changes, and with it
which pairs share a micro-batch (and, under DDP, which process runs which pair). A step's gradient is the mean
over the same pairs whatever the split, so the losses are those of the unsorted order up to float summation
order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from trainers.encode import Encoded


def pair_cost(e: Encoded) -> int:
    """What a pair pads to in a micro-batch: its prompt and its longer response (both run the prompt's keys)."""
    return len(e.prompt) + max(len(r) for r in e.responses)


def longest_first_steps(steps: Sequence[list[int]], encoded: Sequence[Encoded]) -> list[list[int]]:
    """Each step's rows sorted by decreasing `pair_cost` (ties keep the shuffled order)."""
    return [sorted(batch, key=lambda i: -pair_cost(encoded[i])) for batch in steps]


def step_batches(n: int, batch_size: int, epochs: int, seed: int, max_steps: int | None = None) -> list[list[int]]:
    """Row indices of every optimizer step: each epoch a fresh permutation (seeded by seed and epoch), cut into
    batches of `batch_size` (the last one of an epoch may be smaller). Depends on nothing but its arguments,
    so a resumed run knows its data position from the step number alone."""
    steps = []
    for epoch in range(epochs):
        order = np.random.default_rng([seed, epoch]).permutation(n).tolist()
        steps += [order[i:i + batch_size] for i in range(0, n, batch_size)]
    return steps[:max_steps] if max_steps else steps


def local_micro_batches(batch: list[int], rank: int, world: int, micro: int) -> list[tuple[list[int], float]]:
    """This process's share of one step, as (rows, weight) micro-batches.

    The step's rows are split into `world` near-equal contiguous parts, each cut into micro-batches of at most
    `micro` rows. Every process gets the same number of micro-batches (collective ops need it): one with no
    rows left repeats the step's first row with weight 0.
    """
    parts = np.array_split(np.array(batch, dtype=np.int64), world)
    count = max(1, -(-len(parts[0]) // micro))
    mine = parts[rank].tolist()
    out = [(mine[i * micro:(i + 1) * micro], 1.0) for i in range(count)]
    return [(rows, w) if rows else ([batch[0]], 0.0) for rows, w in out]


def collate_pairs(encoded: Sequence[Encoded], rows: list[int], pad_id: int) -> dict[str, Any]:
    """One forward batch: the rows' chosen sequences, then their rejected ones (right-padded)."""
    from trainers.logps import collate

    enc = [encoded[i] for i in rows]
    return collate([(e.sequence(0), len(e.prompt)) for e in enc] + [(e.sequence(1), len(e.prompt)) for e in enc],
                   pad_id)


def needed_rows(steps: list[list[int]], rank: int, world: int, micro: int) -> np.ndarray:
    """Every row this process runs (weight-0 fillers included), to compute only its share of reference log-probs."""
    rows = {r for batch in steps for part, _ in local_micro_batches(batch, rank, world, micro) for r in part}
    return np.array(sorted(rows), dtype=np.int64)
