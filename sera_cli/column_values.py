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


def response_lengths(table: pa.Table, sides: tuple[str, ...]) -> tuple[list[np.ndarray], str]:
    """Lengths of the responses in token counts (ntok_<side>, when scored) or characters."""
    tok = [f"ntok_{s}" if s != "response" else "ntok" for s in sides]
    if all(t in table.column_names and table.column(t).null_count == 0 for t in tok):
        return [floats(table, t) for t in tok], "tokens"
    return [text_lengths(table.column(s)) for s in sides], "characters"
