"""The data contract: which columns a pairs or candidates table has, and their checks.

Pairs: `prompt`, `chosen`, `rejected`, each a string (standard) or a list of {role, content} messages
(conversational), as in TRL; optional `id`. Candidates (one response per row): `prompt_id`, `prompt`,
`response`. Every failure names the file, the row and the column.
"""

from __future__ import annotations

from typing import Literal

import pyarrow as pa
import pyarrow.compute as pc

from sera_cli.data.errors import InputError
from sera_cli.data.hashing import digest, row_id
from sera_cli.data.tables import Inputs

Kind = Literal["standard", "conversational"]
PAIR_COLUMNS = ("prompt", "chosen", "rejected")
CANDIDATE_COLUMNS = ("prompt", "response")
ROLES = ("system", "developer", "user", "assistant", "tool")


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
        for j, m in enumerate(messages):
            if m.get("role") is None or m.get("content") is None or not str(m["content"]).strip():
                _fail(inputs, i, name, "has a message with no role or empty content")
            if m["role"] not in ROLES:
                _fail(inputs, i, name, f"message {j} has role {m['role']!r}; expected one of {', '.join(ROLES)}")


def _fail(inputs: Inputs, row: int, column: str, problem: str, hint: str = "fix or drop that row") -> None:
    file, local = inputs.locate(row)
    raise InputError(file, problem, row=local, column=column, hint=hint)


def require_columns(inputs: Inputs, columns: tuple[str, ...], what: str) -> None:
    missing = [c for c in columns if c not in inputs.table.column_names]
    if missing:
        have = ", ".join(inputs.table.column_names)
        raise InputError(inputs.sources[0].name, f"missing column '{missing[0]}' for {what} (has: {have})",
                         hint="'sera convert' turns common layouts into prompt/chosen/rejected")


def check_pairs(inputs: Inputs) -> Kind:
    """Validate a pairs table; return whether it is standard or conversational."""
    require_columns(inputs, PAIR_COLUMNS, "preference pairs")
    kinds = {c: column_kind(inputs, c) for c in PAIR_COLUMNS}
    if len(set(kinds.values())) > 1:
        file, row = inputs.locate(0)
        detail = ", ".join(f"{c} is {k}" for c, k in kinds.items())
        raise InputError(file, f"mixes standard and conversational columns ({detail})", row=row, column="chosen")
    for c in PAIR_COLUMNS:
        _check_text(inputs, c, kinds[c])
    check_ids(inputs)
    return kinds["prompt"]


def check_candidates(inputs: Inputs) -> Kind:
    """Validate a candidates table (one response per row)."""
    require_columns(inputs, CANDIDATE_COLUMNS, "candidates")
    kind = column_kind(inputs, "prompt")
    if column_kind(inputs, "response") != "standard" and kind == "standard":
        file, row = inputs.locate(0)
        raise InputError(file, "response is messages but prompt is a string", row=row, column="response")
    for c in CANDIDATE_COLUMNS:
        _check_text(inputs, c, column_kind(inputs, c))
    check_ids(inputs)
    return kind


def check_prompts(inputs: Inputs) -> Kind:
    """Validate the `prompt` column of any table (generation input): present, not null, not empty."""
    require_columns(inputs, ("prompt",), "generation prompts")
    kind = column_kind(inputs, "prompt")
    _check_text(inputs, "prompt", kind)
    check_ids(inputs, unique=False)  # rows that repeat a prompt may repeat its id
    return kind


def check_ids(inputs: Inputs, *, unique: bool = True) -> None:
    """A given `id` column has no nulls and (with `unique`) no repeats: stages join and cache on it."""
    if "id" not in inputs.table.column_names:
        return
    col = inputs.table.column("id")
    null = pc.is_null(col)
    if pc.any(null).as_py():
        _fail(inputs, int(pc.index(null, True).as_py()), "id", "is null",
              hint="give every row an id, or drop the column and sera makes one from the content")
    if pa.types.is_floating(col.type):  # NaN != NaN: two NaN ids would pass the uniqueness check below
        nan = pc.fill_null(pc.is_nan(col), False)
        if pc.any(nan).as_py():
            _fail(inputs, int(pc.index(nan, True).as_py()), "id", "is NaN",
                  hint="give every row an id, or drop the column and sera makes one from the content")
    if not unique:
        return
    counts = pc.value_counts(col)
    repeated = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
    if len(repeated):
        rows = pc.indices_nonzero(pc.is_in(col, value_set=repeated)).to_pylist()
        seen: dict = {}
        values = col.take(pa.array(rows)).to_pylist()
        for row, value in zip(rows, values, strict=True):
            if value in seen:
                first_file, first_row = inputs.locate(seen[value])
                _fail(inputs, row, "id", f"{value!r} is also the id of {first_file} row {first_row}; ids must be "
                                         "unique")
            seen[value] = row


def is_candidates(table: pa.Table) -> bool:
    """A candidates table has `response` and no `chosen`/`rejected`."""
    names = set(table.column_names)
    return "response" in names and not ({"chosen", "rejected"} & names)


def with_ids(table: pa.Table) -> pa.Table:
    """Add a stable content-hash `id` column when the table has none.

    Rows with the same content would get the same hash; the k-th repeat (k >= 2, in row order) gets `-k`
    appended to it, so ids are unique and a row keeps its id as long as the rows before it are the same."""
    if "id" in table.column_names:
        return table
    if is_candidates(table):
        rows = zip(table.column("prompt").to_pylist(), table.column("response").to_pylist(), strict=True)
        ids = [digest([p, r])[:16] for p, r in rows]
    else:
        cols = [table.column(c).to_pylist() for c in PAIR_COLUMNS]
        ids = [row_id(p, c, r) for p, c, r in zip(*cols, strict=True)]
    return table.append_column("id", pa.array(_unique(ids), pa.string()))


def _unique(ids: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for i in ids:
        seen[i] = seen.get(i, 0) + 1
        out.append(i if seen[i] == 1 else f"{i}-{seen[i]}")
    return out
