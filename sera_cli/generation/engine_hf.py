"""The transformers engine: batched `model.generate` with left padding, prompts sorted by length.

Sampling (temperature, then top-p) happens in `SeededNucleus`, a logits processor that draws each sequence's
token by Gumbel-max with noise keyed by (sequence seed, step, token id) and hands `generate` scores whose argmax
is that token (so `generate` runs in its greedy mode). A sequence's random numbers therefore do not depend on
its batch; its logits can, at the level of float rounding, because padding changes the shapes of the matrix
products, and then a sample flips only when two candidates' noisy scores tie to within that rounding. To rule
even that out, the driver fixes each batch's composition by chunk (see `sera_cli.generation.run`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from transformers import LogitsProcessor

from sera_cli.generation.sampling import Request, row_seed, uniforms

# Candidates tried before a full sort of the vocabulary: a sort of 64 x 49,152 probabilities costs more than a
# forward pass of a 135M model on 2 CPU cores, and a trained model's top-p nucleus is usually far smaller.
_TOPK = (64, 1024)

Noise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (rows [R], token ids [R, K]) -> Gumbel noise [R, K]


def nucleus_sample(logits: torch.Tensor, noise: Noise, temperature: float, top_p: float) -> torch.Tensor:
    """Token ids [B] drawn from softmax(logits / temperature) cut to its top-p nucleus, by Gumbel-max.

    The nucleus is the most probable tokens whose preceding mass is below top_p (so it always holds the top
    token). Within it the sample is argmax(logits / temperature + noise), with noise Gumbel(0, 1) per token id;
    temperature 0 is greedy.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    scaled = logits.float() / temperature
    rows_all = torch.arange(logits.shape[0], device=logits.device)
    vocab = logits.shape[1]
    if top_p >= 1.0:
        ids = torch.arange(vocab, device=logits.device).expand(logits.shape[0], vocab)
        return (scaled + noise(rows_all, ids)).argmax(dim=-1)
    probs = torch.softmax(scaled, dim=-1)
    tokens = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    todo = rows_all
    for k in (*(k for k in _TOPK if k < vocab), vocab):  # widen the candidates until they hold the nucleus
        p, idx = probs[todo].topk(k, dim=-1) if k < vocab else probs[todo].sort(dim=-1, descending=True)
        cum = p.double().cumsum(dim=-1)
        done = cum[:, -1] >= top_p if k < vocab else torch.ones_like(todo, dtype=torch.bool)
        rows, idx, p, cum = todo[done], idx[done], p[done], cum[done]
        inside = (cum - p.double()) < top_p
        score = scaled[rows].gather(1, idx) + noise(rows, idx)
        tokens[rows] = idx.gather(1, score.masked_fill(~inside, float("-inf")).argmax(dim=-1, keepdim=True))[:, 0]
        todo = todo[~done]
        if len(todo) == 0:
            break
    return tokens


def gumbel(u: torch.Tensor) -> torch.Tensor:
    return -torch.log(-torch.log(u))


class SeededNucleus(LogitsProcessor):
    """Logits processor: sample each row with its own noise; return scores whose argmax is the sample."""

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float):
        self.seeds = np.array(seeds, dtype=np.uint64)
        self.temperature, self.top_p, self.step = temperature, top_p, 0

    def _noise(self, rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        u = uniforms(self.seeds[rows.cpu().numpy()], self.step, ids.cpu().numpy())
        return gumbel(torch.from_numpy(u)).to(device=ids.device, dtype=torch.float32)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        tokens = nucleus_sample(scores, self._noise, self.temperature, self.top_p)
        self.step += 1
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, tokens.unsqueeze(1), 0.0)


class HFEngine:
    """Generate with a transformers causal LM on CPU or one GPU."""

    name = "hf"

    def __init__(self, ref, tok, *, dtype: str, device: str, batch_size: int, temperature: float, top_p: float,
                 max_new_tokens: int, stop_ids: Sequence[int], trust_remote_code: bool = False):
        from transformers import GenerationConfig

        from sera_cli.models import load_model

        self.model = load_model(ref, dtype, device, trust_remote_code)
        # Only sera's flags shape sampling: a model's own generation defaults (repetition penalty, ...) are dropped.
        self.model.generation_config = GenerationConfig(
            do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=list(stop_ids),
            pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
        self.pad_id = tok.pad_token_id
        self.batch_size, self.temperature, self.top_p = batch_size, temperature, top_p
        self.device = next(self.model.parameters()).device
        self.dtype = str(next(self.model.parameters()).dtype).removeprefix("torch.")

    def identity(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "device": str(self.device), "batch_size": self.batch_size}

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
        from transformers import LogitsProcessorList

        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for k, p in enumerate(prompts):
            ids[k, width - len(p):] = torch.tensor(p)
            mask[k, width - len(p):] = 1
        sampler = SeededNucleus(seeds, self.temperature, self.top_p)
        with torch.inference_mode():
            seqs = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                       logits_processor=LogitsProcessorList([sampler]))
        return seqs[:, width:].tolist()
