"""The one log-prob function: summed (or averaged) log pi(y|x) over response tokens.

`score` and `train` both call `sequence_logps`, so the margin that selects pairs is exactly the quantity the
trainer optimises. The vocabulary projection and log-softmax run only at response positions (the full-width
logits over every position dominate memory and time for small models), and the log-softmax is in float32.
"""

from __future__ import annotations

import torch

IGNORE = -100
_PROJECT_CHUNK = 2048  # response positions projected to the vocabulary at a time when no gradient is needed


def _head(model):
    """(decoder, lm_head) when the model's logits are a plain projection of the decoder's last hidden state."""
    cfg = model.config
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        return None
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    if decoder is None or head is None:
        return None
    return decoder, head


def sequence_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                   average: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence log-probs of the labelled tokens and their counts.

    input_ids, attention_mask, labels: [B, T], right-padded; labels hold the token id at response positions and
    IGNORE elsewhere (prompt, padding). Returns (logps [B] in `sum_dtype`, ntok [B] int64): the sum over response
    tokens of log softmax(logits[t-1])[labels[t]], divided by ntok when `average` (SimPO's length normalisation).
    """
    if input_ids.dim() != 2 or input_ids.shape != labels.shape or input_ids.shape != attention_mask.shape:
        raise ValueError(f"shapes differ: input_ids {tuple(input_ids.shape)}, labels {tuple(labels.shape)}, "
                         f"attention_mask {tuple(attention_mask.shape)}")
    targets = labels[:, 1:]
    mask = targets != IGNORE
    rows = mask.nonzero(as_tuple=True)[0]
    tok = targets[mask]
    parts = _head(model)
    if parts is None:  # models whose logits are not a plain projection: full logits, then select
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        picked = _token_logps(logits[:, :-1][mask], tok)
    else:
        decoder, head = parts
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        picked = projected_logps(head, hidden[:, :-1][mask], tok)
    logps = sum_by_row(picked, rows, input_ids.shape[0])
    ntok = mask.sum(dim=1)
    if average:
        logps = logps / ntok.clamp(min=1)
    return logps, ntok


def sum_dtype(device: torch.device) -> torch.dtype:
    """What per-sequence log-prob sums accumulate in: float64 (float32 on Apple's mps, which has no float64).

    A float32 sum of a few hundred token log-probs carries the rounding of its running total (an ulp of a
    600-nat sum is 6e-5), as much as the float32 forward pass itself puts into it.
    """
    return torch.float32 if device.type == "mps" else torch.float64


def sum_by_row(values: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Sums of `values` grouped by row index, in `sum_dtype`."""
    dtype = sum_dtype(values.device)
    return torch.zeros(n_rows, dtype=dtype, device=values.device).index_add(0, rows, values.to(dtype))


def projected_logps(head, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(head(hidden))[token] per row; in chunks when no gradient is needed, to bound memory."""
    if torch.is_grad_enabled() or len(tokens) <= _PROJECT_CHUNK:
        return _token_logps(head(hidden), tokens)
    return torch.cat([_token_logps(head(hidden[i:i + _PROJECT_CHUNK]), tokens[i:i + _PROJECT_CHUNK])
                      for i in range(0, len(tokens), _PROJECT_CHUNK)])


def _token_logps(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] for each row, in float32."""
    logits = logits.float()
    return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def collate(sequences: list[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch from (token ids, prompt length) pairs; labels mark the response tokens."""
    T = max(len(ids) for ids, _ in sequences)
    B = len(sequences)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    for i, (ids, plen) in enumerate(sequences):
        n = len(ids)
        input_ids[i, :n] = torch.tensor(ids)
        attention_mask[i, :n] = 1
        labels[i, plen:n] = input_ids[i, plen:n]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
