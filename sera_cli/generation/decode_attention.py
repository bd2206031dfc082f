"""Attention for one new token per sequence against a key/value cache, as plain matmuls.

torch's CPU `scaled_dot_product_attention` runs a decoding step (one query per sequence, SmolLM2's 9 query heads
grouped onto its 3 key/value heads, a padding mask) through its flash kernel, which on 2 CPU cores takes about
1.4x as long as two batched matmuls and a softmax over the same cache (4.4-5.0 ms against 3.2-3.4 ms per layer
for 256 sequences and 80 cached positions, float32). So decoding steps take this path: scores = q k^T * scale, padded
positions at -inf, softmax in float32, times v. Everything else (the prefill, dropout, soft-capping, position
biases, sliding windows) goes to transformers' own sdpa function, unchanged. The same attention, rounded in
another order: outputs differ from the flash kernel's in the last bits (about 1e-7 of the values), which can
flip a sample only where two candidates' noisy scores tie to within that.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

NAME = "sera_decode"


def decode_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query [B, Hq, T, D], key/value [B, Hkv, L, D] -> [B, T, Hq, D]."""
    special = (kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None
               or kwargs.get("sliding_window") is not None or kwargs.get("s_aux") is not None)
    if query.shape[2] != 1 or dropout or special or query.shape[1] % key.shape[1]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    b, hq, _, d = query.shape
    hkv = key.shape[1]
    q = query.reshape(b, hkv, hq // hkv, d)  # the query heads that share a key/value head, as rows
    scores = torch.matmul(q, key.transpose(-1, -2)) * (d ** -0.5 if scaling is None else scaling)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, float("-inf"))
        else:
            scores = scores + attention_mask
    probs = torch.softmax(scores.float(), dim=-1).to(value.dtype)
    out = torch.matmul(probs, value)  # [B, Hkv, G, D]
    return out.reshape(b, hq, 1, d).transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, decode_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)


def use_decode_attention(model) -> bool:
    """Switch a model that runs transformers' sdpa attention to this one; False (nothing changed) otherwise."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    try:
        model.set_attn_implementation(NAME)
    except (ValueError, NotImplementedError):
        return False
    return model.config._attn_implementation == NAME
