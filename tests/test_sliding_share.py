"""Prompt sharing on sliding-window and soft-capped models (Gemma 2, Gemma 3, Mistral): the shared-prompt
log-probs equal a plain forward's (log_softmax, gather) on sequences longer than the window, and the training
path's gradients equal the whole-sequence path's."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from trainers.logps import collate, sequence_logps  # noqa: E402
from trainers.prefix_sharing import batch_shared_logps, can_share, shared_logps  # noqa: E402

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12], [20, 21, 22]]
RESPONSES = [[30, 31, 32, 33, 34, 35, 36, 37, 38], [40, 41], [50, 51, 52, 53, 54, 55, 56], [60]]
OWNER = [0, 0, 1, 1]


def tiny(kind: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    extra = dict(head_dim=16, final_logit_softcapping=30.0) if kind == "gemma2" else \
        dict(head_dim=16) if kind == "gemma3_text" else {}
    cfg = AutoConfig.for_model(kind, vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, sliding_window=6,
                               initializer_range=0.2, **extra)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def plain(model, seqs) -> torch.Tensor:
    out = []
    for ids, p in seqs:
        logits = model(input_ids=torch.tensor([ids])).logits[0, p - 1:-1]
        out.append(torch.log_softmax(logits.double(), -1).gather(-1, torch.tensor(ids[p:]).unsqueeze(-1)).sum())
    return torch.stack(out)


@pytest.mark.parametrize("kind", ["gemma2", "gemma3_text", "mistral"])
def test_shared_prompts_equal_a_plain_forward_past_the_window(kind):
    model = tiny(kind)
    assert can_share(model)
    seqs = [(PROMPTS[o] + r, len(PROMPTS[o])) for o, r in zip(OWNER, RESPONSES, strict=True)]
    with torch.no_grad():
        shared, ntok = shared_logps(model, PROMPTS, RESPONSES, OWNER, 0, 1024, 16384)
        want = plain(model, seqs)
    assert ntok.tolist() == [len(r) for r in RESPONSES]
    torch.testing.assert_close(shared.double(), want, rtol=0, atol=2e-5)


def test_training_path_gradients_equal_the_whole_sequence_path():
    model = tiny("gemma2").train()
    seqs = [(PROMPTS[o] + r, len(PROMPTS[o])) for o, r in zip(OWNER, RESPONSES, strict=True)]
    weight = model.get_input_embeddings().weight
    a, _ = batch_shared_logps(model, PROMPTS, RESPONSES, OWNER, 0)
    ga, = torch.autograd.grad(a.sum(), weight)
    b, _ = sequence_logps(model, **collate(seqs, 0))
    gb, = torch.autograd.grad(b.sum(), weight)
    torch.testing.assert_close(a, b, rtol=0, atol=2e-5)
    torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-5)
