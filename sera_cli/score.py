"""`sera score`: implicit rewards and their margin (IRM) for every pair, or one reward per candidate.

Work is split into fixed chunks of rows. For each model (policy, then reference), every chunk's log-probs are
saved in the output's chunk store (`chunk_store`) as soon as they are done, keyed by the model's log-prob
identity and the chunk's token ids, so `--resume` redoes nothing that finished and reuses nothing stale;
`--shard i/n` takes a contiguous range of whole chunks, so shards concatenated equal a full run; a `--cache`
serves any sequence the same model already scored.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from sera_cli import provenance
from sera_cli.chunk_store import ChunkStore, shard_record, shard_rows
from sera_cli.console import console
from sera_cli.contract import check_candidates, check_pairs, is_candidates, with_ids
from sera_cli.errors import InputError, SeraError
from sera_cli.io import STDIO, Inputs, check_writable, read_inputs, read_parquet, write_parquet
from sera_cli.logp_chunks import ChunkedLogps
from sera_cli.rewards import averaged_reward, dpo_reward, ensemble_margin, reward_margin, simpo_reward
from sera_cli.score_config import ScoreConfig


@dataclass(frozen=True)
class ScoreSummary:
    rows: int
    truncated: int
    sequences: int
    computed: int
    cached: int
    resumed: int
    tokens: int
    seconds: float
    output: str
    stale: int = 0  # saved chunks not resumed: made by other weights or from other text

    def line(self) -> str:
        rate = f", {self.tokens / self.seconds:,.0f} tokens/s" if self.computed and self.seconds > 0 else ""
        stale = f", {self.stale:,} stale chunks recomputed" if self.stale else ""
        return (f"scored {self.rows:,} rows ({self.computed:,} sequences computed, {self.cached:,} from cache, "
                f"{self.resumed:,} resumed{stale}{rate}); {self.truncated:,} truncated -> {self.output}")


def score(config: ScoreConfig) -> ScoreSummary:
    """Read the inputs, score them, write the output atomically. Under a launcher of N processes, each scores
    its shard and the first merges them (`sera_cli.launch`)."""
    from sera_cli.launch import ranked, world

    config.check()
    if (w := world()).size > 1:
        return ranked(_score, config, "score", w)
    return _score(config)


def _score(config: ScoreConfig) -> ScoreSummary:
    inputs, table, start, shard = prepared(config)
    with ChunkStore(config.output, "score", config.resume) as store:
        try:
            out, summary = score_table(table, config, inputs=inputs, row_offset=start, shard=shard, store=store)
        except SeraError:  # deterministic failures: resuming would fail the same way, so keep nothing
            store.finish()
            raise
        write_parquet(out, config.output)
        store.finish()
    return summary


def prepared(config: ScoreConfig) -> tuple[Inputs, pa.Table, int, dict[str, Any] | None]:
    """The checked inputs, the rows to score (this shard's, with `id`), where they start in the inputs, and the
    shard's record; settings and inputs are checked before any model is loaded."""
    config.check()
    inputs = read_inputs(list(config.inputs))
    candidates = is_candidates(inputs.table)
    check_candidates(inputs) if candidates else check_pairs(inputs)
    check_writable(config.output, (*config.inputs, config.prev))
    _check_cache_folder(config.cache)
    start, stop = shard_rows(inputs.table.num_rows, config.chunk_rows, config.shard)
    full = with_ids(inputs.table)
    shard = shard_record(full.column("id").to_pylist(), config.chunk_rows, config.shard) if config.shard else None
    if shard and config.prev and config.prev != STDIO:  # shards of one job ensemble with the same previous IRM
        from sera_cli.hashing import file_digest

        shard["prev"] = file_digest(config.prev)
    return inputs, full.slice(start, stop - start), start, shard


def score_table(table: pa.Table, config: ScoreConfig, inputs: Inputs | None = None,
                row_offset: int = 0, shard: dict[str, Any] | None = None,
                store: ChunkStore | None = None, models: dict[str, Any] | None = None) -> tuple[pa.Table, ScoreSummary]:
    """Score a validated pairs or candidates table (with `id`); returns the table with provenance attached.
    Its parents are the input files (`inputs`), else the table's own provenance (generate --score).
    Finished chunks go to `store` (the caller's, held open); without one, the output's score chunk store is
    opened here and emptied once the table is scored. `models` (a dict the caller keeps) holds the loaded
    models from one call to the next (a Ray actor's, `ray_stages`)."""
    if store is None:
        with ChunkStore(config.output, "score", config.resume) as own:
            scored = score_table(table, config, inputs, row_offset, shard, own, models)
            own.finish()
            return scored
    from sera_cli import lineage
    from sera_cli.batched_logps import encode_rows, flat_sequences
    from sera_cli.logp_identity import logp_identity
    from sera_cli.models import check_context, check_same_tokenizer, load_tokenizer, resolve, resolved_dtype

    t0 = time.perf_counter()
    config.check()
    candidates = is_candidates(table)
    name = inputs.name if inputs else "<table>"
    roles = {"policy": resolve(config.policy)}
    if config.reward != "simpo":
        roles["ref"] = resolve(config.ref)
    toks = {role: load_tokenizer(ref, config.trust_remote_code) for role, ref in roles.items()}
    if "ref" in toks:
        check_same_tokenizer(toks["policy"], toks["ref"], config.policy, config.ref)
    tok = toks["policy"]
    prev = _read_prev(config, table) if config.prev else None

    prompts = table.column("prompt").to_pylist()
    responses = ([[r] for r in table.column("response").to_pylist()] if candidates else
                 list(zip(table.column("chosen").to_pylist(), table.column("rejected").to_pylist(), strict=True)))
    with console.status(f"Tokenizing {len(prompts):,} rows"):
        enc = encode_rows(tok, prompts, responses, config.max_length, config.max_prompt_length)
    check_context(list(roles.values()), [max(len(e.sequence(i)) for i in range(len(e.responses))) for e in enc],
                  lambda i: inputs.locate(i + row_offset) if inputs else (name, i), config.trust_remote_code)
    seqs = flat_sequences(enc)
    per_row = 1 if candidates else 2
    dtype = resolved_dtype(config.dtype, config.device)  # 'auto' is recorded as what it stands for
    identities = {role: logp_identity(ref, toks[role], config.max_length, config.max_prompt_length, dtype)
                  for role, ref in roles.items()}
    work = ChunkedLogps(config, store, table.num_rows, seqs, per_row, identities, models)
    results = work.run(roles)

    cols = _columns(results, per_row, config, enc)
    _check_finite(cols, name, inputs, row_offset)
    if prev is not None:
        prev = np.where(np.isnan(prev), cols["irm"], prev)  # --prev-missing current
        cols["irm_now"] = cols["irm"]
        cols["irm_prev"] = prev
        cols["irm"] = ensemble_margin(prev, cols["irm_now"], config.ensemble_lambda)
    out = table
    for col, values in cols.items():
        if col in out.column_names:
            out = out.drop_columns([col])
        out = out.append_column(col, pa.array(values))
    prov = provenance.record(
        "score", {k: v for k, v in config.as_dict().items() if k != "progress"},
        logps={role: identities.get(role) for role in ("policy", "ref")},
        models={role: ref.identity() for role, ref in roles.items()},
        rows=out.num_rows, truncated=int(cols["truncated"].sum()), **({"shard": shard} if shard else {}),
        parents=lineage.parents(inputs) if inputs else [p for p in [provenance.read(table)] if p])
    seconds = time.perf_counter() - t0
    summary = ScoreSummary(out.num_rows, int(cols["truncated"].sum()), len(seqs) * len(roles), work.computed,
                           work.cached, work.resumed, work.tokens, seconds, config.output, store.stale)
    return provenance.attach(out, prov), summary


def _columns(results: dict[str, tuple[np.ndarray, np.ndarray]], per_row: int, config: ScoreConfig,
             enc) -> dict[str, np.ndarray]:
    """Output columns from the flat log-probs: per-response log-probs, counts, rewards, IRM."""
    pol, ntok = results["policy"]
    ref = results["ref"][0] if "ref" in results else np.full_like(pol, np.nan)
    if config.reward == "dpo":
        reward = dpo_reward(pol, ref, config.beta)
    elif config.reward == "ipo":
        reward = averaged_reward(pol, ref, np.maximum(ntok, 1), config.beta)
    else:
        reward = simpo_reward(pol, np.maximum(ntok, 1), config.beta)
    truncated = np.array([e.truncated for e in enc], dtype=bool)
    if per_row == 1:
        return {"logp_policy": pol, "logp_ref": _nullable(ref), "ntok": ntok, "reward": reward,
                "truncated": truncated}
    cols = {"logp_policy_chosen": pol[0::2], "logp_policy_rejected": pol[1::2],
            "logp_ref_chosen": _nullable(ref[0::2]), "logp_ref_rejected": _nullable(ref[1::2]),
            "ntok_chosen": ntok[0::2], "ntok_rejected": ntok[1::2],
            "reward_chosen": reward[0::2], "reward_rejected": reward[1::2]}
    cols["irm"] = reward_margin(cols["reward_chosen"], cols["reward_rejected"])
    cols["truncated"] = truncated
    return cols


def _nullable(values: np.ndarray) -> pa.Array:
    return pa.array(values, mask=np.isnan(values)) if np.isnan(values).all() else pa.array(values)


def _check_finite(cols: dict[str, Any], name: str, inputs: Inputs | None, row_offset: int) -> None:
    for col in ("logp_policy_chosen", "logp_policy_rejected", "logp_ref_chosen", "logp_ref_rejected",
                "logp_policy", "logp_ref"):
        values = cols.get(col)
        if values is None or isinstance(values, pa.Array):
            continue
        bad = ~np.isfinite(values)
        if bad.any():
            row = int(np.argmax(bad)) + row_offset
            file, local = inputs.locate(row) if inputs else (name, row)
            raise InputError(file, f"{col} is not finite ({values[row - row_offset]})", row=local, column=col,
                             hint="the model overflowed: try --dtype float32, or check the text")


def _check_cache_folder(folder: str | None) -> None:
    """`--cache` names a folder that exists or can be made, and can be written."""
    if folder is None:
        return
    path = Path(folder)
    while not path.exists() and path != path.parent:
        path = path.parent
    if not path.is_dir():
        raise InputError(folder, f"--cache cannot be made: {path} is a file", hint="give --cache a folder")
    if not os.access(path, os.W_OK | os.X_OK):
        raise InputError(folder, f"--cache cannot be written: no permission on {path}",
                         hint="give --cache a folder you can write to")


def _read_prev(config: ScoreConfig, table: pa.Table) -> np.ndarray:
    """IRM of the previous iteration, aligned to `table` by id. A row it lacks, or whose IRM is not finite, is an
    error unless --prev-missing current (then NaN here: the current IRM stands in for it)."""
    prev = read_parquet(config.prev)
    for col in ("id", "irm"):
        if col not in prev.column_names:
            raise InputError(config.prev, f"missing column '{col}' (is it the output of 'sera score'?)")
    if not (pa.types.is_floating(prev.schema.field("irm").type) or pa.types.is_integer(prev.schema.field("irm").type)):
        raise InputError(config.prev, f"has type {prev.schema.field('irm').type}; expected numbers", column="irm")
    prev_ids = prev.column("id").to_pylist()
    first: dict[Any, int] = {}
    for i, row_id in enumerate(prev_ids):
        if row_id is None:
            raise InputError(config.prev, "is null", row=i, column="id", hint="ids must be set to join on them")
        if row_id in first:
            raise InputError(config.prev, f"id {row_id!r} appears twice (also row {first[row_id]}); ids must be "
                                          "unique to join", row=i, column="id")
        first[row_id] = i
    irm = np.asarray(prev.column("irm").to_numpy(zero_copy_only=False), dtype=np.float64)  # nulls become NaN
    bad = ~np.isfinite(irm)
    if bad.any() and config.prev_missing != "current":
        row = int(np.argmax(bad))
        raise InputError(config.prev, f"is {'null or NaN' if np.isnan(irm[row]) else irm[row]}, not a finite IRM",
                         row=row, column="irm", hint="rescore that file, or pass --prev-missing current to use the "
                                                     "current IRM for such rows")
    lookup = dict(zip(prev_ids, np.where(bad, np.nan, irm), strict=True))
    out = np.empty(table.num_rows)
    for i, row_id in enumerate(table.column("id").to_pylist()):
        if row_id in lookup:
            out[i] = lookup[row_id]
        elif config.prev_missing == "current":
            out[i] = np.nan  # filled with the current IRM below
        else:
            raise InputError(config.prev, f"has no row with id {row_id!r} (row {i} of the input)", column="id",
                             hint="pass --prev-missing current to use the current IRM for new rows")
    return out
