"""A stage's chunks on a Ray cluster (`--ray`, `--ray-address ADDR`, `--ray-actors N`): one output, many actors.

The stage (in the driver, the process the command runs in) reads and checks its input with its own checks, so
bad input is the same one-line error, and cuts the work into its own chunks. `RayCluster.run` hands the chunks to
a pool of the stage's actor class through Ray Data (one GPU each where the cluster has GPUs, `gpus_per_actor` for
tensor-parallel generation; else one CPU each) and gives each result back to the stage as it comes, so the stage
saves it in its chunk store (`--resume` computes only the chunks that never came back) and writes the output
itself, with its provenance plus `RayCluster.record()`. This module knows no stage: the score and generate stages
bring their actors (`stages/score/on_ray.py`, `stages/generate/on_ray.py`).

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
from collections.abc import Callable
from typing import Any

import pyarrow as pa

from sera_cli.data.errors import ConfigError, SeraError, described

LOCAL = "local"  # --ray: this machine's Ray (the one `ray start` made, else a new one)
INSTALL_HINT = "pip install 'sera[ray]'"


class ChunkFailed(SeraError):
    """A chunk that failed on an actor: the one line names the chunk, its rows and the actor."""


def address(ray: bool, ray_address: str | None) -> str | None:
    """The cluster `--ray` / `--ray-address` name (None: no Ray)."""
    return ray_address or (LOCAL if ray else None)


class RayCluster:
    """The cluster a stage runs its chunks on; joined on first use, so bad input fails before Ray starts."""

    def __init__(self, config, gpus_per_actor: int):
        self.config, self.gpus_per_actor = config, gpus_per_actor
        self._ray = None
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

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` run once on a node with an actor's resources (its GPUs, its packages); a failure is one line."""
        _, resources = self._pool()
        try:
            return self.ray.get(self.ray.remote(**resources)(fn).remote(*args))
        except Exception as err:
            raise SeraError(_failure(err)) from None

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
        blocks = [pa.table({"chunk": pa.array([c], pa.int64()), "what": [what], "rows": pa.array([dumps(t)], pa.large_binary())})
                  for c, (what, t) in sorted(chunks.items())]  # one block per chunk: each goes to any free actor
        ds = data.from_arrow(blocks).map_batches(actor, fn_constructor_kwargs=args, batch_size=1,
                                                 batch_format="pyarrow",
                                                 compute=data.ActorPoolStrategy(size=self.used), **resources)
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                for c, rows, facts in zip(batch["chunk"].to_pylist(), batch["rows"].to_pylist(),
                                          batch["facts"].to_pylist(), strict=True):
                    on_chunk(c, loads(rows), json.loads(facts))
        except Exception as err:
            from ray.exceptions import RayError

            if isinstance(err, SeraError) and not isinstance(err, RayError):  # the driver's own (saving a chunk)
                raise
            raise SeraError(_failure(err)) from None  # Ray wraps the actor's exception in its own

def each_chunk(batch: pa.Table, actor: str, compute) -> pa.Table:
    """An actor's work on a batch of chunks: `compute(rows) -> (rows, facts)` each; a failure names the chunk."""
    chunks, rows, facts = [], [], []
    for c, what, data in zip(batch.column("chunk").to_pylist(), batch.column("what").to_pylist(),
                             batch.column("rows").to_pylist(), strict=True):
        try:
            out, fact = compute(loads(data))
        except Exception as err:
            raise ChunkFailed(f"{what} failed on Ray actor {actor}: {described(err)}") from None
        chunks.append(c)
        rows.append(dumps(out))
        facts.append(json.dumps({**fact, "actor": actor}))
    return pa.table({"chunk": pa.array(chunks, pa.int64()), "rows": pa.array(rows, pa.large_binary()),
                     "facts": pa.array(facts, pa.string())})


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


def actor_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def dumps(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def loads(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(data).read_all()
