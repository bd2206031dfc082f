"""Prompt sharing: run each prompt once, then score its responses from the prompt's KV cache.

A pair's chosen and rejected (or a prompt's N candidates) share the prompt, so the prompt's tokens go through
the model once instead of once per response. Prompts and responses are batched apart, each sorted by its own
length, so neither pads to the other's length: padding only costs in the attention over the prompt's cached
keys, never in the linear layers that dominate a forward pass. The prompt pass keeps each prompt's keys and
values; a response batch gathers the keys of its prompts (left-padded to the longest), and its positions
continue each prompt's own length.

The same functions run under autograd for training (`batch_shared_logps`): a pair's chosen and rejected rows
gather the keys and values of their one prompt pass (one `index_select`, never the prompt's cache updated in
place), so autograd sums both continuations' gradients into it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache as memoize

import torch

from trainers.batching import length_batches, windows
from trainers.logps import _head, projected_logps, sum_by_row, sum_dtype

KV_TOKENS_PER_BATCH_TOKEN = 8  # a response batch's gathered prompt keys: at most this many x its token budget


@dataclass
class PromptState:
    """A prompt after the prompt pass: keys and values [layers, 2, kv_heads, length, head_dim] and the last
    hidden state (it predicts the first response token)."""

    kv: torch.Tensor
    last: torch.Tensor

    @property
    def length(self) -> int:
        return self.kv.shape[3]


def left_pad(prompts: Sequence[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask [len(prompts), longest], padded on the left."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for k, p in enumerate(prompts):
        ids[k, width - len(p):] = torch.tensor(p)
        mask[k, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def _prompt_batch(decoder, prompts: Sequence[list[int]], pad_id: int, device) -> tuple[torch.Tensor, ...]:
    """One left-padded prompt batch through the decoder: keys and values [layers, 2, B, kv_heads, L, head_dim],
    the attention mask [B, L] and each prompt's last hidden state [B, hidden]."""
    from transformers import DynamicCache

    ids, att = left_pad(prompts, pad_id, device)
    # A cache made here keeps every layer's full keys and values: a sliding-window layer's own cache would drop
    # the prompt's early keys, while its attention mask already limits what each position sees.
    out = decoder(input_ids=ids, attention_mask=att, position_ids=(att.cumsum(-1) - 1).clamp(min=0),
                  use_cache=True, **{cache_kwarg(decoder): DynamicCache()})
    cache = getattr(out, "past_key_values", None) or getattr(out, "cache", None)
    kv = torch.stack([torch.stack([layer.keys, layer.values]) for layer in cache.layers])
    return kv, att, out.last_hidden_state[:, -1]


def prompt_states(model, prompts: Sequence[list[int]], pad_id: int, batch_tokens: int) -> list[PromptState]:
    """Run every prompt once (length-sorted, left-padded batches); each prompt's keys, values and last state."""
    decoder, _ = _head(model)
    device = next(model.parameters()).device
    states: list[PromptState | None] = [None] * len(prompts)
    for batch in length_batches([len(p) for p in prompts], batch_tokens):
        kv, _, last = _prompt_batch(decoder, [prompts[i] for i in batch], pad_id, device)
        L = kv.shape[4]
        for b, i in enumerate(batch):
            states[i] = PromptState(kv[:, :, b, :, L - len(prompts[i]):], last[b])
    return states


def _continue(model, kv: torch.Tensor, prompt_att: torch.Tensor, last: torch.Tensor,
              responses: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs and counts of each response k after its prompt: keys and values kv[:, :, k] (left-padded
    to P, [layers, 2, K, kv_heads, P, head_dim]), its mask prompt_att[k] and last hidden state last[k]."""
    from transformers import DynamicCache

    decoder, head = _head(model)
    device = kv.device
    K, R = len(responses), max(len(r) for r in responses)
    ids = torch.full((K, R), pad_id, dtype=torch.long)
    ratt = torch.zeros((K, R), dtype=torch.long)
    for k, r in enumerate(responses):
        ids[k, :len(r)] = torch.tensor(r)
        ratt[k, :len(r)] = 1
    ids, ratt, prompt_att = ids.to(device), ratt.to(device), prompt_att.to(device)
    cache = DynamicCache()
    for layer in range(kv.shape[0]):
        cache.update(kv[layer, 0], kv[layer, 1], layer)
    att = torch.cat([prompt_att, ratt], dim=1)
    positions = prompt_att.sum(-1, keepdim=True) + torch.arange(R, device=device).unsqueeze(0)
    hidden = decoder(input_ids=ids, attention_mask=att, position_ids=positions, use_cache=True,
                     **{cache_kwarg(decoder): cache}).last_hidden_state
    # Token t of a response is predicted by the hidden state before it: the prompt's last for t = 0.
    before = torch.cat([last.unsqueeze(1), hidden[:, :-1]], dim=1)
    mask = ratt.bool()
    picked = projected_logps(head, before[mask], ids[mask])
    rows = mask.nonzero(as_tuple=True)[0]
    return sum_by_row(picked, rows, K), mask.sum(-1)


def response_logps(model, states: Sequence[PromptState], responses: Sequence[list[int]],
                   pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs and counts of each response given the prompt whose state is `states[k]`.

    Equal, up to float rounding, to `sequence_logps` on the concatenated sequences.
    """
    device = states[0].kv.device
    K, P = len(responses), max(s.length for s in states)
    layers, _, heads, _, dim = states[0].kv.shape
    kv = torch.zeros((layers, 2, K, heads, P, dim), dtype=states[0].kv.dtype, device=device)
    att = torch.zeros((K, P), dtype=torch.long)
    for k, s in enumerate(states):
        kv[:, :, k, :, P - s.length:] = s.kv
        att[k, P - s.length:] = 1
    return _continue(model, kv, att, torch.stack([s.last for s in states]), responses, pad_id)


def shared_logps(model, prompts: Sequence[list[int]], responses: Sequence[list[int]], owner: Sequence[int],
                 pad_id: int, batch_tokens: int, window_tokens: int,
                 on_batch: Callable[[list[int]], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs and counts of `responses[k]` given `prompts[owner[k]]`, every prompt run once.

    Prompts go in windows of at most `window_tokens` prompt tokens (their keys and values are held until the
    window's responses are scored); `on_batch(response indices)` is called after each response batch.
    """
    device = next(model.parameters()).device
    logps = torch.zeros(len(responses), dtype=sum_dtype(device), device=device)
    ntok = torch.zeros(len(responses), dtype=torch.long, device=device)
    members: list[list[int]] = [[] for _ in prompts]
    for k, g in enumerate(owner):
        members[g].append(k)
    kv_budget = KV_TOKENS_PER_BATCH_TOKEN * batch_tokens
    for window in windows([len(p) for p in prompts], window_tokens):
        states = dict(zip(window, prompt_states(model, [prompts[g] for g in window], pad_id, batch_tokens),
                          strict=True))
        todo = [k for g in window for k in members[g]]
        for batch in length_batches([len(responses[k]) for k in todo], batch_tokens,
                                    [states[owner[k]].length for k in todo], kv_budget):
            idx = [todo[j] for j in batch]
            lp, n = response_logps(model, [states[owner[k]] for k in idx], [responses[k] for k in idx], pad_id)
            logps[idx], ntok[idx] = lp, n
            if on_batch:
                on_batch(idx)
        del states
    return logps, ntok


def batch_shared_logps(model, prompts: Sequence[list[int]], responses: Sequence[list[int]],
                       owner: Sequence[int], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`shared_logps` of one training micro-batch, differentiable: the prompts in one left-padded batch, the
    responses in one batch over their prompts' keys and values, gathered with one `index_select` (no per-row
    copies, so the backward is one scatter-add). Equal to `sequence_logps` on the concatenated sequences,
    values and gradients, within float32 rounding."""
    decoder, _ = _head(model)
    device = next(model.parameters()).device
    kv, att, last = _prompt_batch(decoder, prompts, pad_id, device)
    own = torch.tensor(list(owner), dtype=torch.long, device=device)
    return _continue(model, kv.index_select(2, own), att.index_select(0, own), last.index_select(0, own),
                     responses, pad_id)


@memoize
def _forward_params(forward) -> frozenset[str]:
    return frozenset(inspect.signature(forward).parameters)


def cache_kwarg(model) -> str:
    """transformers renamed `past_key_values` to `cache` (5.20); the name this model's forward takes."""
    return "cache" if "cache" in _forward_params(type(model).forward) else "past_key_values"


def can_share(model) -> bool:
    """Whether prompt sharing applies: the logits are a function of the last hidden state (`_head`).

    Sliding-window layers (Gemma 2/3, Mistral) share too: the prompt pass keeps their full keys and values
    (`_prompt_batch`), left padding keeps each query's distance to each key, and the model's sliding-window mask
    limits attention as in a whole-sequence forward (tests/test_sliding_share.py)."""
    return _head(model) is not None
