"""`sera score --ray` (and `generate --score` on Ray): the rows scored chunk by chunk on a Ray cluster's actors
(`parallel.ray_pool`), each chunk with this stage's own `score_table`, written as one process writes them."""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import xxhash

from sera_cli.data.errors import SeraError
from sera_cli.parallel.ray_pool import RayCluster, actor_name, dumps, each_chunk
from trainers.losses import REWARDS

if TYPE_CHECKING:
    from sera_cli.stages.score.config import ScoreConfig
    from sera_cli.stages.score.scoring import ScoreSummary


def ray_score(config: ScoreConfig) -> ScoreSummary:
    """`sera score --ray`: the rows scored chunk by chunk on the cluster, written as one process writes them."""
    from sera_cli.data.chunk_store import ChunkStore
    from sera_cli.data.tables import write_parquet
    from sera_cli.stages.score.scoring import prepared

    t0 = time.perf_counter()
    inputs, table, start, shard = prepared(config)
    cluster = RayCluster(config, gpus_per_actor=1)
    with ChunkStore(config.output, "score", config.resume) as store:  # a failure keeps the finished chunks
        out, summary = ray_score_table(cluster, table, config, shard, inputs=inputs, row_offset=start, store=store, t0=t0)
        write_parquet(out, config.output)
        store.finish()
    return summary


def ray_score_table(cluster: RayCluster, table: pa.Table, config, shard: dict[str, Any] | None, inputs=None, row_offset: int = 0,
                store=None, t0: float | None = None):
    """`score_table` on the cluster's actors: (the scored table with provenance, its summary). Chunks are saved in
    `store` (without one, the output's score chunk store, emptied once the table is scored)."""
    from sera_cli.data import provenance
    from sera_cli.data.chunk_store import ChunkStore, chunk_key
    from sera_cli.stages.score.scoring import ScoreSummary, score_provenance, score_table

    if store is None:
        with ChunkStore(config.output, "score", config.resume) as own:
            scored = ray_score_table(cluster, table, config, shard, inputs, row_offset, own, t0)
            own.finish()
            return scored
    t0 = t0 or time.perf_counter()
    if table.num_rows == 0:
        return score_table(table, config, inputs, row_offset, shard, store)
    size, n = config.chunk_rows, table.num_rows
    bare = table.replace_schema_metadata(None)  # a chunk's key is its rows, not who made them
    payloads = [dumps(bare.slice(s, size)) for s in range(0, n, size)]
    identity = _score_identity(config)
    keys = [chunk_key(identity, xxhash.xxh3_128_hexdigest(p)) for p in payloads]
    done: dict[int, pa.Table] = {}
    for c, key in enumerate(keys):
        if (saved := store.load(f"ray-{c:06d}.parquet", key)) is not None:
            done[c] = saved
    resumed = set(done)
    totals = {"computed": 0, "cached": 0, "tokens": 0}

    def finished(c: int, rows: pa.Table, facts: dict[str, Any]) -> None:
        store.save(f"ray-{c:06d}.parquet", keys[c], rows)
        done[c] = rows
        for k in totals:
            totals[k] += facts[k]

    todo = {c: (f"chunk {c} (rows {row_offset + c * size}-{row_offset + min((c + 1) * size, n) - 1})",
                bare.slice(c * size, size)) for c in range(len(payloads)) if c not in done}
    cluster.run(ScoreActor, {"config": config}, todo, finished)
    parts = [done[c] for c in range(len(payloads))]
    provs = [provenance.read(p) or {} for p in parts]
    for c, p in enumerate(provs):
        if (p.get("logps"), p.get("models")) != (provs[0].get("logps"), provs[0].get("models")):
            raise SeraError(f"{config.output}: chunks 0 and {c} were scored with other models or log-prob "
                            "identities (nodes with other devices or dtypes?); pass --dtype and --device, and "
                            "rerun without --resume")
    out = pa.concat_tables([p.replace_schema_metadata(None) for p in parts])
    folded = sum((p.get("chat_template") or {}).get("system_folded_rows", 0) for p in provs)
    prov = score_provenance(config, out, table, inputs, shard, logps=provs[0].get("logps"),
                            models=provs[0].get("models"), folded=folded, ray=cluster.record())
    per_row = (1 if "response" in table.column_names else 2) * (2 if REWARDS[config.reward].needs_ref else 1)
    summary = ScoreSummary(out.num_rows, prov["truncated"], out.num_rows * per_row, totals["computed"], totals["cached"],
                           sum(parts[c].num_rows for c in resumed) * per_row, totals["tokens"],
                           time.perf_counter() - t0, config.output, store.stale)
    return provenance.attach(out, prov), summary


class ScoreActor:
    """A Ray actor: scores chunks with `score.score_table`, its models loaded once (unless --low-memory)."""

    def __init__(self, config):
        self.name = actor_name()
        self.folder = tempfile.TemporaryDirectory(prefix="sera-ray-")  # its own throwaway chunk store
        self.config = replace(config, output=os.path.join(self.folder.name, "chunk.parquet"), resume=False,
                              shard=None, progress=False, ray_address=None,
                              precision_check=0)  # per chunk it would rescore each chunk's pairs
        self.models: dict[str, Any] | None = None if config.low_memory else {}

    def __call__(self, batch: pa.Table) -> pa.Table:
        return each_chunk(batch, self.name, self._score)

    def _score(self, table: pa.Table) -> tuple[pa.Table, dict[str, Any]]:
        from sera_cli.stages.score.scoring import score_table

        out, s = score_table(table, self.config, models=self.models)
        return out, {"computed": s.computed, "cached": s.cached, "tokens": s.tokens}


def _score_identity(config) -> dict[str, Any]:
    """What a scored chunk depends on besides its rows: the job's settings (`merge.RUN_ONLY` left out), the models'
    fingerprints and the content of --prev."""
    from sera_cli.backends.models import resolve
    from sera_cli.data.hashing import file_digest
    from sera_cli.data.tables import STDIO
    from sera_cli.stages.merge import RUN_ONLY

    models = {role: resolve(spec).fingerprint for role, spec in (("policy", config.policy), ("ref", config.ref))
              if spec}
    prev = file_digest(config.prev) if config.prev and config.prev != STDIO else None
    return {"stage": "score", "settings": {k: v for k, v in config.as_dict().items() if k not in RUN_ONLY},
            "models": models, "prev": prev}
