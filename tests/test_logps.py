"""The shared log-prob function against an independent computation, and batched against one-at-a-time."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import STANDARD_ROWS, conversational_table, standard_table

from sera_cli.backends.models import load_model, load_tokenizer, resolve
from sera_cli.stages.score.api import score
from sera_cli.stages.score.config import ScoreConfig
from trainers.encode import encode, truncate
from trainers.logps import collate, sequence_logps, sum_by_row


def naive_logp(model, tok, prompt, response) -> tuple[float, int]:
    """Independent: full forward over prompt+response, full-vocabulary log-softmax, sum over the response."""
    if isinstance(prompt, str):
        p = tok(prompt)["input_ids"]
        full = tok(prompt + response + tok.eos_token)["input_ids"]
    else:
        p = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        full = tok.apply_chat_template(prompt + response, tokenize=True, return_dict=True)["input_ids"]
    assert full[: len(p)] == p
    with torch.no_grad():
        logits = model(torch.tensor([full])).logits[0].double().log_softmax(-1)
    return sum(logits[t - 1, full[t]].item() for t in range(len(p), len(full))), len(full) - len(p)


def _score_file(tmp_path, table, model_dir, name="in.parquet"):
    src = tmp_path / name
    pq.write_table(table, src)
    out = tmp_path / f"scored-{name}"
    score(ScoreConfig(inputs=(str(src),), output=str(out), policy=model_dir, ref=model_dir, progress=False,
                      batch_tokens=512))
    return pq.read_table(out).to_pylist()


@pytest.mark.parametrize("table_fn", [standard_table, conversational_table], ids=["standard", "conversational"])
def test_score_logps_match_independent_tiny(tmp_path, tiny_policy, table_fn):
    ref = resolve(tiny_policy)
    model, tok = load_model(ref, "float32", "cpu"), load_tokenizer(ref)
    rows = _score_file(tmp_path, table_fn(), tiny_policy)
    for row in rows:
        for side in ("chosen", "rejected"):
            lp, n = naive_logp(model, tok, row["prompt"], row[side])
            assert row[f"logp_policy_{side}"] == pytest.approx(lp, abs=1e-4)
            assert row[f"ntok_{side}"] == n


@pytest.mark.slow
@pytest.mark.parametrize("table_fn", [standard_table, conversational_table], ids=["standard", "conversational"])
def test_score_logps_match_independent_smollm2(tmp_path, smol, table_fn):
    model, tok = load_model(smol, "float32", "cpu"), load_tokenizer(smol)
    rows = _score_file(tmp_path, table_fn(), "smollm2-135m")
    for row in rows:
        for side in ("chosen", "rejected"):
            lp, n = naive_logp(model, tok, row["prompt"], row[side])
            assert row[f"logp_policy_{side}"] == pytest.approx(lp, abs=1e-4)
            assert row[f"ntok_{side}"] == n
        assert row["irm"] == pytest.approx(0.0, abs=1e-9)  # policy == reference


def test_batched_equals_one_at_a_time(tiny_policy):
    ref = resolve(tiny_policy)
    model, tok = load_model(ref, "float32", "cpu"), load_tokenizer(ref)
    encs = [encode(tok, p, [c, r]) for p, c, r in STANDARD_ROWS]
    seqs = [(e.sequence(j), len(e.prompt)) for e in encs for j in (0, 1)]
    with torch.no_grad():
        batched, nb = sequence_logps(model, **collate(seqs, tok.pad_token_id))
        single = [sequence_logps(model, **collate([s], tok.pad_token_id)) for s in seqs]
    torch.testing.assert_close(batched, torch.cat([s[0] for s in single]), atol=1e-5, rtol=0)
    assert nb.tolist() == [s[1].item() for s in single]


def test_average_divides_by_token_count(tiny_policy):
    ref = resolve(tiny_policy)
    model, tok = load_model(ref, "float32", "cpu"), load_tokenizer(ref)
    e = encode(tok, "Human: hi\n\nAssistant:", [" hello there"])
    batch = collate([(e.sequence(0), len(e.prompt))], tok.pad_token_id)
    with torch.no_grad():
        total, n = sequence_logps(model, **batch)
        mean, _ = sequence_logps(model, **batch, average=True)
    torch.testing.assert_close(mean, total / n)


def test_sequence_logps_rejects_mismatched_shapes(tiny_policy):
    model = load_model(resolve(tiny_policy), "float32", "cpu")
    with pytest.raises(ValueError, match="shapes differ"):
        sequence_logps(model, torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3), torch.ones(2, 4, dtype=torch.long))


def test_sums_accumulate_in_float64():
    # float32 token log-probs whose float32 running total loses the small ones: 3e3 + 1e-4 rounds back to 3e3
    values = torch.tensor([3000.0] + [1e-4] * 1000 + [-3000.0], dtype=torch.float32)
    rows = torch.tensor([0] * 1002 + [1])
    sums = sum_by_row(torch.cat([values, torch.tensor([-2.5])]), rows, 2)
    assert sums.dtype == torch.float64
    assert sums[0].item() == pytest.approx(float(values[1:1001].double().sum()), abs=1e-9)  # float32: 0.0
    assert sums[1].item() == -2.5


def test_gradient_flows(tiny_policy):
    model = load_model(resolve(tiny_policy), "float32", "cpu", train=True)
    batch = collate([([1, 2, 3, 4, 5], 2), ([1, 2, 3], 1)], 2)
    logps, _ = sequence_logps(model, **batch)
    logps.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_truncation_cuts_prompt_left_and_response_right():
    prompt, (c, r), cut = truncate(list(range(10)), [list(range(100, 108)), [200, 201]], max_length=12,
                                   max_prompt_length=6)
    assert prompt == [4, 5, 6, 7, 8, 9]  # last 6 prompt tokens
    assert c == [100, 101, 102, 103, 104, 105] and r == [200, 201]  # chosen cut to 12 - 6
    assert cut
    assert truncate([1, 2], [[3]], 10, 5) == ([1, 2], [[3]], False)


def test_prompt_sharing_equals_separate_sequences(tiny_policy):
    from sera_cli.backends.logps.batched import flat_sequences, sequences_logps

    ref = resolve(tiny_policy)
    model, tok = load_model(ref, "float32", "cpu"), load_tokenizer(ref)
    encs = [encode(tok, p, [c, r, c + " and more"]) for p, c, r in STANDARD_ROWS]
    seqs = flat_sequences(encs) + [(encs[0].sequence(0), len(encs[0].prompt) + 1)]  # one unshared prompt
    shared, n1 = sequences_logps(model, seqs, tok.pad_token_id, batch_tokens=256)
    separate, n2 = sequences_logps(model, seqs, tok.pad_token_id, batch_tokens=256, share_prompts=False)
    np.testing.assert_allclose(shared, separate, atol=1e-4, rtol=0)
    assert (n1 == n2).all()


def test_prompt_sharing_in_small_windows_and_tight_batches_gives_the_same_numbers(tiny_policy, monkeypatch):
    """Many prompt windows and one-response batches (keys gathered from several prompt batches) change the
    batching only, never the numbers."""
    import sera_cli.backends.logps.batched
    from sera_cli.backends.logps.batched import flat_sequences, sequences_logps

    ref = resolve(tiny_policy)
    model, tok = load_model(ref, "float32", "cpu"), load_tokenizer(ref)
    encs = [encode(tok, p, [c, r]) for p, c, r in STANDARD_ROWS]
    seqs = flat_sequences(encs)
    separate, _ = sequences_logps(model, seqs, tok.pad_token_id, share_prompts=False)
    monkeypatch.setattr(sera_cli.backends.logps.batched, "PROMPT_WINDOW_TOKENS", 1)  # every prompt its own window
    windowed, _ = sequences_logps(model, seqs, tok.pad_token_id, batch_tokens=8)
    np.testing.assert_allclose(windowed, separate, atol=1e-4, rtol=0)
