"""TRL's DPOTrainer on reference log-probs that sera stored (`sera export trl`), with no reference model.

    from sera_cli.backends.trl_trainer import StoredReferenceDPOTrainer
    ds = load_dataset("parquet", data_files="trl.parquet", split="train")
    trainer = StoredReferenceDPOTrainer(model=model, args=DPOConfig(...), train_dataset=ds, processing_class=tok)

TRL 1.16 reads `ref_chosen_logps`/`ref_rejected_logps` from a batch when `precompute_ref_log_probs=True`,
but its precompute pass then adds the same two columns again ("The table can't have duplicated columns").
This trainer turns `precompute_ref_log_probs` on and skips that pass for a dataset that already has both
columns, so no reference model is loaded and no reference forward runs; every other step is TRL's own.
"""

from __future__ import annotations

import copy

from trl import DPOTrainer

REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


def has_stored_reference(dataset) -> bool:
    names = getattr(dataset, "column_names", None) or ()
    return all(c in names for c in REF_COLUMNS)


class StoredReferenceDPOTrainer(DPOTrainer):
    """`DPOTrainer` that uses the dataset's stored reference log-probs instead of recomputing them."""

    def __init__(self, *args, **kwargs):
        train = kwargs.get("train_dataset")
        evals = kwargs.get("eval_dataset")
        eval_sets = evals.values() if isinstance(evals, dict) else [evals] if evals is not None else []
        stored = [has_stored_reference(d) for d in (train, *eval_sets) if d is not None]
        if not stored or not all(stored):
            raise ValueError(f"StoredReferenceDPOTrainer needs {' and '.join(REF_COLUMNS)} in every dataset "
                             "(write them with `sera export trl`); use DPOTrainer to compute the reference")
        if kwargs.get("ref_model") is not None:
            raise ValueError("the reference log-probs are stored: pass no ref_model")
        if kwargs.get("args") is not None and not kwargs["args"].precompute_ref_log_probs:
            kwargs["args"] = copy.copy(kwargs["args"])  # the caller's config is left as it was
            kwargs["args"].precompute_ref_log_probs = True
        super().__init__(*args, **kwargs)

    def _precompute_ref_logps(self, dataset, name, batch_size):
        if has_stored_reference(dataset):
            return dataset
        return super()._precompute_ref_logps(dataset, name, batch_size)
