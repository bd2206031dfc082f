"""The policy's log-probs of a micro-batch of pairs: the one module whose forward DDP/FSDP and autocast wrap.

By default (`pack_pairs`) each pair runs as one packed row, [prompt | chosen | rejected] under a mask that keeps
the responses apart (`trainers.packing`): the prompt goes through the linear layers once, in one pass of
ordinary-sized matrices, which made a forward and backward of HH-RLHF pairs 1.34x faster than two whole
sequences on a 2-core CPU (tests/bench/train_forward.py, docs/performance.md). Models that packing does not
cover (`can_pack`) take one of the paths below.

A pair's chosen and rejected responses share the prompt, so the prompt runs once: its keys and values feed both
continuations and gradients flow back through them (`trainers.prefix_sharing.batch_shared_logps`, the
function `score` uses, under autograd). The vocabulary projection runs at response positions only. Models
whose cache does not fit that path (`can_share`), gradient checkpointing (which turns the cache off) and
prompts that tokenize to nothing run each pair as two whole sequences (`trainers.logps.sequence_logps`);
both paths give the same numbers within float32 rounding (tests/test_train.py).

Whole sequences run in runs of similar length (`length_groups`), each padded to its own longest, not the
micro-batch's: the gradient is the same sum, and the padding that the linear layers would multiply through
(40% of the tokens of a micro-batch of multi-turn HH-RLHF pairs at max length 256) mostly goes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from trainers.encode import Encoded


def shares_prompts(model) -> bool:
    """Whether the prompt-sharing forward applies to this (possibly PEFT-wrapped) model."""
    from trainers.prefix_sharing import can_share

    checkpointing = any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
    return can_share(model) and not checkpointing


# What one more forward call costs, in padded tokens (its fixed cost, and smaller matrices): `length_groups`
# splits a micro-batch only where that saves more padding than this.
SPLIT_TOKENS = 64


def length_groups(lengths: Sequence[int], call_tokens: float = SPLIT_TOKENS) -> list[list[int]]:
    """Indices of `lengths`, longest first, cut into runs that minimise the padded tokens (each run padded to its
    longest) plus `call_tokens` per run: an exact dynamic programme over the sorted lengths."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    best, cut = [0.0] + [math.inf] * len(order), [0] * (len(order) + 1)
    for j in range(1, len(order) + 1):
        for i in range(j):
            cost = best[i] + (j - i) * lengths[order[i]] + call_tokens
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], len(order)
    while j:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1]


class PairLogps(torch.nn.Module):
    """Summed log-probs and token counts of each pair's responses: [chosen of every pair, then rejected]."""

    def __init__(self, model, pad_id: int, share_prompts: bool = True, split_tokens: float = SPLIT_TOKENS,
                 pack_pairs: bool = False):
        super().__init__()
        self.model = model
        self.pad_id = pad_id
        self.share = share_prompts and shares_prompts(model)
        self.pack = pack_pairs and not self.share
        self.split_tokens = split_tokens  # math.inf: every whole sequence (or packed pair) in one padded call

    def forward(self, encoded: Sequence[Encoded]) -> tuple[torch.Tensor, torch.Tensor]:
        from trainers.logps import collate, sequence_logps
        from trainers.prefix_sharing import batch_shared_logps

        responses = [e.responses[0] for e in encoded] + [e.responses[1] for e in encoded]
        if self.share and all(e.prompt for e in encoded):
            index: dict[tuple[int, ...], int] = {}
            owner = [index.setdefault(tuple(e.prompt), len(index)) for e in encoded]
            return batch_shared_logps(self.model, [list(p) for p in index], responses, owner * 2, self.pad_id)
        device = next(self.model.parameters()).device
        if self.pack and self.packs(encoded):
            return self._packed(encoded, device)
        prompts = [e.prompt for e in encoded] * 2
        sequences = [(p + r, len(p)) for p, r in zip(prompts, responses, strict=True)]
        groups = length_groups([len(ids) for ids, _ in sequences], self.split_tokens)
        parts = []
        for group in groups:
            batch = collate([sequences[i] for i in group], self.pad_id)
            parts.append(sequence_logps(self.model, **{k: v.to(device) for k, v in batch.items()}))
        return _in_order(parts, [i for group in groups for i in group], device)

    def packs(self, encoded: Sequence[Encoded]) -> bool:
        from trainers.packing import MAX_ROW_TOKENS, can_pack, packed_length

        longest = max(len(e.prompt) + len(r) for e in encoded for r in e.responses)
        return (all(e.prompt for e in encoded) and can_pack(self.model, longest)
                and max(packed_length(e.prompt, e.responses) for e in encoded) <= MAX_ROW_TOKENS)

    def _packed(self, encoded: Sequence[Encoded], device) -> tuple[torch.Tensor, torch.Tensor]:
        """Each pair as one row [prompt | chosen | rejected] (`trainers.packing`), rows of similar length run
        together (`length_groups`); the result in the whole-sequence path's order."""
        from trainers.packing import packed_length, packed_logps

        groups = length_groups([packed_length(e.prompt, e.responses) for e in encoded], self.split_tokens)
        parts, order = [], []
        for group in groups:
            parts.append(packed_logps(self.model, [(encoded[i].prompt, encoded[i].responses) for i in group],
                                      self.pad_id))
            order += group + [len(encoded) + i for i in group]  # the group's chosen, then its rejected
        return _in_order(parts, order, device)


def _in_order(parts: list[tuple[torch.Tensor, torch.Tensor]], order: list[int],
              device) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs, counts) of calls whose entries concatenated are the sequences `order`, put back in sequence
    order."""
    if len(parts) == 1 and order == list(range(len(order))):
        return parts[0]
    back = torch.argsort(torch.tensor(order, device=device))
    return torch.cat([lp for lp, _ in parts])[back], torch.cat([n for _, n in parts])[back]
