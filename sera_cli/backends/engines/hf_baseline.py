"""The transformers engine as it was before prefix sharing: kept as the baseline of `tests/bench/generate.py` and
of the test that the faster engine (`sera_cli.backends.engines.hf`) samples the very same tokens.

Each sequence is its own row of a batched `model.generate` (so a prompt is prefilled once per sample), left
padded, rows sorted by prompt length; `SeededNucleus` draws each row's token and hands `generate` scores whose
argmax is that token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from sera_cli.backends.engines.hf import HFEngine
from sera_cli.backends.engines.hf_fallback import generate_rows
from sera_cli.backends.engines.sampling import Request, row_seed


class ReferenceHFEngine(HFEngine):
    """Generate with a transformers causal LM, one `model.generate` row per sample (loading as `HFEngine`)."""

    name = "hf-reference"

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("fast_decode", False)  # the baseline keeps sdpa attention and one `linear` head
        super().__init__(*args, **kwargs)

    def generate(self, requests: Sequence[Request], on_batch: Callable[[list[list[int]]], None] | None = None
                 ) -> list[list[list[int]]]:
        """Generated token ids for each request's samples (padding after a stop token is left to the caller)."""
        rows = [(i, j) for i, r in enumerate(requests) for j in range(r.count)]
        rows.sort(key=lambda ij: (-len(requests[ij[0]].prompt_ids), ij))
        out: list[list[list[int]]] = [[[] for _ in range(r.count)] for r in requests]
        for b in range(0, len(rows), self.batch_size):
            batch = rows[b:b + self.batch_size]
            prompts = [requests[i].prompt_ids for i, _ in batch]
            seeds = [row_seed(requests[i].seed, j) for i, j in batch]
            generated = self._batch(prompts, seeds)
            for (i, j), ids in zip(batch, generated, strict=True):
                out[i][j] = ids
            if on_batch:
                on_batch(generated)
        return out

    def _batch(self, prompts: list[list[int]], seeds: list[int]) -> list[list[int]]:
        return generate_rows(self.model, self.pad_id, prompts, seeds, self.temperature, self.top_p)


