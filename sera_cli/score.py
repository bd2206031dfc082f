"""`sera score`: implicit rewards and their margin (IRM) for every pair, or one reward per candidate.

Work is split into fixed chunks of rows. For each model (policy, then reference), every chunk's log-probs are
saved under a partial folder beside the output as soon as they are done, so `--resume` redoes nothing that
finished; `--shard i/n` takes a contiguous range of whole chunks, so shards concatenated equal a full run; a
`--cache` serves any sequence the same model already scored.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from sera_cli import provenance
from sera_cli.chunked import ChunkedLogps
from sera_cli.console import console
from sera_cli.contract import check_candidates, check_pairs, is_candidates, with_ids
from sera_cli.errors import ConfigError, InputError, SeraError
from sera_cli.hashing import digest
from sera_cli.io import STDIO, Inputs, check_writable, read_inputs, read_parquet, write_parquet
from sera_cli.models import cache_dir
from sera_cli.rewards import dpo_reward, ensemble_margin, reward_margin, simpo_reward
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

    def line(self) -> str:
        rate = f", {self.tokens / self.seconds:,.0f} tokens/s" if self.computed and self.seconds > 0 else ""
        return (f"scored {self.rows:,} rows ({self.computed:,} sequences computed, {self.cached:,} from cache, "
                f"{self.resumed:,} resumed{rate}); {self.truncated:,} truncated -> {self.output}")


def validate(config: ScoreConfig) -> None:
    problems = []
    if config.reward == "dpo" and not config.ref:
        problems.append("--reward dpo needs --ref (the reference model is never taken silently from the policy)")
    if config.reward == "simpo" and config.ref:
        problems.append("--reward simpo is reference-free: drop --ref")
    if config.beta <= 0:
        problems.append(f"--beta must be > 0 (got {config.beta})")
    if not 0.0 <= config.ensemble_lambda <= 1.0:
        problems.append(f"--ensemble-lambda must be in [0, 1] (got {config.ensemble_lambda})")
    if config.shard and not 0 <= config.shard[0] < config.shard[1]:
        problems.append(f"--shard {config.shard[0]}/{config.shard[1]}: need 0 <= i < n")
    if config.resume and config.output == STDIO:
        problems.append("--resume needs a file output (-o FILE), not stdout")
    if problems:
        raise ConfigError("; ".join(problems))


def parse_shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard {text}: expected i/n, e.g. 0/4") from None
    return i, n


def shard_rows(n_rows: int, chunk_rows: int, shard: tuple[int, int] | None) -> tuple[int, int]:
    """[start, stop) rows of a shard: a contiguous run of whole chunks."""
    if shard is None:
        return 0, n_rows
    n_chunks = -(-n_rows // chunk_rows)
    i, n = shard
    return min(i * n_chunks // n * chunk_rows, n_rows), min((i + 1) * n_chunks // n * chunk_rows, n_rows)


def score(config: ScoreConfig) -> ScoreSummary:
    """Read the inputs, score them, write the output atomically."""
    validate(config)
    inputs = read_inputs(list(config.inputs))
    candidates = is_candidates(inputs.table)
    check_candidates(inputs) if candidates else check_pairs(inputs)
    check_writable(config.output)
    start, stop = shard_rows(inputs.table.num_rows, config.chunk_rows, config.shard)
    table = with_ids(inputs.table).slice(start, stop - start)
    try:
        out, summary = score_table(table, config, inputs=inputs, row_offset=start)
    except SeraError:  # deterministic failures: resuming would fail the same way, so keep nothing
        shutil.rmtree(partial_dir(config, table), ignore_errors=True)
        raise
    write_parquet(out, config.output)
    shutil.rmtree(partial_dir(config, table), ignore_errors=True)
    return summary


def partial_dir(config: ScoreConfig, table: pa.Table) -> Path:
    key = digest({"ids": digest(table.column("id").to_pylist()), "config": _work_key(config)})[:16]
    if config.output == STDIO:
        return cache_dir() / "partial" / key
    out = Path(config.output)
    return out.with_name(f".{out.name}.{key}.sera-partial")


def _work_key(config: ScoreConfig) -> dict[str, Any]:
    keep = ("policy", "ref", "reward", "dtype", "max_length", "max_prompt_length", "chunk_rows", "shard")
    return {k: getattr(config, k) for k in keep}


def score_table(table: pa.Table, config: ScoreConfig, inputs: Inputs | None = None,
                row_offset: int = 0) -> tuple[pa.Table, ScoreSummary]:
    """Score a validated pairs or candidates table (with `id`); returns the table with provenance attached."""
    from sera_cli.identity import logp_identity
    from sera_cli.models import check_same_tokenizer, load_tokenizer, resolve
    from sera_cli.scorer import encode_rows, flat_sequences

    t0 = time.perf_counter()
    validate(config)
    candidates = is_candidates(table)
    name = inputs.name if inputs else "<table>"
    roles = {"policy": resolve(config.policy)}
    if config.reward == "dpo":
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
    seqs = flat_sequences(enc)
    per_row = 1 if candidates else 2
    identities = {role: logp_identity(ref, toks[role], config.max_length, config.max_prompt_length, config.dtype)
                  for role, ref in roles.items()}
    work = ChunkedLogps(config, partial_dir(config, table), table.num_rows, seqs, per_row, identities)
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
        "score", {k: v for k, v in config.as_dict().items() if k not in ("extra", "progress")},
        logps={role: identities.get(role) for role in ("policy", "ref")},
        models={role: ref.identity() for role, ref in roles.items()},
        rows=out.num_rows, truncated=int(cols["truncated"].sum()),
        parents=[p for p in [provenance.read(table)] if p])
    seconds = time.perf_counter() - t0
    summary = ScoreSummary(out.num_rows, int(cols["truncated"].sum()), len(seqs) * len(roles), work.computed,
                           work.cached, work.resumed, work.tokens, seconds, config.output)
    return provenance.attach(out, prov), summary


def _columns(results: dict[str, tuple[np.ndarray, np.ndarray]], per_row: int, config: ScoreConfig,
             enc) -> dict[str, np.ndarray]:
    """Output columns from the flat log-probs: per-response log-probs, counts, rewards, IRM."""
    pol, ntok = results["policy"]
    ref = results["ref"][0] if "ref" in results else np.full_like(pol, np.nan)
    if config.reward == "dpo":
        reward = dpo_reward(pol, ref, config.beta)
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


def _read_prev(config: ScoreConfig, table: pa.Table) -> np.ndarray:
    """IRM of the previous iteration, aligned to `table` by id."""
    prev = read_parquet(config.prev)
    for col in ("id", "irm"):
        if col not in prev.column_names:
            raise InputError(config.prev, f"missing column '{col}' (is it the output of 'sera score'?)")
    prev_ids = prev.column("id").to_pylist()
    if len(set(prev_ids)) != len(prev_ids):
        dup = next(i for i, x in enumerate(prev_ids) if prev_ids.index(x) != i)
        raise InputError(config.prev, f"id {prev_ids[dup]!r} appears twice; ids must be unique to join",
                         row=dup, column="id")
    lookup = dict(zip(prev_ids, prev.column("irm").to_numpy(zero_copy_only=False), strict=True))
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
