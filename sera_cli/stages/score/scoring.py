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
import pyarrow.compute as pc

from sera_cli.backends.logps.chunks import ChunkedLogps
from sera_cli.data import provenance
from sera_cli.data.chunk_store import ChunkStore, shard_record, shard_rows, with_rows
from sera_cli.data.console import console
from sera_cli.data.contract import check_candidates, check_pairs, is_candidates, with_ids
from sera_cli.data.errors import InputError, SeraError
from sera_cli.data.rewards import ensemble_margin, reward_margin
from sera_cli.data.tables import (
    STDIO,
    Inputs,
    check_writable,
    inputs_of,
    read_inputs,
    read_parquet,
    write_parquet,
)
from sera_cli.stages.score.config import ScoreConfig
from trainers.losses import REWARDS, implicit_reward


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
    precision: dict[str, Any] | None = None  # the precision check's figures (`sera_cli.stages.score.precision`), if it ran

    def line(self) -> str:
        rate = f", {self.tokens / self.seconds:,.0f} tokens/s" if self.computed and self.seconds > 0 else ""
        stale = f", {self.stale:,} stale chunks recomputed" if self.stale else ""
        line = (f"scored {self.rows:,} rows ({self.computed:,} sequences computed, {self.cached:,} from cache, "
                f"{self.resumed:,} resumed{stale}{rate}); {self.truncated:,} truncated -> {self.output}")
        if self.precision:
            from sera_cli.stages.score.precision import summary

            line += "\n" + summary(self.precision)
        return line


def run_here(config: ScoreConfig) -> ScoreSummary:
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
    shard's record; inputs are checked before any model is loaded (the settings were, by the entry `score`)."""
    inputs = read_inputs(list(config.inputs))
    candidates = is_candidates(inputs.table)
    check_candidates(inputs) if candidates else check_pairs(inputs)
    check_writable(config.output, inputs_of(config))
    _check_cache_folder(config.cache)
    start, stop = shard_rows(inputs.table.num_rows, config.chunk_rows, config.shard)
    full = with_ids(inputs.table)
    shard = shard_record(full.column("id").to_pylist(), config.chunk_rows, config.shard) if config.shard else None
    if shard and config.prev and config.prev != STDIO:  # shards of one job ensemble with the same previous IRM
        from sera_cli.data.hashing import file_digest

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
    from sera_cli.backends.chat_templates import folded_rows
    from sera_cli.backends.logps.batched import encode_rows, flat_sequences
    from sera_cli.backends.logps.identity import logp_identity
    from sera_cli.backends.models import (
        check_context,
        check_same_tokenizer,
        check_same_vocab,
        load_tokenizer,
        resolve,
        resolved_dtype,
    )

    t0 = time.perf_counter()  # `config` is checked by its maker: the entry `score`, or `generate --score`
    candidates = is_candidates(table)
    name = inputs.name if inputs else "<table>"
    roles = {"policy": resolve(config.policy)}
    if REWARDS[config.reward].needs_ref:
        roles["ref"] = resolve(config.ref)
    toks = {role: load_tokenizer(ref, config.trust_remote_code) for role, ref in roles.items()}
    if "ref" in toks:
        check_same_tokenizer(toks["policy"], toks["ref"], config.policy, config.ref)
        check_same_vocab(roles["policy"], roles["ref"], config.trust_remote_code)
    tok = toks["policy"]
    prev = _read_prev(config, table, "reward" if candidates else "irm") if config.prev else None

    prompts = table.column("prompt").to_pylist()
    responses = ([[r] for r in table.column("response").to_pylist()] if candidates else
                 list(zip(table.column("chosen").to_pylist(), table.column("rejected").to_pylist(), strict=True)))
    with console.status(f"Tokenizing {len(prompts):,} rows"):
        enc = encode_rows(tok, prompts, responses, config.max_length, config.max_prompt_length,
                          lambda i: inputs.locate(i + row_offset) if inputs else (name, i))
    folded = folded_rows(enc)
    check_context(list(roles.values()), [max(len(e.sequence(i)) for i in range(len(e.responses))) for e in enc],
                  lambda i: inputs.locate(i + row_offset) if inputs else (name, i), config.trust_remote_code,
                  max_ids=[max(max(e.sequence(i), default=0) for i in range(len(e.responses))) for e in enc])
    seqs = flat_sequences(enc)
    per_row = 1 if candidates else 2
    dtype = resolved_dtype(config.dtype, config.device)  # 'auto' is recorded as what it stands for
    identities = {role: logp_identity(ref, toks[role], config.max_length, config.max_prompt_length, dtype)
                  for role, ref in roles.items()}
    work = ChunkedLogps(config, store, table.num_rows, seqs, per_row, identities, models)
    results = work.run(roles)

    cols = _columns(results, per_row, config, enc)
    _check_finite(cols, name, inputs, row_offset)
    check = None
    if (n_check := config.precision_pairs(dtype)) and table.num_rows:
        from sera_cli.stages.score.precision import precision_check

        check = precision_check(config, roles, toks, seqs, cols, table, n_check, dtype)
    if prev is not None:  # pairs: the IRM, candidates: the reward (the max-min pairing then ranks by it, Eq. 7)
        col = "reward" if candidates else "irm"
        prev = np.where(np.isnan(prev), cols[col], prev)  # --prev-missing current
        cols[f"{col}_now"] = cols[col]
        cols[f"{col}_prev"] = prev
        cols[col] = ensemble_margin(prev, cols[f"{col}_now"], config.ensemble_lambda)
    out = table
    for col, values in cols.items():
        if col in out.column_names:
            out = out.drop_columns([col])
        out = out.append_column(col, pa.array(values))
    prov = score_provenance(config, out, table, inputs, shard,
                            logps={role: identities.get(role) for role in ("policy", "ref")},
                            models={role: ref.identity() for role, ref in roles.items()}, folded=folded,
                            **({"precision": check} if check else {}))
    seconds = time.perf_counter() - t0
    summary = ScoreSummary(out.num_rows, prov["truncated"], len(seqs) * len(roles), work.computed,
                           work.cached, work.resumed, work.tokens, seconds, config.output, store.stale, check)
    return provenance.attach(out, prov), summary


def score_provenance(config: ScoreConfig, out: pa.Table, table: pa.Table, inputs: Inputs | None,
                     shard: dict[str, Any] | None, logps, models, folded: int = 0, **extra) -> dict[str, Any]:
    """A scored table's provenance, one process's or a Ray cluster's (`on_ray`): the settings, the log-prob
    identities and models, rows and truncated rows, the shard, system turns folded into the first user turn, and
    the parents (the input files, else the table's own provenance)."""
    from sera_cli.backends.chat_templates import folded_record
    from sera_cli.data import lineage

    return provenance.record(
        "score", {k: v for k, v in config.as_dict().items() if k != "progress"}, logps=logps, models=models,
        rows=out.num_rows, truncated=int(pc.sum(out.column("truncated")).as_py() or 0),
        **({"shard": with_rows(shard, out)} if shard else {}),
        **folded_record(folded),
        **extra, parents=lineage.parents(inputs) if inputs else [p for p in [provenance.read(table)] if p])


def _columns(results: dict[str, tuple[np.ndarray, np.ndarray]], per_row: int, config: ScoreConfig,
             enc) -> dict[str, np.ndarray]:
    """Output columns from the flat log-probs: per-response log-probs, counts, rewards, IRM."""
    pol, ntok = results["policy"]
    ref = results["ref"][0] if "ref" in results else np.full_like(pol, np.nan)
    reward = rewards(pol, ref, ntok, config)
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


def rewards(pol: np.ndarray, ref: np.ndarray, ntok: np.ndarray, config: ScoreConfig) -> np.ndarray:
    """The implicit reward of each response, by `config.reward` (`trainers.losses.REWARDS`), from its summed
    log-probs and token count."""
    return implicit_reward(config.reward, pol, ref, np.asarray(ntok), config.beta)


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


def _read_prev(config: ScoreConfig, table: pa.Table, column: str = "irm") -> np.ndarray:
    """IRM (pairs) or reward (candidates, `column`) of the previous iteration, aligned to `table` by id. A row it
    lacks, or whose value is not finite, is an error unless --prev-missing current (then NaN here: the current
    value stands in for it)."""
    prev = read_parquet(config.prev)
    for col in ("id", column):
        if col not in prev.column_names:
            raise InputError(config.prev, f"missing column '{col}' (is it the output of 'sera score'?)")
    typ = prev.schema.field(column).type
    if not (pa.types.is_floating(typ) or pa.types.is_integer(typ)):
        raise InputError(config.prev, f"has type {typ}; expected numbers", column=column)
    prev_ids = prev.column("id").to_pylist()
    first: dict[Any, int] = {}
    for i, row_id in enumerate(prev_ids):
        if row_id is None:
            raise InputError(config.prev, "is null", row=i, column="id", hint="ids must be set to join on them")
        if row_id != row_id:  # NaN: never equal to itself, so never found as a repeat or a match
            raise InputError(config.prev, "is NaN", row=i, column="id", hint="ids must be set to join on them")
        if row_id in first:
            raise InputError(config.prev, f"id {row_id!r} appears twice (also row {first[row_id]}); ids must be "
                                          "unique to join", row=i, column="id")
        first[row_id] = i
    irm = np.asarray(prev.column(column).to_numpy(zero_copy_only=False), dtype=np.float64)  # nulls become NaN
    bad = ~np.isfinite(irm)
    what = "IRM" if column == "irm" else column
    if bad.any() and config.prev_missing != "current":
        row = int(np.argmax(bad))
        raise InputError(config.prev, f"is {'null or NaN' if np.isnan(irm[row]) else irm[row]}, not a finite {what}",
                         row=row, column=column, hint="rescore that file, or pass --prev-missing current to use the "
                                                      f"current {what} for such rows")
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
