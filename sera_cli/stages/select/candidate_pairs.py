"""Pairs from scored candidates: per prompt, the pair with the largest IRM (SeRA paper, section 3.3).

Chosen is the distinct response with the highest reward, rejected the one with the lowest, so their reward
difference is the largest margin any pair of that prompt's responses has. A prompt with fewer than two
distinct responses, or whose rewards are all equal, gives no pair.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sera_cli.data.tables import Inputs

# Per-response columns carried into the pair as <name>_chosen / <name>_rejected (train reuses the log-probs).
PER_RESPONSE = ("logp_policy", "logp_ref", "ntok", "sample_idx")


@dataclass(frozen=True)
class PairStats:
    prompts: int
    pairs: int
    too_few: int
    all_equal: int


def text_key(column: pa.ChunkedArray | pa.Array):
    """A polars string Series equal for equal texts: strings as they are, message lists as joined JSON."""
    import polars as pl

    series = pl.from_arrow(column)
    if series.dtype == pl.String:
        return series
    messages = pl.element().struct.field
    return pl.DataFrame({"m": series}).select(
        pl.col("m").list.eval(pl.struct(role=messages("role"), content=messages("content")).struct.json_encode())
        .list.join("\x1e"))["m"]


def max_margin(groups, keys, rewards: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Row indices of each group's chosen and rejected response, and how many groups had fewer than two
    distinct responses or only equal rewards. Ties among equal rewards go to the smaller key for chosen and
    the larger key for rejected, so the result does not depend on row order."""
    import polars as pl

    frame = pl.DataFrame({"g": groups, "k": keys, "r": rewards}).with_row_index("_row")
    best = (frame.sort(["g", "r", "k"], descending=[False, True, False], maintain_order=True)
            .unique(subset=["g", "k"], keep="first", maintain_order=True)
            .group_by("g", maintain_order=True)
            .agg(pl.col("_row").first().alias("c"), pl.col("_row").last().alias("j"),
                 pl.len().alias("n"), (pl.col("r").max() - pl.col("r").min()).alias("spread")))
    too_few = best["n"] < 2
    equal = ~too_few & (best["spread"] <= 0)
    keep = best.filter(~too_few & ~equal)
    chosen, rejected = keep["c"].to_numpy().astype(np.int64), keep["j"].to_numpy().astype(np.int64)
    return chosen, rejected, int(too_few.sum()), int(equal.sum())


def as_messages(texts: pa.ChunkedArray) -> pa.Array:
    """Strings as one-message assistant lists, [{"role": "assistant", "content": text}]."""
    content = texts.combine_chunks().cast(pa.string())
    role = pa.array(["assistant"] * len(content), pa.string())
    messages = pa.StructArray.from_arrays([role, content], names=["role", "content"])
    return pa.ListArray.from_arrays(pa.array(np.arange(len(content) + 1, dtype=np.int32)), messages)


def _is_string(table: pa.Table, name: str) -> bool:
    typ = table.schema.field(name).type
    return pa.types.is_string(typ) or pa.types.is_large_string(typ)


def _check_prompt_ids(inputs: Inputs, ids, prompts) -> None:
    """Every `prompt_id` is set and names one prompt: a pair is built within a prompt_id, so an id shared by two
    prompts would pair a response to one prompt with a response to another."""
    import polars as pl

    from sera_cli.data.errors import InputError

    bad = ids.is_null() | (ids.is_nan() if ids.dtype.is_float() else False)
    if bad.any():
        first_bad = int(bad.arg_true()[0])
        file, row = inputs.locate(first_bad)
        raise InputError(file, f"is {'null' if ids[first_bad] is None else 'NaN'}", row=row, column="prompt_id",
                         hint="give every candidate its prompt's id, or drop the column to group by prompt text")
    frame = pl.DataFrame({"g": ids, "p": prompts}).with_row_index("_row")
    first = frame.group_by("g", maintain_order=True).agg(pl.col("p").first().alias("p0"), pl.col("_row").first()
                                                         .alias("r0"))
    other = frame.join(first, on="g").filter(pl.col("p") != pl.col("p0")).sort("_row")
    if other.height:
        row, row0 = int(other["_row"][0]), int(other["r0"][0])
        file, local = inputs.locate(row)
        file0, local0 = inputs.locate(row0)
        raise InputError(file, f"prompt_id {other['g'][0]!r} is also the id of {file0} row {local0}, another prompt",
                         row=local, column="prompt_id", hint="give each prompt its own prompt_id")


def build_pairs(inputs: Inputs) -> tuple[pa.Table, PairStats]:
    """The max-IRM pair of every prompt in a scored candidates table (columns prompt, response, reward and,
    optionally, prompt_id and the per-response log-probs)."""
    import polars as pl

    table = inputs.table
    group_col = "prompt_id" if "prompt_id" in table.column_names else "prompt"
    groups = pl.from_arrow(table.column(group_col)) if group_col == "prompt_id" else \
        text_key(table.column("prompt"))
    if group_col == "prompt_id":
        _check_prompt_ids(inputs, groups, text_key(table.column("prompt")))
    rewards = pc.cast(table.column("reward"), pa.float64()).to_numpy()
    chosen, rejected, too_few, equal = max_margin(groups, text_key(table.column("response")), rewards)
    tc, tr = table.take(chosen), table.take(rejected)
    cols: dict[str, pa.Array | pa.ChunkedArray] = {}
    if group_col == "prompt_id":
        cols["prompt_id"] = tc.column("prompt_id")
    cols["prompt"] = tc.column("prompt")
    cols["chosen"], cols["rejected"] = tc.column("response"), tr.column("response")
    if _is_string(table, "response") and not _is_string(table, "prompt"):
        cols["chosen"], cols["rejected"] = as_messages(cols["chosen"]), as_messages(cols["rejected"])
    cols["reward_chosen"], cols["reward_rejected"] = tc.column("reward"), tr.column("reward")
    cols["irm"] = pc.subtract(pc.cast(tc.column("reward"), pa.float64()), pc.cast(tr.column("reward"), pa.float64()))
    for name in PER_RESPONSE:
        if name in table.column_names:
            cols[f"{name}_chosen"], cols[f"{name}_rejected"] = tc.column(name), tr.column(name)
    if "truncated" in table.column_names:
        cols["truncated"] = pc.or_kleene(tc.column("truncated"), tr.column("truncated"))
    stats = PairStats(prompts=len(chosen) + too_few + equal, pairs=len(chosen), too_few=too_few, all_equal=equal)
    return pa.table(cols), stats
