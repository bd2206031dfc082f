"""`score` and `generate` on a Ray cluster (`--ray`, `--ray-address ADDR`, `--ray-actors N`): one output, many actors.

The driver (the process the command runs in) reads and checks the input with the stage's own checks, so bad
input is the same one-line error, and cuts the work into the stage's own chunks (`--chunk-rows` rows,
`--chunk-prompts` prompts). Ray Data hands the chunks to a pool of actors (one GPU each where the cluster has
GPUs, `--tensor-parallel-size` GPUs per generation actor; else one CPU each): an actor loads its models once and
computes a chunk with the stage's own code (`score.score_table`; the generation engine through
`generation.run.chunk_samples`), so a chunk holds the numbers one process computes for it. The driver saves each
chunk in the output's chunk store as it comes back, so `--resume` computes only the chunks that never came back
(a failed job keeps the finished ones), then writes the chunks in input order, atomically, with the stage's
provenance plus `ray` (address, actors, GPUs per actor, nodes).

A chunk that fails stops the job with one line naming the chunk, its rows and the actor; no output is written.
Actors open the models, `--prev` and `--cache` themselves: every node must see them at the same path. The
log-prob cache is SQLite, safe for actors that share a machine; across machines give each node its own cache.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import xxhash

from sera_cli.errors import ConfigError, SeraError, described

if TYPE_CHECKING:
    from sera_cli.generation.config import GenerateConfig
    from sera_cli.generation.run import GenerateSummary
    from sera_cli.score import ScoreSummary
    from sera_cli.score_config import ScoreConfig

LOCAL = "local"  # --ray: this machine's Ray (the one `ray start` made, else a new one)
INSTALL_HINT = "pip install 'sera[ray]'"


class ChunkFailed(SeraError):
    """A chunk that failed on an actor: the one line names the chunk, its rows and the actor."""


def address(ray: bool, ray_address: str | None) -> str | None:
    """The cluster `--ray` / `--ray-address` name (None: no Ray)."""
    return ray_address or (LOCAL if ray else None)


def ray_score(config: ScoreConfig) -> ScoreSummary:
    """`sera score --ray`: the rows scored chunk by chunk on the cluster, written as one process writes them."""
    from sera_cli.chunk_store import ChunkStore
    from sera_cli.io import write_parquet
    from sera_cli.score import prepared

    t0 = time.perf_counter()
    inputs, table, start, shard = prepared(config)
    cluster = RayCluster(config, gpus_per_actor=1)
    with ChunkStore(config.output, "score", config.resume) as store:  # a failure keeps the finished chunks
        out, summary = cluster.score_table(table, config, shard, inputs=inputs, row_offset=start, store=store, t0=t0)
        write_parquet(out, config.output)
        store.finish()
    return summary


def ray_generate(config: GenerateConfig) -> GenerateSummary:
    """`sera generate --ray`: the prompts generated chunk by chunk on the cluster, written as one process writes
    them (the generation stage itself, with its chunks computed by `RayCluster.generate`)."""
    from sera_cli.generation.run import _generate_one

    config.check()
    return _generate_one(config, RayCluster(config, gpus_per_actor=config.tensor_parallel_size))


class RayCluster:
    """The cluster a stage runs its chunks on; joined on first use, so bad input fails before Ray starts."""

    def __init__(self, config, gpus_per_actor: int):
        self.config, self.gpus_per_actor = config, gpus_per_actor
        self._ray = None
        self._engine: dict[str, Any] | None = None
        self.used = 0  # actors in the last pool

    @property
    def ray(self):
        if self._ray is None:
            self._ray = _join(self.config.ray_address)
        return self._ray

    def _pool(self) -> tuple[int, dict[str, Any]]:
        """Actors and each one's resources: `gpus_per_actor` GPUs where the cluster has GPUs, else one CPU."""
        gpus = 0 if self.config.device == "cpu" else int(self.ray.cluster_resources().get("GPU", 0))
        if gpus:
            return self.config.ray_actors or max(gpus // self.gpus_per_actor, 1), {"num_gpus": self.gpus_per_actor}
        return self.config.ray_actors or 2, {"num_cpus": 1}

    def record(self) -> dict[str, Any]:
        """What the provenance says of the cluster."""
        _, resources = self._pool()
        nodes = sum(1 for n in self.ray.nodes() if n.get("Alive"))
        return {"address": self.config.ray_address, "actors": self.used,
                "gpus_per_actor": resources.get("num_gpus", 0), "nodes": nodes}

    def run(self, actor: type, args: dict[str, Any], chunks: dict[int, tuple[str, pa.Table]],
            on_chunk: Callable[[int, pa.Table, dict[str, Any]], None]) -> None:
        """Compute `chunks` (index -> (what it is, its rows)) on a pool of `actor(**args)`; `on_chunk(index, rows,
        facts)` as each comes back. A chunk that fails raises one line."""
        if not chunks:
            return
        from ray import data

        actors, resources = self._pool()
        self.used = min(actors, len(chunks))
        ctx = data.DataContext.get_current()
        ctx.execution_options.preserve_order = True
        ctx.enable_progress_bars = self.config.progress
        for name, value in (("raise_original_map_exception", True), ("print_on_execution_start", False)):
            if hasattr(ctx, name):  # newer Ray Data: the actor's own exception; nothing printed on stdout
                setattr(ctx, name, value)
        blocks = [pa.table({"chunk": pa.array([c], pa.int64()), "what": [what], "rows": pa.array([_dumps(t)], pa.large_binary())})
                  for c, (what, t) in sorted(chunks.items())]  # one block per chunk: each goes to any free actor
        ds = data.from_arrow(blocks).map_batches(actor, fn_constructor_kwargs=args, batch_size=1,
                                                 batch_format="pyarrow",
                                                 compute=data.ActorPoolStrategy(size=self.used), **resources)
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                for c, rows, facts in zip(batch["chunk"].to_pylist(), batch["rows"].to_pylist(),
                                          batch["facts"].to_pylist(), strict=True):
                    on_chunk(c, _loads(rows), json.loads(facts))
        except Exception as err:
            from ray.exceptions import RayError

            if isinstance(err, SeraError) and not isinstance(err, RayError):  # the driver's own (saving a chunk)
                raise
            raise SeraError(_failure(err)) from None  # Ray wraps the actor's exception in its own

    def engine_identity(self) -> dict[str, Any]:
        """The generation engine and its settings, resolved on a node like the actors' (its GPUs, its vLLM)."""
        from sera_cli.generation.run import engine_identity

        if self._engine is None:
            _, resources = self._pool()
            try:
                self._engine = self.ray.get(self.ray.remote(**resources)(engine_identity).remote(self.config))
            except Exception as err:
                raise SeraError(_failure(err)) from None
        return self._engine

    def generate(self, work, stops: list[int], tokens: list[list[int]], context: int | None) -> None:
        """The chunks `work` (`generation.run._Work`) lacks, generated by the actors and kept as they come back."""
        engine = self.engine_identity()["name"]
        longest = max((len(t) for t in tokens), default=1)
        chunks = {}
        for c in work.missing():
            ids, toks = work.prompts_of(c)
            chunks[c] = (f"chunk {c // self.config.chunk_prompts} (prompts {c}-{c + len(ids) - 1})",
                         pa.table({"prompt_id": pa.array(ids, pa.string()),
                                   "tokens": pa.array(toks, pa.list_(pa.int64()))}))
        t0 = time.perf_counter()

        def finished(c: int, rows: pa.Table, facts: dict[str, Any]) -> None:
            at = rows.schema.get_field_index("index")  # counted from the chunk's first prompt on the actor
            work.finished(c, rows.set_column(at, "index", pc.add(rows.column("index"), pa.scalar(c, pa.int64()))))
            work.new_tokens += facts["tokens"]

        args = {"config": self.config, "engine": engine, "stops": stops, "longest": longest, "context": context}
        self.run(GenerateActor, args, chunks, finished)
        work.seconds = time.perf_counter() - t0

    def score_table(self, table: pa.Table, config, shard: dict[str, Any] | None, inputs=None, row_offset: int = 0,
                    store=None, t0: float | None = None):
        """`score.score_table` on the cluster: (the scored table with provenance, its summary). Chunks are saved in
        `store` (without one, the output's score chunk store, emptied once the table is scored)."""
        from sera_cli import lineage, provenance
        from sera_cli.chunk_store import ChunkStore, chunk_key, with_rows
        from sera_cli.score import ScoreSummary, score_table

        if store is None:
            with ChunkStore(config.output, "score", config.resume) as own:
                scored = self.score_table(table, config, shard, inputs, row_offset, own, t0)
                own.finish()
                return scored
        t0 = t0 or time.perf_counter()
        if table.num_rows == 0:
            return score_table(table, config, inputs, row_offset, shard, store)
        size, n = config.chunk_rows, table.num_rows
        bare = table.replace_schema_metadata(None)  # a chunk's key is its rows, not who made them
        payloads = [_dumps(bare.slice(s, size)) for s in range(0, n, size)]
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
        self.run(ScoreActor, {"config": config}, todo, finished)
        parts = [done[c] for c in range(len(payloads))]
        provs = [provenance.read(p) or {} for p in parts]
        for c, p in enumerate(provs):
            if (p.get("logps"), p.get("models")) != (provs[0].get("logps"), provs[0].get("models")):
                raise SeraError(f"{config.output}: chunks 0 and {c} were scored with other models or log-prob "
                                "identities (nodes with other devices or dtypes?); pass --dtype and --device, and "
                                "rerun without --resume")
        out = pa.concat_tables([p.replace_schema_metadata(None) for p in parts])
        truncated = int(pc.sum(out.column("truncated")).as_py() or 0)
        prov = provenance.record(  # as score_table records it, and the cluster
            "score", {k: v for k, v in config.as_dict().items() if k != "progress"},
            logps=provs[0].get("logps"), models=provs[0].get("models"), rows=out.num_rows, truncated=truncated,
            **({"shard": with_rows(shard, out)} if shard else {}),
            parents=lineage.parents(inputs) if inputs else [p for p in [provenance.read(table)] if p],
            ray=self.record())
        per_row = (1 if "response" in table.column_names else 2) * (1 if config.reward == "simpo" else 2)
        summary = ScoreSummary(out.num_rows, truncated, out.num_rows * per_row, totals["computed"], totals["cached"],
                               sum(parts[c].num_rows for c in resumed) * per_row, totals["tokens"],
                               time.perf_counter() - t0, config.output, store.stale)
        return provenance.attach(out, prov), summary


class ScoreActor:
    """A Ray actor: scores chunks with `score.score_table`, its models loaded once (unless --low-memory)."""

    def __init__(self, config):
        self.name = _actor_name()
        self.folder = tempfile.TemporaryDirectory(prefix="sera-ray-")  # its own throwaway chunk store
        self.config = replace(config, output=os.path.join(self.folder.name, "chunk.parquet"), resume=False,
                              shard=None, progress=False, ray_address=None,
                              precision_check=0)  # per chunk it would rescore each chunk's pairs
        self.models: dict[str, Any] | None = None if config.low_memory else {}

    def __call__(self, batch: pa.Table) -> pa.Table:
        return _each_chunk(batch, self.name, self._score)

    def _score(self, table: pa.Table) -> tuple[pa.Table, dict[str, Any]]:
        from sera_cli.score import score_table

        out, s = score_table(table, self.config, models=self.models)
        return out, {"computed": s.computed, "cached": s.cached, "tokens": s.tokens}


class GenerateActor:
    """A Ray actor: generates chunks with the generation stage's engine, opened once. A failure to open it is
    reported with the first chunk it was given."""

    def __init__(self, config, engine: str, stops: list[int], longest: int, context: int | None):
        self.name, self.config, self.stops, self.failed = _actor_name(), config, stops, None
        try:
            from sera_cli.generation.run import open_engine
            from sera_cli.models import load_tokenizer, resolve

            ref = resolve(config.policy)
            self.tok = load_tokenizer(ref, config.trust_remote_code)
            # the engine reads the prompts only for their longest length (vLLM's max_model_len)
            self.engine = open_engine(config, ref, self.tok, engine, stops, [[0] * longest], context)
        except Exception as err:
            self.failed = err

    def __call__(self, batch: pa.Table) -> pa.Table:
        return _each_chunk(batch, self.name, self._generate)

    def _generate(self, table: pa.Table) -> tuple[pa.Table, dict[str, Any]]:
        from sera_cli.generation.run import chunk_samples

        if self.failed is not None:
            raise self.failed
        rows, new_tokens = chunk_samples(self.engine, self.config, table.column("prompt_id").to_pylist(),
                                         table.column("tokens").to_pylist(), self.stops, self.tok)
        return rows, {"tokens": new_tokens}


def _each_chunk(batch: pa.Table, actor: str, compute) -> pa.Table:
    """An actor's work on a batch of chunks: `compute(rows) -> (rows, facts)` each; a failure names the chunk."""
    chunks, rows, facts = [], [], []
    for c, what, data in zip(batch.column("chunk").to_pylist(), batch.column("what").to_pylist(),
                             batch.column("rows").to_pylist(), strict=True):
        try:
            out, fact = compute(_loads(data))
        except Exception as err:
            raise ChunkFailed(f"{what} failed on Ray actor {actor}: {described(err)}") from None
        chunks.append(c)
        rows.append(_dumps(out))
        facts.append(json.dumps({**fact, "actor": actor}))
    return pa.table({"chunk": pa.array(chunks, pa.int64()), "rows": pa.array(rows, pa.large_binary()),
                     "facts": pa.array(facts, pa.string())})


def _score_identity(config) -> dict[str, Any]:
    """What a scored chunk depends on besides its rows: the job's settings (`merge.RUN_ONLY` left out), the models'
    fingerprints and the content of --prev."""
    from sera_cli.hashing import file_digest
    from sera_cli.io import STDIO
    from sera_cli.merge import RUN_ONLY
    from sera_cli.models import resolve

    models = {role: resolve(spec).fingerprint for role, spec in (("policy", config.policy), ("ref", config.ref))
              if spec}
    prev = file_digest(config.prev) if config.prev and config.prev != STDIO else None
    return {"stage": "score", "settings": {k: v for k, v in config.as_dict().items() if k not in RUN_ONLY},
            "models": models, "prev": prev}


def _join(where: str):
    """The `ray` module, joined to the cluster at `where` (LOCAL: this machine's) unless this process already is."""
    try:
        import ray
        import ray.data  # noqa: F401  (ray without its data extra lacks pandas)
    except ImportError:
        raise ConfigError(f"--ray needs Ray Data, which is not installed: {INSTALL_HINT}") from None
    if not ray.is_initialized():
        debug = os.environ.get("SERA_DEBUG") == "1"
        try:
            ray.init(address=None if where == LOCAL else where, log_to_driver=debug,
                     logging_level=logging.INFO if debug else logging.WARNING)
        except Exception as err:
            raise ConfigError(f"--ray-address {where}: cannot join the Ray cluster: {described(err)} (start one with "
                              "'ray start --head', or use --ray for this machine)") from None
    if os.environ.get("SERA_DEBUG") != "1":  # a failure is our one line, not Ray Data's traceback
        logging.getLogger("ray.data").setLevel(logging.CRITICAL)
    return ray


def _failure(err: BaseException) -> str:
    """The one line of a failure that came back from the cluster: the first sera error inside Ray's wrappers."""
    from ray.exceptions import RayError

    todo, seen = [err], set()
    while todo:
        e = todo.pop(0)
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, SeraError) and not isinstance(e, RayError):
            return str(e)
        todo += [getattr(e, "cause", None), e.__cause__, e.__context__]
    found = re.search(r"ChunkFailed: (.+)", str(err))  # older Ray Data keeps only the text of the actor's error
    return found.group(1).strip() if found else f"the Ray job failed: {described(err)}"


def _actor_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _dumps(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def _loads(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(data).read_all()
