"""The training forward that runs a pair's prompt once: values and gradients equal two whole sequences; the
length order inside a step; the compute dtype `--dtype auto` picks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import STANDARD_ROWS, conversational_table, standard_table

from sera_cli.backends.models import load_model, load_tokenizer, resolve
from sera_cli.stages.train.api import train
from trainers import TrainConfig
from trainers.batch_order import longest_first_steps, pair_cost, step_batches
from trainers.encode import encode
from trainers.forward import PairLogps, shares_prompts
from trainers.losses import dpo_loss
from trainers.precision import compute_dtype, cpu_flags


def encoded_rows(tok, table) -> list:
    """The table's pairs, plus a repeated prompt with other responses (two rows of a micro-batch share it)."""
    rows = table.to_pylist()
    out = [encode(tok, r["prompt"], [r["chosen"], r["rejected"]]) for r in rows]
    extra = rows[3]
    return out + [encode(tok, extra["prompt"], [extra["rejected"], extra["chosen"]])]


def loss_and_grads(model, net, encoded) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO loss (beta 0.5, fixed reference log-probs) of one micro-batch, its log-probs and token counts; the
    parameters' gradients are left in .grad."""
    model.zero_grad(set_to_none=True)
    logps, ntok = net(encoded)
    n = len(encoded)
    ref = torch.linspace(-30.0, -10.0, 2 * n, dtype=logps.dtype)
    loss = dpo_loss((logps[:n] - ref[:n]) - (logps[n:] - ref[n:]), beta=0.5).mean()
    loss.backward()
    return loss.detach(), logps.detach(), ntok


def _grads(model) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("table_fn", [standard_table, conversational_table], ids=["standard", "conversational"])
def test_shared_prompt_forward_equals_whole_sequences(tiny_policy, table_fn, lora):
    """One micro-batch of 7 pairs of different lengths (padding in the prompt and response batches, one prompt
    used by two pairs): the shared path's log-probs, loss and every parameter gradient equal the unshared
    computation within float32 rounding."""
    ref = resolve(tiny_policy)
    tok, model = load_tokenizer(ref), load_model(ref, "float32", "cpu", train=True)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                 init_lora_weights=False))  # B != 0: every LoRA weight gets a gradient
    encoded = encoded_rows(tok, table_fn())
    shared, whole = PairLogps(model, tok.pad_token_id), PairLogps(model, tok.pad_token_id, share_prompts=False)
    assert shared.share and not whole.share
    loss_s, logps_s, ntok_s = loss_and_grads(model, shared, encoded)
    grads_s = _grads(model)
    loss_w, logps_w, ntok_w = loss_and_grads(model, whole, encoded)
    grads_w = _grads(model)
    assert ntok_s.tolist() == ntok_w.tolist() == [len(e.responses[j]) for j in (0, 1) for e in encoded]
    torch.testing.assert_close(logps_s, logps_w, atol=1e-4, rtol=0)
    torch.testing.assert_close(loss_s, loss_w, atol=1e-6, rtol=0)
    assert grads_s.keys() == grads_w.keys() and len(grads_s) > 0
    assert all(g.abs().sum() > 0 for g in grads_w.values())
    for name, g in grads_w.items():
        torch.testing.assert_close(grads_s[name], g, rtol=1e-4, atol=1e-6 * max(1.0, g.abs().max().item()),
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_models_without_a_plain_cache_fall_back_to_whole_sequences(tiny_policy):
    """A model whose logits are not a function of the last hidden state (here: no output embedding to read) and a
    model with gradient checkpointing take the unshared path; soft-capped logits share (the cap is applied after
    the projection, tests/test_sliding_share.py)."""
    ref = resolve(tiny_policy)
    model = load_model(ref, "float32", "cpu", train=True)
    assert shares_prompts(model)
    model.config.final_logit_softcapping = 30.0
    assert PairLogps(model, 2).share
    model.config.final_logit_softcapping = None
    real = model.get_output_embeddings
    model.get_output_embeddings = lambda: None
    assert not PairLogps(model, 2).share
    model.get_output_embeddings = real
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert not PairLogps(model, 2).share


def metrics(folder) -> list[dict]:
    return [json.loads(x) for x in Path(folder, "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def table_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pairs")
    paths = {}
    for name, fn in (("standard", standard_table), ("conversational", conversational_table)):
        paths[name] = str(folder / f"{name}.parquet")
        pq.write_table(fn(), paths[name])
    return paths


@pytest.mark.parametrize(("kind", "lora"), [("standard", 0), ("conversational", 0), ("standard", 4)])
def test_training_with_shared_prompts_repeats_the_unshared_losses(tmp_path, table_files, tiny_policy, tiny_ref,
                                                                 kind, lora):
    """Whole runs (3 steps of 4 pairs in micro-batches of 2, lr 1e-3 so the weights move): step losses, margins
    and gradient norms of the shared path equal an unshared run within 1e-5."""
    runs = {}
    for share in (True, False):
        out = tmp_path / str(share)
        train(TrainConfig(inputs=(table_files[kind],), output=str(out), policy=tiny_policy, ref=tiny_ref,
                          lr=1e-3, batch_size=4,
                          micro_batch=2, epochs=2, max_steps=3, lora_r=lora, share_prompts=share, dtype="float32",
                          progress=False))
        runs[share] = metrics(out)
    for key in ("loss", "reward_margin", "grad_norm"):
        np.testing.assert_allclose([r[key] for r in runs[True]], [r[key] for r in runs[False]], atol=1e-5,
                                   rtol=1e-5, err_msg=key)
    assert len({round(r["loss"], 6) for r in runs[True]}) == 3  # the weights moved between steps


# ---- the order inside a step ------------------------------------------------------------------------


def test_steps_keep_their_pairs_and_run_longest_first(tiny_policy):
    tok = load_tokenizer(resolve(tiny_policy))
    encoded = [encode(tok, p, [c, r]) for p, c, r in STANDARD_ROWS]
    steps = step_batches(len(encoded), 4, epochs=2, seed=3)
    ordered = longest_first_steps(steps, encoded)
    assert [sorted(b) for b in ordered] == [sorted(b) for b in steps]  # the seeded shuffle decides the pairs
    for batch in ordered:
        costs = [pair_cost(encoded[i]) for i in batch]
        assert costs == sorted(costs, reverse=True)
    assert pair_cost(encoded[3]) == len(encoded[3].prompt) + len(encoded[3].responses[1])  # the longer response


def test_length_order_changes_no_step_loss(tmp_path, table_files, tiny_policy, tiny_ref):
    runs = {}
    for sort in (True, False):
        train(TrainConfig(inputs=(table_files["standard"],), output=str(tmp_path / str(sort)),
                          policy=tiny_policy, ref=tiny_ref, lr=1e-3,
                          batch_size=4, micro_batch=2, epochs=2, length_sort=sort, dtype="float32", progress=False))
        runs[sort] = metrics(tmp_path / str(sort))
    assert [r["pairs"] for r in runs[True]] == [4, 2, 4, 2]
    for key in ("loss", "reward_margin", "grad_norm"):
        np.testing.assert_allclose([r[key] for r in runs[True]], [r[key] for r in runs[False]], atol=1e-5,
                                   err_msg=key)


# ---- the compute dtype ------------------------------------------------------------------------------

AVX2_CPUINFO = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu avx2\n"
SPR_CPUINFO = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"


def test_auto_dtype_is_bfloat16_only_where_the_cpu_has_it():
    assert cpu_flags(AVX2_CPUINFO) == {"fpu", "sse2", "avx", "avx2", "fma"}
    assert compute_dtype("auto", "cpu", cpu_flags(AVX2_CPUINFO)) == "float32"
    assert compute_dtype("auto", "cpu", cpu_flags(SPR_CPUINFO)) == "bfloat16"
    assert compute_dtype("auto", "cpu", frozenset({"avx512_bf16"})) == "bfloat16"  # AMD Zen 4: no AMX
    assert compute_dtype("float32", "cpu", cpu_flags(SPR_CPUINFO)) == "float32"
    assert compute_dtype("bfloat16", "cpu", cpu_flags(AVX2_CPUINFO)) == "bfloat16"
    assert cpu_flags("") == frozenset()


def test_bfloat16_autocast_trains_float32_weights_near_the_float32_losses(tmp_path, table_files, tiny_policy):
    """Under bfloat16 autocast the losses move from float32's by rounding only, the saved weights are float32,
    and the provenance records the dtype the policy ran in (and the one asked for)."""
    from safetensors import safe_open

    runs = {}
    for dtype in ("float32", "bfloat16", "auto"):
        out = tmp_path / dtype
        train(TrainConfig(inputs=(table_files["standard"],), output=str(out), policy=tiny_policy,
                          loss="simpo", lr=1e-3, batch_size=3,
                          micro_batch=3, max_steps=2, dtype=dtype, progress=False))
        runs[dtype] = [r["loss"] for r in metrics(out)]
        sera = json.loads((out / "sera.json").read_text())
        assert sera["requested_dtype"] == dtype
        assert sera["config"]["dtype"] == compute_dtype(dtype, "cpu")
    np.testing.assert_allclose(runs["bfloat16"], runs["float32"], atol=0.05)
    assert runs["bfloat16"] != runs["float32"]  # autocast did run in bfloat16
    assert runs["auto"] == runs[compute_dtype("auto", "cpu")]
    with safe_open(str(tmp_path / "bfloat16" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}


def test_float32_reference_from_score_is_reused_under_autocast(tmp_path, table_files, tiny_policy, tiny_ref):
    """`score --dtype auto` stores float32 reference log-probs on a CPU; `train --ref --dtype auto` (bfloat16
    autocast where the CPU has it) reuses them: how the policy computes does not change how the reference
    numbers were computed, which is what the reference's identity records."""
    from sera_cli.stages.score.api import score
    from sera_cli.stages.score.config import ScoreConfig

    scored = tmp_path / "scored.parquet"
    score(ScoreConfig(inputs=(table_files["standard"],), output=str(scored), policy=tiny_policy,
                      ref=tiny_ref, progress=False))
    summary = train(TrainConfig(inputs=(str(scored),), output=str(tmp_path / "out"), policy=tiny_policy,
                                ref=tiny_ref, lr=1e-3,
                                batch_size=2, micro_batch=2, max_steps=1, progress=False))
    assert summary.ref_source == "input"
    sera = json.loads((tmp_path / "out" / "sera.json").read_text())
    assert sera["config"]["dtype"] == compute_dtype("auto", "cpu") and sera["requested_dtype"] == "auto"
    assert sera["reference"]["logps"]["dtype"] == "float32"
