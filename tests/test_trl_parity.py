"""Parity with TRL's DPOTrainer (1.16): the same token split and the same reference log-probs.

TRL is installed with the `parity` extra; the test skips where it is missing.
"""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from conftest import conversational_table, standard_table

from sera_cli.backends.models import load_tokenizer, resolve
from sera_cli.stages.score.api import score
from sera_cli.stages.score.config import ScoreConfig
from trainers.encode import encode

trl = pytest.importorskip("trl", reason="TRL parity needs `pip install trl==1.16.0` (the parity extra)")


def _key(row) -> str:
    """Prompts are unique in these tables (TRL rewrites `chosen` with the EOS appended)."""
    return json.dumps(row["prompt"], sort_keys=True)


@pytest.mark.parametrize("table_fn", [standard_table, conversational_table], ids=["standard", "conversational"])
def test_tokens_and_reference_logps_match_trl(tmp_path, tiny_policy, tiny_ref, table_fn):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    table = table_fn()
    args = DPOConfig(output_dir=str(tmp_path / "trl"), precompute_ref_log_probs=True, precompute_ref_batch_size=2,
                     per_device_train_batch_size=2, report_to=[], use_cpu=True, max_length=1024,
                     bf16=False)  # TRL defaults to bf16 autocast; compare in float32
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_policy),
                         ref_model=AutoModelForCausalLM.from_pretrained(tiny_ref), args=args,
                         train_dataset=Dataset.from_list(table.to_pylist()),
                         processing_class=AutoTokenizer.from_pretrained(tiny_policy))
    theirs = {_key(r): r for r in trainer.train_dataset}
    assert len(theirs) == table.num_rows

    tok = load_tokenizer(resolve(tiny_ref))
    src, out = tmp_path / "pairs.parquet", tmp_path / "scored.parquet"
    pq.write_table(table, src)
    score(ScoreConfig(inputs=(str(src),), output=str(out), policy=tiny_policy, ref=tiny_ref, progress=False))
    for row in pq.read_table(out).to_pylist():
        trl_row = theirs[_key(row)]
        enc = encode(tok, row["prompt"], [row["chosen"], row["rejected"]], 1024, 512)
        assert enc.prompt == trl_row["prompt_ids"]
        assert list(enc.responses[0]) == trl_row["chosen_ids"]
        assert list(enc.responses[1]) == trl_row["rejected_ids"]
        assert row["logp_ref_chosen"] == pytest.approx(trl_row["ref_chosen_logps"], abs=1e-4)
        assert row["logp_ref_rejected"] == pytest.approx(trl_row["ref_rejected_logps"], abs=1e-4)


@pytest.mark.parametrize("table_fn", [standard_table, conversational_table], ids=["standard", "conversational"])
def test_trl_trains_on_exported_reference_logps_with_the_same_losses(tmp_path, tiny_policy, table_fn, monkeypatch):
    """`sera export trl` + StoredReferenceDPOTrainer: TRL's own step losses, with no reference pass."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from sera_cli.backends.trl_trainer import StoredReferenceDPOTrainer
    from sera_cli.stages.export import ExportConfig, export

    table = table_fn()
    src, scored, trl_file = (tmp_path / f"{n}.parquet" for n in ("pairs", "scored", "trl"))
    pq.write_table(table, src)
    score(ScoreConfig(inputs=(str(src),), output=str(scored), policy=tiny_policy, ref=tiny_policy,
                      progress=False))
    export(ExportConfig(inputs=(str(scored),), output=str(trl_file)))
    exported = Dataset.from_parquet(str(trl_file))
    assert {"ref_chosen_logps", "ref_rejected_logps"} <= set(exported.column_names)

    def losses(trainer_cls, dataset, name):
        torch.manual_seed(0)
        args = DPOConfig(output_dir=str(tmp_path / name), precompute_ref_log_probs=trainer_cls is DPOTrainer,
                         per_device_train_batch_size=2, max_steps=3, learning_rate=1e-3, logging_steps=1,
                         report_to=[], use_cpu=True, max_length=1024, bf16=False, save_strategy="no", seed=0)
        trainer = trainer_cls(model=AutoModelForCausalLM.from_pretrained(tiny_policy), args=args,
                              train_dataset=dataset, processing_class=AutoTokenizer.from_pretrained(tiny_policy))
        assert trainer.ref_model is None
        trainer.train()
        return [h["loss"] for h in trainer.state.log_history if "loss" in h]

    theirs = losses(DPOTrainer, Dataset.from_list(table.to_pylist()), "trl")

    def no_reference_pass(*_a, **_k):
        raise AssertionError("the stored reference log-probs were recomputed")

    monkeypatch.setattr(StoredReferenceDPOTrainer, "compute_ref_log_probs", no_reference_pass)
    ours = losses(StoredReferenceDPOTrainer, exported, "stored")
    assert len(ours) == len(theirs) == 3
    assert ours == pytest.approx(theirs, abs=1e-4)
    assert len(set(round(x, 4) for x in theirs)) > 1  # the steps trained: the comparison is not of constants
