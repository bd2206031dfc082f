"""`score` and `generate` under a launcher (`torchrun`, `accelerate launch`): one process per GPU, one output.

A launcher says where a process stands through the environment: `RANK`, `WORLD_SIZE`, `LOCAL_RANK` (torchrun
sets them, and `accelerate launch` runs torchrun for more than one process). With a world of N > 1, rank i runs
the stage on `--shard i/N` (a contiguous run of whole chunks) into its part, `part-0000i-of-0000N.parquet`, in
the output's `ranks` partial folder; the ranks report to each other through the launcher's rendezvous store
(`torch.distributed.rendezvous("env://")`: no process group is made, so an engine that makes its own, such as
vLLM, is not disturbed); once every rank has finished, rank 0 merges the parts with `sera merge`'s checks
into the one output (same rows and order as one process) and records how many processes ran. A rank that
fails makes every rank fail, with one line (printed once, by rank 0) naming the rank; nothing is merged, and
each rank's finished chunks stay for `--resume`, as do finished parts.

On GPUs each rank sees only its own: `CUDA_VISIBLE_DEVICES` is narrowed to the local rank's device (its
`--tensor-parallel-size` devices for vLLM) before CUDA starts.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from sera_cli.data.errors import ConfigError, SeraError, described

C = TypeVar("C")
_POLL_S = 0.5


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def world() -> World:
    """This process's place among the launcher's processes (a world of 1 without a launcher)."""
    env = os.environ
    try:
        size = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local = int(env.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise ConfigError(f"the launcher's environment is not numbers: RANK={env.get('RANK')!r} "
                          f"WORLD_SIZE={env.get('WORLD_SIZE')!r} LOCAL_RANK={env.get('LOCAL_RANK')!r}") from None
    if size < 1 or not 0 <= rank < size:
        raise ConfigError(f"the launcher's environment is inconsistent: RANK={rank} WORLD_SIZE={size}")
    return World(rank, size, local)


class RankFailed(SeraError):
    """Another rank failed: this rank exits non-zero without printing (rank 0 prints the one line)."""

    silent = True


@dataclass(frozen=True)
class RankedSummary:
    """What a job of N processes did, as one line (printed by rank 0; other ranks print nothing)."""

    kind: str
    processes: int
    rows: int
    output: str
    part: Any  # rank 0's own summary
    main: bool
    reused: int = 0

    def line(self) -> str:
        if not self.main:
            return ""
        reused = f"; {self.reused} finished part(s) reused" if self.reused else ""
        own = self.part.line().rsplit(" -> ", 1)[0]
        return (f"{self.kind} on {self.processes} processes: {self.rows:,} rows{reused} -> {self.output} "
                f"(rank 0: {own})")


def narrow_gpus(w: World, per_rank: int = 1) -> None:
    """Let rank `w` see only its own GPU(s): narrow CUDA_VISIBLE_DEVICES before CUDA starts (the device count comes
    from NVML, which does not start it); once CUDA runs in this process, make the rank's GPU the current one."""
    import torch

    if w.size == 1 or os.environ.get("SERA_RANK_GPUS"):
        return
    if torch.cuda.is_initialized():
        torch.cuda.set_device(w.local_rank * per_rank)
        return
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = [d for d in visible.split(",") if d] if visible else [str(i) for i in range(torch.cuda.device_count())]
    if not devices:
        return
    mine = devices[w.local_rank * per_rank:(w.local_rank + 1) * per_rank]
    if len(mine) < per_rank:
        raise ConfigError(f"rank {w.rank} (local rank {w.local_rank}) needs {per_rank} GPU(s) but this machine "
                          f"has {len(devices)}: launch at most {len(devices) // per_rank} processes per machine")
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(mine)
    os.environ["SERA_RANK_GPUS"] = ",".join(mine)


def ranked(stage: Callable[[C], Any], config: C, kind: str, w: World, gpus_per_rank: int = 1, *,
           finished: Callable[[Path, C, str], bool], merge: Callable[[list[str], str, int], int]) -> RankedSummary:
    """Run `stage` on this rank's shard of `config`'s work, wait for every rank, and (rank 0) merge the parts
    into `config.output`. Every rank returns the job's summary; a failure anywhere raises on every rank.

    The stage brings its own part rules: `finished(part, shard_config, kind)` says whether an earlier launch's part
    can be reused (with --resume), `merge(parts, output, processes)` writes the merged output (returns its rows)."""
    from sera_cli.data.chunk_store import partial_dir
    from sera_cli.data.tables import STDIO, check_writable, inputs_of

    if config.shard is not None:
        raise ConfigError(f"--shard {config.shard[0]}/{config.shard[1]} under a launcher of {w.size} processes: the "
                          "processes are the shards already; drop --shard, or run shards without the launcher")
    if config.output == STDIO:
        raise ConfigError(f"{w.size} processes cannot share standard output: give -o FILE (rank 0 merges the "
                          "processes' parts into it)")
    check_writable(config.output, inputs_of(config))
    narrow_gpus(w, gpus_per_rank)
    parts = partial_dir(config.output, "ranks")
    parts.mkdir(parents=True, exist_ok=True)
    names = [parts / f"part-{r:05d}-of-{w.size:05d}.parquet" for r in range(w.size)]
    store, job = _store(kind, config.output)
    mine = replace(config, shard=(w.rank, w.size), output=str(names[w.rank]), progress=config.progress and w.main)
    status: dict[str, Any] = {"ok": True}
    try:
        if config.resume and finished(names[w.rank], mine, kind):
            status["reused"] = True
            summary = None
        else:
            summary = stage(mine)
    except Exception as err:  # a failure of any kind reaches the other ranks, as one line
        status = {"ok": False, "error": described(err)}
    store.set(f"{job}/rank{w.rank}", json.dumps(status))
    statuses = [json.loads(_wait(store, f"{job}/rank{r}")) for r in range(w.size)]
    failed = [(r, s["error"]) for r, s in enumerate(statuses) if not s["ok"]]
    if failed:
        r, error = failed[0]
        more = f" ({len(failed) - 1} other rank(s) failed too)" if len(failed) > 1 else ""
        message = (f"rank {r} of {w.size} failed{more}, so no output was merged: {error} (finished parts and "
                   f"chunks are kept: rerun with --resume)")
        raise ConfigError(message) if w.main else RankFailed(message)
    rows = 0
    if w.main:
        try:
            rows = merge([str(p) for p in names], config.output, w.size)
        except SeraError as err:
            store.set(f"{job}/merged", json.dumps({"ok": False, "error": str(err)}))
            raise
        shutil.rmtree(parts, ignore_errors=True)
        store.set(f"{job}/merged", json.dumps({"ok": True, "rows": rows}))
    else:
        merged = json.loads(_wait(store, f"{job}/merged"))
        if not merged["ok"]:
            raise RankFailed(f"rank 0 could not merge the parts: {merged['error']}")
        rows = merged["rows"]
    if summary is None:  # this rank's part was reused: describe the part file instead
        summary = _PartLine(names[w.rank])
    return RankedSummary(kind, w.size, rows, config.output, summary, w.main,
                         sum(1 for s in statuses if s.get("reused")))


@dataclass(frozen=True)
class _PartLine:
    path: Path

    def line(self) -> str:
        return f"reused the finished part {self.path.name} -> {self.path}"


def _store(kind: str, output: str):
    """The launcher's key-value store, and this job's key prefix (one job per output and launch)."""
    import torch.distributed as dist

    store, _, _ = next(dist.rendezvous("env://"))
    run = os.environ.get("TORCHELASTIC_RUN_ID", "") + os.environ.get("TORCHELASTIC_RESTART_COUNT", "")
    return store, f"sera/{kind}/{run}/{os.path.abspath(output)}"


def _wait(store, key: str) -> str:
    """Block until `key` is set (the ranks' shards take as long as they take; a rank that dies is the
    launcher's to notice: it stops the others)."""
    while not store.check([key]):
        time.sleep(_POLL_S)
    return store.get(key).decode()
