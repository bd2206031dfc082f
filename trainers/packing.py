"""A pair as one sequence: prompt, chosen, rejected, with a mask that keeps the two responses apart.

The row [prompt | chosen | rejected] runs once through the decoder with position ids that restart each
response at the prompt's length and an attention mask under which a response token sees the prompt and its own
response's earlier tokens, never the other response. Every token then has exactly the keys, values and
positions it has in its own whole sequence (prompt + response), so the log-probs are those of two separate
sequences within float32 rounding, and the prompt's tokens go through the linear layers once instead of twice
(a third of the tokens of a multi-turn HH-RLHF pair). Unlike `trainers.prefix_sharing`, which runs the prompt
and the responses as two passes with a key/value cache, it is one pass over rows of the usual size, so it
works under autograd, gradient checkpointing and every wrapper that only sees a forward call.

It needs a model that takes a prepared 4-D attention mask and position ids and whose attention is fully
described by them (`can_pack`): rotary position models of the families tested, attention through sdpa or
eager, and, where a sliding window exists, rows whose longest sequence fits inside it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# Model types checked against whole sequences (tests/test_packing.py, tests/test_families.py): rotary
# positions from position_ids, and a decoder that uses a 4-D mask as given.
PACKED_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3_text"})
PAD, PROMPT = -1, 0  # segment ids; the responses are 1, 2, ...
# The longest packed row: its mask is [T, T] per row, and its attention scores grow as T^2 while the linear
# layers grow as T. Pairs whose row is longer run as whole sequences; a prompt's many responses (a reference
# pass) are spread over rows of at most this (a row holds at least one response).
MAX_ROW_TOKENS = 4096


def can_pack(model, longest: int) -> bool:
    """Whether a pair may run as one packed row on `model` (possibly PEFT-wrapped), for rows whose longest
    sequence (prompt + one response) is `longest` tokens."""
    from trainers.logps import _head, text_config

    cfg = text_config(model)
    if getattr(cfg, "model_type", None) not in PACKED_TYPES or _head(model) is None:
        return False
    if getattr(cfg, "_attn_implementation", None) not in ("sdpa", "eager"):
        return False
    window = getattr(cfg, "sliding_window", None)
    return window is None or longest <= window


def packed_length(prompt: Sequence[int], responses: Sequence[Sequence[int]]) -> int:
    return len(prompt) + sum(len(r) for r in responses)


def split_responses(prompt_length: int, lengths: Sequence[int], limit: int | None = None) -> list[list[int]]:
    """Indices of one prompt's responses (token counts `lengths`) cut, in order, into rows whose packed length
    stays within `limit` (default `MAX_ROW_TOKENS`); a response longer than that gets a row of its own."""
    limit = MAX_ROW_TOKENS if limit is None else limit
    rows: list[list[int]] = []
    size = 0
    for i, n in enumerate(lengths):
        if rows and size + n <= limit:
            rows[-1].append(i)
            size += n
        else:
            rows.append([i])
            size = prompt_length + n
    return rows


def pack(rows: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]], pad_id: int, eager_dtype=None):
    """Right-padded packed batch of (prompt, responses) rows.

    Returns a dict with input_ids and position_ids [B, T], attention_mask [B, 1, T, T] (bool; additive float in
    `eager_dtype` when given, for eager attention), and for every response token, response by response and row
    by row: `source` (flat index into [B * T] of the position whose hidden state predicts it), `target` (its
    id) and `owner` (which response of which row: `k * B + b` for response k of row b).
    """
    B = len(rows)
    T = max(packed_length(p, rs) for p, rs in rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    positions = torch.zeros((B, T), dtype=torch.long)
    segment = torch.full((B, T), PAD, dtype=torch.long)
    source, target, owner = [], [], []
    for b, (prompt, responses) in enumerate(rows):
        P = len(prompt)
        if P == 0:
            raise ValueError("a packed row needs a prompt: its first response token has nothing to predict it")
        input_ids[b, :P] = torch.tensor(list(prompt), dtype=torch.long)
        positions[b, :P] = torch.arange(P)
        segment[b, :P] = PROMPT
        start = P
        for k, resp in enumerate(responses):
            n = len(resp)
            if n:
                input_ids[b, start:start + n] = torch.tensor(list(resp), dtype=torch.long)
                positions[b, start:start + n] = torch.arange(P, P + n)
                segment[b, start:start + n] = k + 1
                # token j of the response is predicted by token j-1 of it, the first by the prompt's last
                source.append(torch.cat([torch.tensor([P - 1]), torch.arange(start, start + n - 1)]) + b * T)
                target.append(torch.tensor(list(resp), dtype=torch.long))
                owner.append(torch.full((n,), k * B + b, dtype=torch.long))
            start += n
    q, k = segment.unsqueeze(2), segment.unsqueeze(1)  # [B, T, 1], [B, 1, T]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    allowed = causal & (q != PAD) & (k != PAD) & ((k == PROMPT) | (k == q))
    allowed |= torch.eye(T, dtype=torch.bool)  # padding queries see themselves: no row of the mask is empty
    mask = allowed.unsqueeze(1)
    if eager_dtype is not None:
        mask = torch.zeros(mask.shape, dtype=eager_dtype).masked_fill(~mask, torch.finfo(eager_dtype).min)
    empty = torch.empty(0, dtype=torch.long)
    return {"input_ids": input_ids, "position_ids": positions, "attention_mask": mask,
            "source": torch.cat(source) if source else empty, "target": torch.cat(target) if target else empty,
            "owner": torch.cat(owner) if owner else empty}


def packed_logps(model, rows: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]],
                 pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs (in `trainers.logps.sum_dtype`) and token counts of each row's responses, [response 0
    of every row, then response 1, ...] (K x B entries for rows of up to K responses; a row's missing ones are
    0), from one packed forward (`pack`); the vocabulary projection at response tokens only, as
    `trainers.logps.sequence_logps` does."""
    from trainers.logps import _head, projected_logps, sum_by_row, text_config

    parts = _head(model)
    if parts is None:
        raise ValueError("packing needs a model whose logits are a projection of the last hidden state")
    decoder, head = parts
    param = next(model.parameters())
    eager = getattr(text_config(model), "_attn_implementation", None) == "eager"
    batch = {k: v.to(param.device) for k, v in pack(rows, pad_id, param.dtype if eager else None).items()}
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     position_ids=batch["position_ids"], use_cache=False).last_hidden_state
    owner = batch["owner"]
    picked = projected_logps(head, hidden.reshape(-1, hidden.shape[-1])[batch["source"]], batch["target"])
    n = max(len(rs) for _, rs in rows) * len(rows)
    ntok = torch.zeros(n, dtype=torch.long, device=param.device).index_add(0, owner, torch.ones_like(owner))
    return sum_by_row(picked, owner, n), ntok
