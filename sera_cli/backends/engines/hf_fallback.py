"""Generation through `model.generate`, one row per sample: the fallback of the transformers engine for models
whose caches it cannot preallocate (sliding-window or recurrent layers), and the baseline engine's decoding."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import LogitsProcessor

from sera_cli.backends.engines.nucleus import nucleus_sample, seeded_noise


class SeededNucleus(LogitsProcessor):
    """Logits processor: sample each row with its own noise; return scores whose argmax is the sample."""

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float):
        self.seeds = list(seeds)
        self.temperature, self.top_p, self.step = temperature, top_p, 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        tokens = nucleus_sample(scores, seeded_noise(self.seeds, self.step), self.temperature, self.top_p)
        self.step += 1
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, tokens.unsqueeze(1), 0.0)


def generate_rows(model, pad_id: int, prompts: list[list[int]], seeds: list[int], temperature: float,
                  top_p: float) -> list[list[int]]:
    """One batched `model.generate` call, row k continuing prompts[k] with seed seeds[k]."""
    from transformers import LogitsProcessorList

    from trainers.prefix_sharing import left_pad

    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, pad_id, device)
    sampler = SeededNucleus(seeds, temperature, top_p)
    with torch.inference_mode():
        seqs = model.generate(input_ids=ids, attention_mask=mask, logits_processor=LogitsProcessorList([sampler]))
    return seqs[:, ids.shape[1]:].tolist()
