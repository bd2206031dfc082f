"""Where a run keeps its artifacts: one folder per iteration under the workdir.

    WORKDIR/run.json                  config, stage records, log of what ran and what was skipped
    WORKDIR/train.parquet             the offline data minus the held-out split (with ids)
    WORKDIR/heldout.parquet           the held-out split, never trained on
    WORKDIR/cache/                    log-prob cache shared by every stage
    WORKDIR/iter-t/scored.parquet     offline data scored with (pi_{t-1}, pi_{t-2}), IRM ensembled (t >= 2)
    WORKDIR/iter-t/selected.parquet   its top k1 by IRM
    WORKDIR/iter-t/prompts.parquet    the training prompts to generate for (a seeded sample with --gen-prompts)
    WORKDIR/iter-t/candidates.parquet N responses per prompt from pi_{t-1}
    WORKDIR/iter-t/candidates_scored.parquet  their rewards under (pi_{t-1}, pi_{t-2}); from t = 3 (methods
                                      with the ensemble), lambda * that under (pi_{t-2}, pi_{t-3}) + (1 - lambda) * it
    WORKDIR/iter-t/candidates_scored_prev.parquet  t >= 3: their rewards under (pi_{t-2}, pi_{t-3})
    WORKDIR/iter-t/pairs.parquet      max-vs-min reward pair per prompt, top k2 by IRM
    WORKDIR/iter-t/mixed.parquet      selected + pairs: what pi_t trains on
    WORKDIR/iter-t/reference.parquet  the training rows with their log-probs under pi_{t-1} (the reference)
    WORKDIR/iter-t/model/             pi_t (with the trainer's metrics.jsonl)
    WORKDIR/iter-t/heldout_scored.parquet  held-out split scored with (pi_t, pi_0)
    WORKDIR/iter-t/xfit-k/            with --cross-fit K: fold k's training rows, model and scored rows
    WORKDIR/iter-t/eval/              with --eval: `sera eval` of pi_t against pi_0 (judgments, summary)
    WORKDIR/eval-cache/               with --eval: answers and judgments shared by the iterations' evals
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    root: Path

    @property
    def ledger(self) -> Path:
        return self.root / "run.json"

    @property
    def train(self) -> Path:
        return self.root / "train.parquet"

    @property
    def heldout(self) -> Path:
        return self.root / "heldout.parquet"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    def iteration(self, t: int) -> Path:
        return self.root / f"iter-{t}"

    def scored(self, t: int) -> Path:
        return self.iteration(t) / "scored.parquet"

    def selected(self, t: int) -> Path:
        return self.iteration(t) / "selected.parquet"

    def prompts(self, t: int) -> Path:
        return self.iteration(t) / "prompts.parquet"

    def candidates(self, t: int) -> Path:
        return self.iteration(t) / "candidates.parquet"

    def candidates_scored(self, t: int) -> Path:
        return self.iteration(t) / "candidates_scored.parquet"

    def candidates_prev_scored(self, t: int) -> Path:
        return self.iteration(t) / "candidates_scored_prev.parquet"

    def pairs(self, t: int) -> Path:
        return self.iteration(t) / "pairs.parquet"

    def mixed(self, t: int) -> Path:
        return self.iteration(t) / "mixed.parquet"

    def reference(self, t: int) -> Path:
        return self.iteration(t) / "reference.parquet"

    def model(self, t: int) -> Path:
        return self.iteration(t) / "model"

    def metrics(self, t: int) -> Path:
        return self.model(t) / "metrics.jsonl"

    def heldout_scored(self, t: int) -> Path:
        return self.iteration(t) / "heldout_scored.parquet"

    def eval_summary(self, t: int) -> Path:
        return self.iteration(t) / "eval" / "summary.parquet"

    def xfit(self, t: int, k: int) -> Path:
        """Fold k's folder of the cross-fitted scoring of iteration t (`train.parquet`, `model/`, ...)."""
        return self.iteration(t) / f"xfit-{k}"
