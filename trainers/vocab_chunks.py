"""Response-token log-probs with memory flat in the vocabulary.

log softmax(z)[t] for z = cap * tanh(scale * (h W^T + b) / cap) is computed over blocks of positions and of
vocabulary entries: each block's logits are made, folded into a running max and sum of exponentials (the
log-sum-exp, in float32) and the target's logit is picked, then the block is dropped. The backward pass
(`_ChunkedLogps.backward`) recomputes each block's logits from the saved hidden states and the saved
log-sum-exp, so neither pass holds a [positions, vocabulary] tensor: the largest temporary is one block
(`BLOCK_ENTRIES` float32 entries), whatever the vocabulary.

The matrix products run in the dtype the full projection would use (the autocast dtype when autocast is on,
else the weight's), and everything after them in float32, so the numbers equal the full-logits path within
float32 rounding (tests/test_vocab_chunks.py).
"""

from __future__ import annotations

import torch

# [positions, vocabulary] entries up to which the full logits are made at once (512 MB in float32): the blocked
# path is 1.5-2x slower than one projection and log-softmax on CPU, so it is kept for logits that would not fit.
FULL_LOGITS = 1 << 27
BLOCK_ENTRIES = 1 << 23  # float32 entries of one block (32 MB)
VOCAB_BLOCK = 16384  # vocabulary entries per block


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _blocks(n: int, vocab: int):
    vb = min(vocab, VOCAB_BLOCK)
    rows = max(1, BLOCK_ENTRIES // vb)
    for r0 in range(0, n, rows):
        for v0 in range(0, vocab, vb):
            yield r0, min(r0 + rows, n), v0, min(v0 + vb, vocab)


def _logits(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, cap: float | None, scale: float | None,
            dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(pre-cap logits, logits) of one block in float32."""
    x = torch.nn.functional.linear(h.to(dtype), w.to(dtype), None if b is None else b.to(dtype)).float()
    if scale is not None:
        x = x * scale
    z = torch.tanh(x / cap) * cap if cap is not None else x
    return x, z


def _forward(hidden, weight, bias, tokens, cap, scale, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(target logits, log-sum-exp) per row, both float32."""
    n, vocab = hidden.shape[0], weight.shape[0]
    device = hidden.device
    lse = torch.empty(n, dtype=torch.float32, device=device)
    picked = torch.empty(n, dtype=torch.float32, device=device)
    rows_done = -1
    for r0, r1, v0, v1 in _blocks(n, vocab):
        if r0 != rows_done:  # a new row block: reset its running log-sum-exp
            acc = torch.full((r1 - r0,), float("-inf"), dtype=torch.float32, device=device)
            rows_done = r0
        _, z = _logits(hidden[r0:r1], weight[v0:v1], None if bias is None else bias[v0:v1], cap, scale, dtype)
        t = tokens[r0:r1]
        inside = (t >= v0) & (t < v1)
        if inside.any():
            idx = inside.nonzero(as_tuple=True)[0]
            picked[r0 + idx] = z[idx, t[idx] - v0]
        acc = torch.logaddexp(acc, torch.logsumexp(z, dim=1))
        if v1 == vocab:
            lse[r0:r1] = acc
    return picked, lse


class _ChunkedLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, tokens, cap, scale):
        dtype = _compute_dtype(hidden, weight)
        with torch.no_grad():
            picked, lse = _forward(hidden, weight, bias, tokens, cap, scale, dtype)
        ctx.save_for_backward(hidden, weight, bias, tokens, lse)
        ctx.cap, ctx.scale, ctx.dtype = cap, scale, dtype
        return picked - lse

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, bias, tokens, lse = ctx.saved_tensors
        cap, scale, dtype = ctx.cap, ctx.scale, ctx.dtype
        n, vocab = hidden.shape[0], weight.shape[0]
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and \
            ctx.needs_input_grad[2]
        grad = grad.float()
        gh = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
        gw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        gb = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        with torch.no_grad():
            for r0, r1, v0, v1 in _blocks(n, vocab):
                h = hidden[r0:r1]
                _, z = _logits(h, weight[v0:v1], None if bias is None else bias[v0:v1], cap, scale, dtype)
                g = grad[r0:r1].unsqueeze(1)
                slope = 1 - (z / cap) ** 2 if cap is not None else None  # z = cap * tanh(x / cap): dz/dx
                # d logp / d z = onehot(target) - softmax(z); times the upstream gradient (in place: z is ours)
                dz = z.sub_(lse[r0:r1].unsqueeze(1)).exp_().mul_(-g)
                t = tokens[r0:r1]
                inside = (t >= v0) & (t < v1)
                if inside.any():
                    idx = inside.nonzero(as_tuple=True)[0]
                    dz[idx, t[idx] - v0] += grad[r0:r1][idx]
                if slope is not None:
                    dz.mul_(slope)
                if scale is not None:
                    dz.mul_(scale)
                dzc = dz.to(dtype)
                if need_h:
                    gh[r0:r1] += (dzc @ weight[v0:v1].to(dtype)).float()
                if need_w:
                    gw[v0:v1] += (dzc.t() @ h.to(dtype)).float()
                if need_b:
                    gb[v0:v1] += dz.sum(dim=0)
        return (gh.to(hidden.dtype) if need_h else None, gw.to(weight.dtype) if need_w else None,
                gb.to(bias.dtype) if need_b else None, None, None, None)


def chunked_logps(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tokens: torch.Tensor,
                  cap: float | None = None, scale: float | None = None) -> torch.Tensor:
    """log softmax(cap * tanh(scale * (hidden W^T + b) / cap))[token] per row [N], float32, differentiable in
    hidden, weight and bias."""
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return _ChunkedLogps.apply(hidden, weight, bias, tokens, cap, scale)
    with torch.no_grad():
        picked, lse = _forward(hidden, weight, bias, tokens, cap, scale, _compute_dtype(hidden, weight))
    return picked - lse
