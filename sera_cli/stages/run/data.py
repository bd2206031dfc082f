"""The offline data of a run: read and checked once, limited to `rows`, split into training and held-out rows.

The split is by a seeded hash of each row's id, so it does not depend on row order and a row stays on its side
when more data is appended. Generation prompts are a seeded sample of the training prompts, new each iteration.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from sera_cli.data import provenance
from sera_cli.data.hashing import digest

DEMO_DATA = Path(__file__).resolve().parents[2] / "demo" / "pairs.parquet"


def data_files(data: tuple[str, ...]) -> tuple[str, ...]:
    """The run's input files: the given ones, or the embedded demo set."""
    return data or (str(DEMO_DATA),)


def _rank(ids: list[str], seed: int, salt: str) -> np.ndarray:
    """Row indices ordered by a seeded hash of their ids: a permutation that ignores row order."""
    keys = [digest([salt, seed, i]) for i in ids]
    return np.argsort(np.array(keys), kind="stable")


def load_offline(data: tuple[str, ...], rows: int | None, seed: int) -> tuple[pa.Table, list[dict]]:
    """The checked pairs with ids (at most `rows`, a seeded sample), and the inputs' provenance."""
    from sera_cli.data import lineage
    from sera_cli.data.contract import check_pairs, with_ids
    from sera_cli.data.tables import read_inputs

    inputs = read_inputs(list(data_files(data)))
    check_pairs(inputs)
    table = with_ids(inputs.table)
    if rows is not None and rows < table.num_rows:
        keep = np.sort(_rank(table.column("id").to_pylist(), seed, "rows")[:rows])
        table = table.take(keep)
    return table, lineage.parents(inputs)


def split(table: pa.Table, heldout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, held-out rows), in input order; round(heldout * n) rows are held out."""
    order = _rank(table.column("id").to_pylist(), seed, "heldout")
    k = round(heldout * table.num_rows)
    return np.sort(order[k:]), np.sort(order[:k])


def write_split(data: tuple[str, ...], rows: int | None, heldout: float, seed: int, side: str,
                output: Path) -> dict:
    """Write one side ("train" or "heldout") of the split with provenance; returns its row counts."""
    from sera_cli.data.tables import write_parquet

    table, parents = load_offline(data, rows, seed)
    train, held = split(table, heldout, seed)
    part = table.take(train if side == "train" else held)
    settings = {"data": list(data_files(data)), "rows": rows, "heldout": heldout, "seed": seed, "side": side}
    prov = provenance.record("split", settings, parents=parents, source_rows=len(train),
                             rows={"train": len(train), "heldout": len(held)})
    write_parquet(provenance.attach(part.replace_schema_metadata(None), prov), str(output))
    return {"rows": part.num_rows, "train": len(train), "heldout": len(held)}


def write_prompts(train: Path, count: int | None, seed: int, iteration: int, output: Path) -> dict:
    """The distinct training prompts to generate for at `iteration`: all, or a seeded sample of `count`."""
    from sera_cli.data.tables import read_parquet, write_parquet

    table = read_parquet(str(train))
    prompts = table.column("prompt").to_pylist()
    first: dict[str, int] = {}
    for i, p in enumerate(prompts):
        first.setdefault(digest(p)[:16], i)
    ids = list(first)
    if count is not None and count < len(ids):
        ids = [ids[i] for i in np.sort(_rank(ids, seed, f"prompts-{iteration}")[:count])]
    rows = [first[i] for i in ids]
    out = pa.table({"id": pa.array(ids, pa.string()), "prompt": table.column("prompt").take(rows)})
    prov = provenance.record("prompts", {"count": count, "seed": seed, "iteration": iteration},
                             parents=[p for p in [provenance.read(table)] if p], rows=len(rows))
    write_parquet(provenance.attach(out, prov), str(output))
    return {"prompts": len(rows), "distinct": len(first)}


SCORE_COLUMNS = ("logp_policy_chosen", "logp_policy_rejected", "logp_ref_chosen", "logp_ref_rejected",
                 "reward_chosen", "reward_rejected", "irm", "irm_prev", "irm_now")


def write_reference(path: Path) -> None:
    """Turn a policy-only `score` output in place into training input: its policy log-probs become the
    `logp_ref_*` columns, and its provenance names that model as the reference (`logps.ref`)."""
    from sera_cli.data.tables import read_parquet, write_parquet

    table = read_parquet(str(path))
    prov = provenance.read(table) or {}
    chosen, rejected = table.column("logp_policy_chosen"), table.column("logp_policy_rejected")
    table = table.drop_columns([c for c in SCORE_COLUMNS if c in table.column_names])
    table = table.append_column("logp_ref_chosen", chosen).append_column("logp_ref_rejected", rejected)
    ref = (prov.get("logps") or {}).get("policy")
    out = provenance.record("reference", {"source": "logp_policy of the score stage"},
                            logps={"policy": None, "ref": ref}, rows=table.num_rows, parents=[prov])
    write_parquet(provenance.attach(table, out), str(path))
