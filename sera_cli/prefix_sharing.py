"""Prompt sharing: run each prompt once, then score all of its responses from the prompt's KV cache.

A pair's chosen and rejected (or a prompt's N candidates) share the prompt, so the prompt's tokens go through
the model once instead of once per response. Prompts are left-padded so every prompt ends at the same column;
responses are right-padded after it, with positions that continue each prompt's own length.
"""

from __future__ import annotations

import inspect
from functools import cache as memoize

import torch

from sera_cli.logps import _head, projected_logps


def shared_prompt_logps(model, prompts: list[list[int]], responses: list[list[int]], owner: list[int],
                        pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs and counts of each response given its prompt `prompts[owner[k]]` (no gradient).

    Equal, up to float rounding, to `sequence_logps` on the concatenated sequences.
    """
    decoder, head = _head(model)
    device = next(model.parameters()).device
    G, Lp = len(prompts), max(len(p) for p in prompts)
    p_ids = torch.full((G, Lp), pad_id, dtype=torch.long)
    p_att = torch.zeros((G, Lp), dtype=torch.long)
    for g, p in enumerate(prompts):
        p_ids[g, Lp - len(p):] = torch.tensor(p)
        p_att[g, Lp - len(p):] = 1
    p_ids, p_att = p_ids.to(device), p_att.to(device)
    p_pos = (p_att.cumsum(-1) - 1).clamp(min=0)
    out = decoder(input_ids=p_ids, attention_mask=p_att, position_ids=p_pos, use_cache=True)
    cache = getattr(out, "past_key_values", None) or getattr(out, "cache", None)
    last = out.last_hidden_state[:, -1]

    K, R = len(responses), max(len(r) for r in responses)
    own = torch.tensor(owner, device=device)
    r_ids = torch.full((K, R), pad_id, dtype=torch.long)
    r_att = torch.zeros((K, R), dtype=torch.long)
    for k, r in enumerate(responses):
        r_ids[k, :len(r)] = torch.tensor(r)
        r_att[k, :len(r)] = 1
    r_ids, r_att = r_ids.to(device), r_att.to(device)
    cache.batch_select_indices(own)
    lengths = p_att.sum(-1)[own]
    r_pos = lengths.unsqueeze(1) + torch.arange(R, device=device).unsqueeze(0)
    hidden = decoder(input_ids=r_ids, attention_mask=torch.cat([p_att[own], r_att], dim=1), position_ids=r_pos,
                     use_cache=True, **{_cache_kwarg(decoder): cache}).last_hidden_state
    # Token t of a response is predicted by the hidden state before it: the prompt's last for t = 0.
    before = torch.cat([last[own].unsqueeze(1), hidden[:, :-1]], dim=1)
    mask = r_att.bool()
    picked = projected_logps(head, before[mask], r_ids[mask])
    rows = mask.nonzero(as_tuple=True)[0]
    logps = torch.zeros(K, dtype=torch.float32, device=device).index_add(0, rows, picked.float())
    return logps, mask.sum(-1)


@memoize
def _forward_params(forward) -> frozenset[str]:
    return frozenset(inspect.signature(forward).parameters)


def _cache_kwarg(decoder) -> str:
    """transformers renamed `past_key_values` to `cache` (5.x); use whichever this version takes."""
    return "cache" if "cache" in _forward_params(type(decoder).forward) else "past_key_values"


def can_share(model) -> bool:
    return _head(model) is not None
