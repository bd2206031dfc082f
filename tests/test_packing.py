"""A pair as one packed row [prompt | chosen | rejected] (`trainers.packing`): the row, mask and positions built
by hand; log-probs equal to an independent float64 computation of each whole sequence; the training forward's
loss and every gradient equal to two whole sequences; models it does not cover fall back."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import assert_packed_equals_plain, conversational_table, standard_table
from test_train_forward import _grads, encoded_rows, loss_and_grads

from sera_cli.backends.logps.batched import flat_sequences, sequences_logps
from sera_cli.backends.models import load_model, load_tokenizer, resolve
from trainers import packing
from trainers.forward import PairLogps
from trainers.packing import can_pack, pack, split_responses


def test_pack_builds_the_row_mask_positions_and_targets_by_hand():
    batch = pack([([5, 6], [[7, 8, 9], [10]]), ([11], [[12], [13, 14]])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 2], [0, 1, 1, 2, 0, 0]]
    T = 6
    mask = batch["attention_mask"][:, 0].int().tolist()
    # row 0: prompt 0-1, chosen 2-4, rejected 5 (sees the prompt and itself, not the chosen)
    assert mask[0] == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0],
                       [1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 1]]
    # row 1: prompt 0, chosen 1, rejected 2-3, padding 4-5 (sees only itself; nobody sees it)
    assert mask[1] == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 0, 1, 0, 0, 0], [1, 0, 1, 1, 0, 0],
                       [0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 0, 1]]
    # each response token is predicted by its predecessor in its own sequence, the first by the prompt's end
    assert batch["source"].tolist() == [1, 2, 3, 1, T + 0, T + 0, T + 2]
    assert batch["target"].tolist() == [7, 8, 9, 10, 12, 13, 14]
    assert batch["owner"].tolist() == [0, 0, 0, 2, 1, 3, 3]  # response k of row b: k * B + b
    additive = pack([([5, 6], [[7, 8, 9], [10]])], pad_id=0, eager_dtype=torch.float32)["attention_mask"]
    assert additive.dtype == torch.float32 and additive[0, 0, 5, 2] == torch.finfo(torch.float32).min
    assert additive[0, 0, 5, 1] == 0
    with pytest.raises(ValueError, match="needs a prompt"):
        pack([([], [[1], [2]])], pad_id=0)


def test_a_prompts_responses_are_spread_over_rows_within_the_limit():
    assert split_responses(10, [5, 5, 5], 30) == [[0, 1, 2]]  # 10 + 15 fits
    assert split_responses(10, [5, 5, 5], 20) == [[0, 1], [2]]
    assert split_responses(10, [50, 5, 5], 20) == [[0], [1, 2]]  # too long alone: a row of its own
    assert split_responses(10, [], 20) == []


@pytest.mark.parametrize("table_fn", [standard_table, conversational_table], ids=["standard", "conversational"])
def test_packed_logps_equal_an_independent_whole_sequence_computation(tiny_policy, table_fn, monkeypatch):
    ref = resolve(tiny_policy)
    tok, model = load_tokenizer(ref), load_model(ref, "float32", "cpu")
    encoded = encoded_rows(tok, table_fn())
    assert can_pack(model, 10_000)
    assert_packed_equals_plain(model, encoded, tok.pad_token_id, abs_tol=1e-4)
    # the reference pass: packed rows grouped by prompt (one prompt has 4 responses here) equal the default path,
    # also when a row's limit spreads a prompt's responses over several rows
    seqs = flat_sequences(encoded)
    plain, n_plain = sequences_logps(model, seqs, tok.pad_token_id, batch_tokens=96)
    for limit in (packing.MAX_ROW_TOKENS, 1):
        monkeypatch.setattr(packing, "MAX_ROW_TOKENS", limit)
        packed, n_packed = sequences_logps(model, seqs, tok.pad_token_id, batch_tokens=96, pack=True)
        assert n_packed.tolist() == n_plain.tolist()
        assert abs(packed - plain).max() < 1e-4
    # pairs longer than the limit train as whole sequences
    assert not PairLogps(model, tok.pad_token_id, share_prompts=False, pack_pairs=True).packs(encoded)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("table_fn", [standard_table, conversational_table], ids=["standard", "conversational"])
def test_packed_forward_loss_and_gradients_equal_whole_sequences(tiny_policy, table_fn, lora):
    ref = resolve(tiny_policy)
    tok, model = load_tokenizer(ref), load_model(ref, "float32", "cpu", train=True)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                 lora_dropout=0.0, init_lora_weights=False))
    encoded = encoded_rows(tok, table_fn())
    whole = PairLogps(model, tok.pad_token_id, share_prompts=False)
    packed = PairLogps(model, tok.pad_token_id, share_prompts=False, pack_pairs=True, split_tokens=8)
    assert packed.packs(encoded) and not whole.pack
    loss_w, logps_w, ntok_w = loss_and_grads(model, whole, encoded)
    grads_w = _grads(model)
    loss_p, logps_p, ntok_p = loss_and_grads(model, packed, encoded)
    grads_p = _grads(model)
    assert ntok_p.tolist() == ntok_w.tolist()
    torch.testing.assert_close(logps_p, logps_w, atol=1e-4, rtol=0)
    torch.testing.assert_close(loss_p, loss_w, atol=1e-6, rtol=0)
    assert grads_p.keys() == grads_w.keys() and len(grads_w) > 0
    for name, g in grads_w.items():
        torch.testing.assert_close(grads_p[name], g, rtol=1e-4, atol=1e-6 * max(1.0, g.abs().max().item()),
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_models_packing_does_not_cover_run_whole_sequences(tiny_policy):
    """A sliding window shorter than a sequence, and an unknown model type, fall back to whole sequences."""
    ref = resolve(tiny_policy)
    tok, model = load_tokenizer(ref), load_model(ref, "float32", "cpu")
    encoded = encoded_rows(tok, standard_table())
    longest = max(len(e.prompt) + len(r) for e in encoded for r in e.responses)
    net = PairLogps(model, tok.pad_token_id, share_prompts=False, pack_pairs=True)
    assert net.packs(encoded)
    model.config.sliding_window = longest - 1
    assert not can_pack(model, longest) and not net.packs(encoded)
    model.config.sliding_window = longest
    assert can_pack(model, longest)
    model.config.sliding_window = None
    model.config.model_type = "bloom"  # ALiBi: positions come from the mask, which packing replaces
    assert not can_pack(model, longest)
    with torch.no_grad():
        logps, _ = net(encoded)  # runs, as whole sequences
    assert torch.isfinite(logps).all()
    assert not net.packs([replace(e, prompt=[]) for e in encoded])
