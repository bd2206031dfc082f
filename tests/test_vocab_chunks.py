"""The vocabulary-chunked log-probs (trainers.vocab_chunks) equal the full-logits computation: values and
gradients (hidden states, weight, bias), with and without soft-capping and a logit scale, within float32
rounding; and `projected_logps` takes the chunked path for large [positions, vocabulary] logits."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from trainers import vocab_chunks  # noqa: E402
from trainers.logps import Head, projected_logps  # noqa: E402


def full(hidden, weight, bias, tokens, cap, scale):
    """The plain computation: all logits, then log_softmax and gather."""
    x = torch.nn.functional.linear(hidden, weight, bias)
    if scale is not None:
        x = x * scale
    if cap is not None:
        x = torch.tanh(x / cap) * cap
    return torch.log_softmax(x.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks far smaller than the problem, so rows and vocabulary both span several blocks (uneven tails)."""
    monkeypatch.setattr(vocab_chunks, "VOCAB_BLOCK", 37)
    monkeypatch.setattr(vocab_chunks, "BLOCK_ENTRIES", 37 * 5)


@pytest.mark.parametrize("cap,scale,with_bias", [(None, None, False), (30.0, None, False), (5.0, 0.5, True)])
def test_chunked_equals_full_values_and_gradients(small_blocks, cap, scale, with_bias):
    torch.manual_seed(0)
    n, h, v = 23, 16, 200
    hidden = (torch.randn(n, h) * 3).requires_grad_()
    weight = torch.randn(v, h).requires_grad_()
    bias = torch.randn(v).requires_grad_() if with_bias else None
    tokens = torch.randint(0, v, (n,))
    tokens[0], tokens[1] = 0, v - 1  # the first and last vocabulary entries
    upstream = torch.randn(n)

    want = full(hidden, weight, bias, tokens, cap, scale)
    params = [hidden, weight] + ([bias] if with_bias else [])
    want_grads = torch.autograd.grad((want * upstream).sum(), params)
    got = vocab_chunks.chunked_logps(hidden, weight, bias, tokens, cap, scale)
    got_grads = torch.autograd.grad((got * upstream).sum(), params)

    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_no_grad_path_equals_full(small_blocks):
    torch.manual_seed(1)
    hidden, weight, tokens = torch.randn(41, 8), torch.randn(150, 8), torch.randint(0, 150, (41,))
    with torch.inference_mode():
        got = vocab_chunks.chunked_logps(hidden, weight, None, tokens, 20.0)
    torch.testing.assert_close(got, full(hidden, weight, None, tokens, 20.0, None), rtol=1e-5, atol=1e-5)


def test_projected_logps_switches_to_chunks_for_large_logits(monkeypatch):
    """Over FULL_LOGITS entries the chunked function runs (no [rows, vocab] tensor); below it the full one."""
    torch.manual_seed(2)
    head = torch.nn.Linear(8, 100, bias=False)
    hidden, tokens = torch.randn(30, 8, requires_grad=True), torch.randint(0, 100, (30,))
    calls = []
    real = vocab_chunks.chunked_logps
    monkeypatch.setattr(vocab_chunks, "chunked_logps", lambda *a: calls.append(1) or real(*a))
    small = projected_logps(Head(head, cap=10.0), hidden, tokens)
    assert calls == []
    monkeypatch.setattr(vocab_chunks, "FULL_LOGITS", 100)
    large = projected_logps(Head(head, cap=10.0), hidden, tokens)
    assert calls == [1]
    torch.testing.assert_close(large, small, rtol=1e-5, atol=1e-5)
    g_small, = torch.autograd.grad(small.sum(), hidden)
    g_large, = torch.autograd.grad(large.sum(), hidden)
    torch.testing.assert_close(g_large, g_small, rtol=1e-4, atol=1e-6)
