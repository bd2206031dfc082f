"""Cross-fitted IRM (`sera run --cross-fit K`): score each offline row with a model that never trained on it.

The paper's IRM scores the offline rows with pi_{t-1}, which trained on those same rows; at small scale the
IRM then measures what the policy memorised, not label quality. With K folds, iteration t >= 2 instead trains
K models as pi_{t-1} was trained (from pi_{t-2}, reference pi_{t-2}, on iteration t-1's training rows), each
without one fold, and scores that fold with (model_k, pi_{t-2}). The folds' scores, in the offline data's row
order, replace the in-sample scores; selection, bootstrapping and training then go on as usual.

Folds are drawn by prompt (a seeded hash, dealt round-robin), so a prompt's offline pair and any pair generated
for it fall in one fold and no model sees the prompt it scores.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from sera_cli.data import provenance
from sera_cli.data.hashing import digest


def folds(prompts: list, k: int, seed: int) -> np.ndarray:
    """The fold (0..k-1) of each row: distinct prompts ranked by a seeded hash and dealt out in turn."""
    keys = [digest(p) for p in prompts]
    distinct = sorted(set(keys), key=lambda h: digest([seed, "cross-fit", h]))
    fold_of = {h: i % k for i, h in enumerate(distinct)}
    return np.array([fold_of[h] for h in keys], dtype=np.int64)


def write_fold(data: Path, k: int, fold: int, seed: int, keep: bool, output: Path) -> dict:
    """Write the rows of `data` in fold `fold` (`keep`) or outside it (not `keep`), keeping its provenance
    (so a training file keeps its reference log-probs' identity); returns the row counts."""
    from sera_cli.data.tables import read_parquet, write_parquet

    table = read_parquet(str(data))
    inside = folds(table.column("prompt").to_pylist(), k, seed) == fold
    part = table.filter(pa.array(inside if keep else ~inside))
    prov = provenance.read(table)
    out = provenance.record("cross-fit", {"k": k, "fold": fold, "seed": seed, "side": "in" if keep else "out"},
                            parents=[prov] if prov else [], rows=part.num_rows,
                            **({"logps": prov["logps"]} if prov and "logps" in prov else {}))
    write_parquet(provenance.attach(part.replace_schema_metadata(None), out), str(output))
    return {"rows": part.num_rows, "of": table.num_rows}


def combine(data: Path, scored: list[Path], output: Path) -> dict:
    """The folds' scored rows put back in the row order of `data` (rows are matched by `id`)."""
    from sera_cli.data.tables import read_parquet, write_parquet

    order = read_parquet(str(data)).column("id").to_pylist()
    parts = [read_parquet(str(p)) for p in scored]
    table = pa.concat_tables([p.replace_schema_metadata(None) for p in parts], promote_options="default")
    where = {i: n for n, i in enumerate(table.column("id").to_pylist())}
    missing = [i for i in order if i not in where]
    if missing or len(where) != len(order):
        raise RuntimeError(f"cross-fit folds cover {len(where)} rows, the data has {len(order)}")
    table = table.take(pa.array([where[i] for i in order]))
    out = provenance.record("cross-fit-combine", {"folds": len(parts)},
                            parents=[provenance.read(p) or {} for p in parts], rows=table.num_rows)
    write_parquet(provenance.attach(table, out), str(output))
    return {"rows": table.num_rows, "folds": len(parts)}
