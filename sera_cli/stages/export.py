"""`sera export trl`: scored pairs as TRL's DPOTrainer reads them, with the stored reference log-probs.

TRL 1.16 names the reference log-probs `ref_chosen_logps`/`ref_rejected_logps`; its collator passes them to
the loss when a row has them. The numbers are sera's `logp_ref_*` unchanged: both tools tokenize the same way
(`trainers/encode.py`, checked against TRL by `tests/test_trl_parity.py`) as long as no row was truncated,
because the two truncate differently (sera cuts the prompt's left and the responses' right; TRL cuts the whole
sequence), so a truncated row is refused (or dropped with `drop_truncated`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sera_cli.data import provenance
from sera_cli.data.errors import InputError
from sera_cli.data.tables import check_writable, inputs_of, read_inputs, write_parquet
from trainers.config import Settings

TRL_COLUMNS = {"logp_ref_chosen": "ref_chosen_logps", "logp_ref_rejected": "ref_rejected_logps"}
KEPT = ("prompt", "chosen", "rejected", "id")


@dataclass(frozen=True, kw_only=True)
class ExportConfig(Settings):
    """The settings of one `sera export`: scored pairs in another tool's columns (`trl`)."""

    inputs: tuple[str, ...]
    output: str
    target: str = "trl"
    drop_truncated: bool = False


@dataclass(frozen=True)
class ExportSummary:
    rows: int
    dropped: int
    max_length: int | None


def to_trl(table: pa.Table, locate: Callable[[int], tuple[str, int]],
           drop_truncated: bool = False) -> tuple[pa.Table, int]:
    """The TRL table of a scored-pairs table, and how many truncated rows were dropped; `locate(row)` names the
    file and row a problem is in."""
    missing = [c for c in (*KEPT[:3], *TRL_COLUMNS) if c not in table.column_names]
    if missing:
        raise InputError(locate(0)[0], f"has no column {missing[0]!r}",
                         hint="export reads 'sera score' output scored with a reference (--reward dpo --ref)")
    dropped = 0
    if "truncated" in table.column_names:
        cut = np.asarray(pc.fill_null(table.column("truncated"), False).to_numpy(zero_copy_only=False), bool)
        if cut.any() and not drop_truncated:
            file, row = locate(int(np.flatnonzero(cut)[0]))
            raise InputError(file, "was truncated by sera's --max-length, which TRL truncates differently",
                             row=row, column="truncated",
                             hint="rescore with a larger --max-length, or pass --drop-truncated")
        dropped = int(cut.sum())
    else:
        cut = np.zeros(table.num_rows, bool)
    for col in TRL_COLUMNS:
        values = pc.fill_null(table.column(col), float("nan")).to_numpy(zero_copy_only=False).astype(float)
        bad = np.flatnonzero(~np.isfinite(values) & ~cut)
        if len(bad):
            file, row = locate(int(bad[0]))
            raise InputError(file, "is not a finite log-prob", row=row, column=col)
    table = table.filter(pa.array(~cut))
    if table.num_rows == 0:
        raise InputError(locate(0)[0], "has no row left after dropping the truncated ones",
                         hint="rescore with a larger --max-length")
    cols = {c: table.column(c) for c in KEPT if c in table.column_names}
    cols.update({new: table.column(old).cast(pa.float32()) for old, new in TRL_COLUMNS.items()})
    return pa.table(cols), dropped


def export(config: ExportConfig) -> ExportSummary:
    """Write the scored pairs in the target's columns (TRL: `ref_chosen_logps`, ...), with provenance."""
    if config.target != "trl":
        raise InputError(config.target, "is not an export target", hint="the targets are: trl")
    check_writable(config.output, inputs_of(config))
    inputs = read_inputs(list(config.inputs))
    table, dropped = to_trl(inputs.table, inputs.locate, config.drop_truncated)
    lengths = {(s.prov or {}).get("config", {}).get("max_length") for s in inputs.sources}
    max_length = lengths.pop() if len(lengths) == 1 else None
    prov = provenance.record("export", {"target": config.target, "inputs": list(config.inputs),
                                        "drop_truncated": config.drop_truncated},
                             parents=[s.prov for s in inputs.sources], dropped=dropped)
    write_parquet(provenance.attach(table, prov), config.output)
    return ExportSummary(table.num_rows, dropped, max_length)
