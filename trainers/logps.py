"""The one log-prob function: summed (or averaged) log pi(y|x) over response tokens.

`score` and `train` both call `sequence_logps`, so the margin that selects pairs is exactly the quantity the
trainer optimises. The vocabulary projection and log-softmax run only at response positions (the full-width
logits over every position dominate memory and time for small models), and the log-softmax is in float32.
"""

from __future__ import annotations

import torch

IGNORE = -100
_PROJECT_CHUNK = 2048  # response positions projected to the vocabulary at a time when no gradient is needed


class Head:
    """The vocabulary projection of a model whose logits are a plain function of the last hidden state:
    `module(h)` (the output embedding), times `scale` (Cohere's logit_scale, Granite's 1/logits_scaling), then
    soft-capped as `cap * tanh(x / cap)` (Gemma 2's final_logit_softcapping), as the model's own forward does."""

    def __init__(self, module, cap: float | None = None, scale: float | None = None):
        self.module, self.cap, self.scale = module, cap, scale

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.finish(self.module(hidden))

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale is not None:
            x = x * self.scale
        if self.cap is not None:
            x = torch.tanh(x / self.cap) * self.cap
        return x

    def linear(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(weight [V, H], bias) when the module is a plain linear layer (not wrapped by an adapter)."""
        m = self.module
        if type(m) is not torch.nn.Linear:
            return None
        return m.weight, m.bias


def text_config(model):
    """The decoder's own config (a multimodal model's text part; the config itself otherwise)."""
    cfg = model.config
    return cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg


def _head(model):
    """(decoder, Head) when the model's logits are a function of the decoder's last hidden state alone."""
    cfg = text_config(model)
    cap = getattr(cfg, "final_logit_softcapping", None)
    scale = getattr(cfg, "logit_scale", None)
    if getattr(cfg, "logits_scaling", None) not in (None, 1, 1.0):  # Granite divides its logits
        scale = (scale or 1.0) / cfg.logits_scaling
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    if decoder is None or head is None:
        return None
    return decoder, Head(head, float(cap) if cap else None, float(scale) if scale not in (None, 1, 1.0) else None)


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
    """log softmax(head(hidden))[token] per row, in float32.

    Logits whose [rows, vocabulary] fit `FULL_LOGITS` entries are computed whole (without a gradient, in chunks of
    `_PROJECT_CHUNK` rows, so a 2,048 x 64k chunk at most). Larger ones go through
    `trainers.vocab_chunks` (positions x vocabulary blocks, log-sum-exp accumulated in float32; its backward
    recomputes each block, never holding a [rows, vocabulary] gradient), so memory stays flat in the vocabulary;
    a head that is not a plain linear layer is projected in row chunks when no gradient is needed."""
    from trainers.vocab_chunks import FULL_LOGITS, chunked_logps

    vocab = _vocab_size(head)
    rows = len(tokens) if torch.is_grad_enabled() else min(len(tokens), _PROJECT_CHUNK)  # the rows held at once
    if vocab is not None and rows * vocab > FULL_LOGITS and isinstance(head, Head) and head.linear():
        weight, bias = head.linear()
        return chunked_logps(hidden, weight, bias, tokens, head.cap, head.scale)
    if torch.is_grad_enabled() or len(tokens) <= _PROJECT_CHUNK:
        return _token_logps(head(hidden), tokens)
    return torch.cat([_token_logps(head(hidden[i:i + _PROJECT_CHUNK]), tokens[i:i + _PROJECT_CHUNK])
                      for i in range(0, len(tokens), _PROJECT_CHUNK)])


def _vocab_size(head) -> int | None:
    module = head.module if isinstance(head, Head) else head
    weight = getattr(module, "weight", None)
    return int(weight.shape[0]) if weight is not None and weight.dim() == 2 else None


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
