"""The data contract: which columns a pairs or candidates table has, and their checks.

Pairs: `prompt`, `chosen`, `rejected`, each a string (standard) or a list of {role, content} messages
(conversational), as in TRL; optional `id`. Candidates (one response per row): `prompt_id`, `prompt`,
`response`. Every failure names the file, the row and the column.
"""

from __future__ import annotations

from typing import Literal

import pyarrow as pa
import pyarrow.compute as pc

from sera_cli.errors import InputError
from sera_cli.hashing import digest, row_id
from sera_cli.io import Inputs

Kind = Literal["standard", "conversational"]
PAIR_COLUMNS = ("prompt", "chosen", "rejected")
CANDIDATE_COLUMNS = ("prompt", "response")


def column_kind(inputs: Inputs, name: str) -> Kind:
    """Whether a text column holds strings or message lists; anything else is an error."""
    typ = inputs.table.schema.field(name).type
    if pa.types.is_string(typ) or pa.types.is_large_string(typ):
        return "standard"
    if (pa.types.is_list(typ) or pa.types.is_large_list(typ)) and pa.types.is_struct(typ.value_type):
        fields = {f.name for f in typ.value_type}
        if {"role", "content"} <= fields:
            return "conversational"
    file, row = inputs.locate(0)
    raise InputError(file, f"has type {typ}; expected a string or a list of {{role, content}} messages",
                     row=row, column=name)


def _check_text(inputs: Inputs, name: str, kind: Kind) -> None:
    """No nulls, no empty or blank texts, no message without content."""
    col = inputs.table.column(name)
    null = pc.is_null(col)
    if pc.any(null).as_py():
        _fail(inputs, int(pc.index(null, True).as_py()), name, "is null")
    if kind == "standard":
        blank = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(col)), 0)
        if pc.any(blank).as_py():
            _fail(inputs, int(pc.index(blank, True).as_py()), name, "is empty")
        return
    for i, messages in enumerate(col.to_pylist()):
        if not messages:
            _fail(inputs, i, name, "has no messages")
        for m in messages:
            if m.get("role") is None or m.get("content") is None or not str(m["content"]).strip():
                _fail(inputs, i, name, "has a message with no role or empty content")


def _fail(inputs: Inputs, row: int, column: str, problem: str) -> None:
    file, local = inputs.locate(row)
    raise InputError(file, problem, row=local, column=column, hint="fix or drop that row")


def _require(inputs: Inputs, columns: tuple[str, ...], what: str) -> None:
    missing = [c for c in columns if c not in inputs.table.column_names]
    if missing:
        have = ", ".join(inputs.table.column_names)
        raise InputError(inputs.sources[0].name, f"missing column '{missing[0]}' for {what} (has: {have})",
                         hint="'sera convert' turns common layouts into prompt/chosen/rejected")


def check_pairs(inputs: Inputs) -> Kind:
    """Validate a pairs table; return whether it is standard or conversational."""
    _require(inputs, PAIR_COLUMNS, "preference pairs")
    kinds = {c: column_kind(inputs, c) for c in PAIR_COLUMNS}
    if len(set(kinds.values())) > 1:
        file, row = inputs.locate(0)
        detail = ", ".join(f"{c} is {k}" for c, k in kinds.items())
        raise InputError(file, f"mixes standard and conversational columns ({detail})", row=row, column="chosen")
    for c in PAIR_COLUMNS:
        _check_text(inputs, c, kinds[c])
    return kinds["prompt"]


def check_candidates(inputs: Inputs) -> Kind:
    """Validate a candidates table (one response per row)."""
    _require(inputs, CANDIDATE_COLUMNS, "candidates")
    kind = column_kind(inputs, "prompt")
    if column_kind(inputs, "response") != "standard" and kind == "standard":
        file, row = inputs.locate(0)
        raise InputError(file, "response is messages but prompt is a string", row=row, column="response")
    for c in CANDIDATE_COLUMNS:
        _check_text(inputs, c, column_kind(inputs, c))
    return kind


def check_prompts(inputs: Inputs) -> Kind:
    """Validate the `prompt` column of any table (generation input): present, not null, not empty."""
    _require(inputs, ("prompt",), "generation prompts")
    kind = column_kind(inputs, "prompt")
    _check_text(inputs, "prompt", kind)
    return kind


def is_candidates(table: pa.Table) -> bool:
    """A candidates table has `response` and no `chosen`/`rejected`."""
    names = set(table.column_names)
    return "response" in names and not ({"chosen", "rejected"} & names)


def with_ids(table: pa.Table) -> pa.Table:
    """Add a stable content-hash `id` column when the table has none."""
    if "id" in table.column_names:
        return table
    if is_candidates(table):
        rows = zip(table.column("prompt").to_pylist(), table.column("response").to_pylist(), strict=True)
        ids = [digest([p, r])[:16] for p, r in rows]
    else:
        cols = [table.column(c).to_pylist() for c in PAIR_COLUMNS]
        ids = [row_id(p, c, r) for p, c, r in zip(*cols, strict=True)]
    return table.append_column("id", pa.array(ids, pa.string()))
