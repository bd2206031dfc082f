"""The policy's log-probs of a micro-batch of pairs: the one module whose forward DDP/FSDP and autocast wrap.

A pair's chosen and rejected responses share the prompt, so the prompt runs once: its keys and values feed both
continuations and gradients flow back through them (`trainers.prefix_sharing.batch_shared_logps`, the
function `score` uses, under autograd). The vocabulary projection runs at response positions only. Models
whose cache does not fit that path (`can_share`), gradient checkpointing (which turns the cache off) and
prompts that tokenize to nothing run each pair as two whole sequences (`trainers.logps.sequence_logps`);
both paths give the same numbers within float32 rounding (tests/test_train.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from trainers.encode import Encoded


def shares_prompts(model) -> bool:
    """Whether the prompt-sharing forward applies to this (possibly PEFT-wrapped) model."""
    from trainers.prefix_sharing import can_share

    checkpointing = any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
    return can_share(model) and not checkpointing


class PairLogps(torch.nn.Module):
    """Summed log-probs and token counts of each pair's responses: [chosen of every pair, then rejected]."""

    def __init__(self, model, pad_id: int, share_prompts: bool = True):
        super().__init__()
        self.model = model
        self.pad_id = pad_id
        self.share = share_prompts and shares_prompts(model)

    def forward(self, encoded: Sequence[Encoded]) -> tuple[torch.Tensor, torch.Tensor]:
        from trainers.logps import collate, sequence_logps
        from trainers.prefix_sharing import batch_shared_logps

        responses = [e.responses[0] for e in encoded] + [e.responses[1] for e in encoded]
        if self.share and all(e.prompt for e in encoded):
            index: dict[tuple[int, ...], int] = {}
            owner = [index.setdefault(tuple(e.prompt), len(index)) for e in encoded]
            return batch_shared_logps(self.model, [list(p) for p in index], responses, owner * 2, self.pad_id)
        device = next(self.model.parameters()).device
        prompts = [e.prompt for e in encoded] * 2
        batch = collate([(p + r, len(p)) for p, r in zip(prompts, responses, strict=True)], self.pad_id)
        return sequence_logps(self.model, **{k: v.to(device) for k, v in batch.items()})
