"""Nucleus (top-p) sampling by Gumbel-max with per-row seeded noise: the same tokens for the same seeds, whichever
engine draws them."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from sera_cli.backends.engines.sampling import uniforms

# Candidates tried before a full sort of the vocabulary: a sort of 64 x 49,152 probabilities costs more than a
# forward pass of a 135M model on 2 CPU cores, and a trained model's top-p nucleus is usually far smaller.
_TOPK = (64, 1024)


Noise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (rows [R], token ids [R, K]) -> Gumbel noise [R, K]


class SamplerBuffers:
    """The sampler's two [rows, vocab] float32 tables (scaled logits, probabilities), kept from step to step.

    A fresh 50 MB table (256 rows x SmolLM2's 49,152 tokens) takes page faults on every write: on 2 CPU cores the
    division by the temperature took 15.7 ms into a new tensor and 3.3 ms into a kept one, the softmax 17.6 ms
    against 5.0 ms. The same kernels write the same numbers, so the samples do not change. The tables a step
    returns are overwritten by the next step's.
    """

    def __init__(self):
        self.scaled = self.probs = torch.empty(0)

    def tables(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows, vocab = like.shape
        if self.scaled.shape[0] < rows or self.scaled.shape[1:] != (vocab,) or self.scaled.device != like.device:
            self.scaled = torch.empty((rows, vocab), dtype=torch.float32, device=like.device)
            self.probs = torch.empty_like(self.scaled)
        return self.scaled[:rows], self.probs[:rows]


def nucleus_sample(logits: torch.Tensor, noise: Noise, temperature: float, top_p: float,
                   buffers: SamplerBuffers | None = None) -> torch.Tensor:
    """Token ids [B] drawn from softmax(logits / temperature) cut to its top-p nucleus, by Gumbel-max.

    The nucleus is the most probable tokens whose preceding mass is below top_p (so it always holds the top
    token). Within it the sample is argmax(logits / temperature + noise), with noise Gumbel(0, 1) per token id;
    temperature 0 is greedy. `buffers` keeps the full-vocabulary tables between calls (the same numbers).
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    scaled, probs = buffers.tables(logits) if buffers is not None else (None, None)
    scaled = torch.div(logits.float(), temperature, out=scaled)
    rows_all = torch.arange(logits.shape[0], device=logits.device)
    vocab = logits.shape[1]
    if top_p >= 1.0:
        ids = torch.arange(vocab, device=logits.device).expand(logits.shape[0], vocab)
        return (scaled + noise(rows_all, ids)).argmax(dim=-1)
    probs = torch.softmax(scaled, dim=-1) if probs is None else torch.ops.aten._softmax.out(scaled, -1, False, out=probs)
    tokens = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    todo = rows_all
    for k in (*(k for k in _TOPK if k < vocab), vocab):  # widen the candidates until they hold the nucleus
        rest = probs if len(todo) == len(probs) else probs[todo]  # no copy of the whole table at the first try
        p, idx = rest.topk(k, dim=-1) if k < vocab else rest.sort(dim=-1, descending=True)
        cum = p.double().cumsum(dim=-1)
        done = cum[:, -1] >= top_p if k < vocab else torch.ones_like(todo, dtype=torch.bool)
        rows, idx, p, cum = todo[done], idx[done], p[done], cum[done]
        inside = (cum - p.double()) < top_p
        score = scaled[rows.unsqueeze(1), idx] + noise(rows, idx)
        tokens[rows] = idx.gather(1, score.masked_fill(~inside, float("-inf")).argmax(dim=-1, keepdim=True))[:, 0]
        todo = todo[~done]
        if len(todo) == 0:
            break
    return tokens


def gumbel(u: torch.Tensor) -> torch.Tensor:
    return -torch.log(-torch.log(u))


def seeded_noise(seeds: Sequence[int] | np.ndarray, step: int) -> Noise:
    """Gumbel noise of step `step` for rows drawn with `seeds` (one seed per row), as `nucleus_sample` asks for it."""
    table = np.asarray(seeds, dtype=np.uint64)

    def noise(rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        u = uniforms(table[rows.cpu().numpy()], step, ids.cpu().numpy())
        return gumbel(torch.from_numpy(u)).to(device=ids.device, dtype=torch.float32)

    return noise
