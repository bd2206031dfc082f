"""The IRM ensemble on generated samples (SeRA paper, Eq. 7, applied "both for preference pairs in the original
datasets and generated samples").

A candidate's reward under the current pair of models (pi_{t-1}, pi_{t-2}) and under the previous pair
(pi_{t-2}, pi_{t-3}) are combined per candidate, r = lambda * r_prev + (1 - lambda) * r_now. The margin of two
candidates of one prompt is then lambda * IRM_prev + (1 - lambda) * IRM_now, the ensembled IRM of the pair, so
the max/min pairing (`candidate_pairs`) and the top k2 rank by it with no further change.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from sera_cli.data.rewards import ensemble_margin


def ensembled_rewards(now: pa.Table, prev: pa.Table, lam: float, prev_models: dict[str, Any] | None = None,
                      source: str = "<candidates>") -> pa.Table:
    """`now` (scored candidates) with `reward` = lambda * prev's reward + (1 - lambda) * its own, matched by `id`;
    the two rewards are kept as `reward_now` and `reward_prev`, and the provenance records the ensemble. A
    candidate with no previous reward is one line naming `source`, its row and its id."""
    from sera_cli.data import provenance

    r_now = np.asarray(now.column("reward").to_numpy(zero_copy_only=False), dtype=np.float64)
    by_id = dict(zip(prev.column("id").to_pylist(), prev.column("reward").to_pylist(), strict=True))
    ids = now.column("id").to_pylist()
    if missing := [row for row, i in enumerate(ids) if i not in by_id]:
        from sera_cli.data.errors import InputError

        raise InputError(source, f"candidate {ids[missing[0]]} has no reward under the previous models "
                         f"({len(missing):,} of {len(ids):,} candidates)", row=missing[0], column="id",
                         hint="score the previous iteration's candidates with the same prompts and samples")
    r_prev = np.array([by_id[i] for i in ids], dtype=np.float64)
    out = now.drop_columns([c for c in ("reward", "reward_now", "reward_prev") if c in now.column_names])
    out = (out.append_column("reward", pa.array(ensemble_margin(r_prev, r_now, lam)))
           .append_column("reward_now", pa.array(r_now)).append_column("reward_prev", pa.array(r_prev)))
    prov = dict(provenance.read(now) or {})
    prov["ensemble"] = {"lambda": lam, "prev_models": prev_models, "prev_logps": (provenance.read(prev) or {})
                        .get("logps")}
    return provenance.attach(out, prov)
