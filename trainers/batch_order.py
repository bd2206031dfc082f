"""Less padding: inside each optimizer step, the pairs run longest first, so a micro-batch holds pairs of
similar length.

The seeded shuffle (`trainers.data.step_batches`) still decides which pairs form each step and the order of
the steps; that does not depend on the micro-batch size. Only the order inside a step changes, and with it
which pairs share a micro-batch (and, under DDP, which process runs which pair). A step's gradient is the mean
over the same pairs whatever the split, so the losses are those of the unsorted order up to float summation
order.
"""

from __future__ import annotations

from collections.abc import Sequence

from sera_cli.encode import Encoded


def pair_cost(e: Encoded) -> int:
    """What a pair pads to in a micro-batch: its prompt and its longer response (both run the prompt's keys)."""
    return len(e.prompt) + max(len(r) for r in e.responses)


def longest_first_steps(steps: Sequence[list[int]], encoded: Sequence[Encoded]) -> list[list[int]]:
    """Each step's rows sorted by decreasing `pair_cost` (ties keep the shuffled order)."""
    return [sorted(batch, key=lambda i: -pair_cost(encoded[i])) for batch in steps]
