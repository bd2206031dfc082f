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

from sera_cli.rewards import ensemble_margin


def ensembled_rewards(now: pa.Table, prev: pa.Table, lam: float, prev_models: dict[str, Any] | None = None) -> pa.Table:
    """`now` (scored candidates) with `reward` = lambda * prev's reward + (1 - lambda) * its own, matched by `id`;
    the two rewards are kept as `reward_now` and `reward_prev`, and the provenance records the ensemble."""
    from sera_cli import provenance

    r_now = np.asarray(now.column("reward").to_numpy(zero_copy_only=False), dtype=np.float64)
    by_id = dict(zip(prev.column("id").to_pylist(), prev.column("reward").to_pylist(), strict=True))
    r_prev = np.array([by_id[i] for i in now.column("id").to_pylist()], dtype=np.float64)
    out = now.drop_columns([c for c in ("reward", "reward_now", "reward_prev") if c in now.column_names])
    out = (out.append_column("reward", pa.array(ensemble_margin(r_prev, r_now, lam)))
           .append_column("reward_now", pa.array(r_now)).append_column("reward_prev", pa.array(r_prev)))
    prov = dict(provenance.read(now) or {})
    prov["ensemble"] = {"lambda": lam, "prev_models": prev_models, "prev_logps": (provenance.read(prev) or {})
                        .get("logps")}
    return provenance.attach(out, prov)
