"""Numbers read from a scored table's columns, shared by `sera inspect` (`inspect.py`) and its figures (`plots.py`)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def text_lengths(column: pa.ChunkedArray) -> np.ndarray:
    """Characters per text; for message lists, the characters of all contents."""
    import polars as pl

    series = pl.from_arrow(column)
    if series.dtype == pl.String:
        return series.str.len_chars().fill_null(0).to_numpy().astype(np.float64)
    contents = pl.element().struct.field("content").str.len_chars()
    frame = pl.DataFrame({"m": series}).select(pl.col("m").list.eval(contents).list.sum())
    return frame["m"].fill_null(0).to_numpy().astype(np.float64)


def floats(table: pa.Table, name: str) -> np.ndarray:
    return pc.cast(table.column(name), pa.float64()).to_numpy(zero_copy_only=False)


def flags(table: pa.Table, name: str, file: str, locate=None) -> np.ndarray:
    """A true/false column (`flipped`: booleans or 0/1 numbers) as a bool array. A null, NaN or other value is an
    error naming the row: counting it as false would call an unknown label clean. `locate(row) -> (file, row)`
    names the input file of a row of several concatenated files."""
    from sera_cli.data.errors import InputError

    col = table.column(name)
    typ = col.type
    if not (pa.types.is_boolean(typ) or pa.types.is_integer(typ) or pa.types.is_floating(typ)):
        raise InputError(file, f"has type {typ}; expected true/false or 0/1", column=name)
    values = pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False)  # nulls become NaN
    bad = np.flatnonzero(~np.isin(values, (0.0, 1.0)))
    if len(bad):
        row = int(bad[0])
        where, local = locate(row) if locate else (file, row)
        value = col[row].as_py()
        problem = "is null" if value is None else "is NaN" if value != value else f"is {value}"
        raise InputError(where, f"{problem}; expected true/false or 0/1", row=local, column=name,
                         hint="fix that row, or drop the column")
    return values == 1.0


def response_lengths(table: pa.Table, sides: tuple[str, ...]) -> tuple[list[np.ndarray], str]:
    """Lengths of the responses in token counts (ntok_<side>, when scored) or characters."""
    tok = [f"ntok_{s}" if s != "response" else "ntok" for s in sides]
    if all(t in table.column_names and table.column(t).null_count == 0 for t in tok):
        return [floats(table, t) for t in tok], "tokens"
    return [text_lengths(table.column(s)) for s in sides], "characters"
