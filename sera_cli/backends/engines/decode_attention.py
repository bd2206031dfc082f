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

from sera_cli.backends.engines.decode_cache import KWARG, SharedPromptLayer

NAME = "sera_decode"


def decode_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query [B, Hq, T, D], key/value [B, Hkv, L, D] -> [B, T, Hq, D]."""
    special = (kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None
               or kwargs.get("sliding_window") is not None or kwargs.get("s_aux") is not None)
    shared = kwargs.pop(KWARG, None)
    if query.shape[2] != 1 or dropout or special or query.shape[1] % key.shape[1]:
        if shared is not None:
            raise RuntimeError("a shared-prompt cache reached an attention this function leaves to sdpa")
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    b, hq, _, d = query.shape
    hkv = key.shape[1]
    scale = d ** -0.5 if scaling is None else scaling
    if shared is not None:  # each prompt's keys/values once for its samples (decode_cache.SharedPromptLayer)
        return shared_prompt_attention(query, shared.layers[module.layer_idx], key, value, attention_mask, scale), None
    q = query.reshape(b, hkv, hq // hkv, d)  # the query heads that share a key/value head, as rows
    probs = weights(torch.matmul(q, key.transpose(-1, -2)) * scale, attention_mask, value.dtype)
    out = torch.matmul(probs, value)  # [B, Hkv, G, D]
    return out.reshape(b, hq, 1, d).transpose(1, 2).contiguous(), None


def weights(scores: torch.Tensor, attention_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Softmax (in float32) of scaled scores, padded positions at -inf (a bool mask) or added (an additive one)."""
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, float("-inf"))
        else:
            scores = scores + attention_mask
    return torch.softmax(scores.float(), dim=-1).to(dtype)


def shared_prompt_attention(query: torch.Tensor, layer: SharedPromptLayer, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """One query per row over a cache that keeps each prompt once: query [B, Hq, 1, D], key/value the generated
    part [B, Hkv, T, D], the mask over prompt then generated positions [B, 1, 1, P + T] -> [B, 1, Hq, D].

    The prompt part is scored with all of a prompt's samples' queries in one matrix (one per prompt and
    key/value head instead of one per sample), then one softmax runs over prompt and generated positions
    together, so the weights are those of the whole row."""
    b, hq, _, d = query.shape
    hkv, g, n = key.shape[1], hq // key.shape[1], layer.group
    pk, pv = layer.prompt_keys, layer.prompt_values
    prompts, p = pk.shape[0], pk.shape[2]
    layer.reads += 1
    q = query.reshape(b, hkv, g, d)

    def by_prompt(x: torch.Tensor) -> torch.Tensor:  # [B, Hkv, g, X] -> [prompts, Hkv, n * g, X]
        return x.reshape(prompts, n, hkv, g, -1).transpose(1, 2).reshape(prompts, hkv, n * g, x.shape[-1])

    def by_row(x: torch.Tensor) -> torch.Tensor:  # the inverse
        return x.reshape(prompts, hkv, n, g, -1).transpose(1, 2).reshape(b, hkv, g, x.shape[-1])

    scores = torch.cat([by_row(torch.matmul(by_prompt(q), pk.transpose(-1, -2))),
                        torch.matmul(q, key.transpose(-1, -2))], dim=-1) * scaling
    probs = weights(scores, attention_mask, value.dtype)
    out = by_row(torch.matmul(by_prompt(probs[..., :p]), pv)) + torch.matmul(probs[..., p:], value)
    return out.reshape(b, hq, 1, d).transpose(1, 2).contiguous()


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
