"""Training's whole-sequence forward runs a micro-batch in runs of similar length (`trainers.forward.length_groups`):
the runs chosen, and log-probs, loss and gradients equal to one padded call."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import conversational_table, standard_table
from test_train_forward import _grads, encoded_rows, loss_and_grads

from sera_cli.backends.models import load_model, load_tokenizer, resolve
from trainers.forward import PairLogps, length_groups


def test_length_groups_minimise_padding_plus_a_cost_per_call():
    # sorted 100, 98, 12, 10: one call 4 x 100 + 64 = 464; two calls (100, 98) and (12, 10) 200 + 24 + 128 = 352;
    # one call each 220 + 256 = 476
    assert length_groups([10, 100, 12, 98], 64) == [[1, 3], [2, 0]]
    assert length_groups([10, 100, 12, 98], 500) == [[1, 3, 2, 0]]  # a call costs more than the padding
    assert length_groups([10, 100, 12, 98], 0) == [[1], [3], [2], [0]]
    assert length_groups([5, 5, 5], 64) == [[0, 1, 2]]  # equal lengths: nothing to save, ties in input order
    assert length_groups([7], 64) == [[0]]
    # 3 long, 1 short: cutting the short one off saves 97 padded tokens, more than a call
    assert length_groups([100, 100, 100, 3], 64) == [[0, 1, 2], [3]]
    assert length_groups([100, 100, 100, 3], 98) == [[0, 1, 2, 3]]


@pytest.mark.parametrize("table_fn", [standard_table, conversational_table], ids=["standard", "conversational"])
def test_split_forward_equals_one_padded_call(tiny_policy, table_fn):
    """7 pairs of different lengths in one micro-batch: run in length runs (every sequence alone, and the default
    cost) the log-probs, token counts, loss and every gradient equal one padded call within float32 rounding."""
    ref = resolve(tiny_policy)
    tok, model = load_tokenizer(ref), load_model(ref, "float32", "cpu", train=True)
    encoded = encoded_rows(tok, table_fn())
    one = PairLogps(model, tok.pad_token_id, share_prompts=False, split_tokens=math.inf)
    loss_1, logps_1, ntok_1 = loss_and_grads(model, one, encoded)
    grads_1 = _grads(model)
    assert ntok_1.tolist() == [len(e.responses[j]) for j in (0, 1) for e in encoded]
    for split in (0, 8):
        net = PairLogps(model, tok.pad_token_id, share_prompts=False, split_tokens=split)
        lengths = [len(e.prompt) + len(e.responses[j]) for j in (0, 1) for e in encoded]
        assert len(length_groups(lengths, split)) > 1  # the test splits for real
        loss_s, logps_s, ntok_s = loss_and_grads(model, net, encoded)
        assert ntok_s.tolist() == ntok_1.tolist()
        torch.testing.assert_close(logps_s, logps_1, atol=1e-4, rtol=0)
        torch.testing.assert_close(loss_s, loss_1, atol=1e-6, rtol=0)
        grads_s = _grads(model)
        assert grads_s.keys() == grads_1.keys() and len(grads_1) > 0
        for name, g in grads_1.items():
            torch.testing.assert_close(grads_s[name], g, rtol=1e-4, atol=1e-6 * max(1.0, g.abs().max().item()),
                                       msg=lambda m, name=name: f"{name}: {m}")
