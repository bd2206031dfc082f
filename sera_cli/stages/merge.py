"""Joining the shards of one `--shard i/n` job (`score` or `generate`) into the file an unsharded run writes.

A shard's provenance records its place in the job (`shard`: index, count, the rows [start, stop) of the whole
input it covers, and the whole input's size and row-id digest). Merging checks that every file is such a shard,
that all come from one job (the same stage, settings, models, log-prob identities and input content), and that
shards 0..n-1 are each there exactly once; then it concatenates them in shard order and writes the result
atomically. Its provenance records the job's settings and every shard as a parent.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from sera_cli.data.errors import InputError, first_line
from sera_cli.data.hashing import digest
from trainers.config import Settings

# Settings that say how or where a shard ran, not what it computed; models are compared by fingerprint and the
# input by content, so their paths may differ between machines.
RUN_ONLY = frozenset({"inputs", "output", "shard", "resume", "progress", "cache", "device", "batch_tokens",
                      "low_memory", "batch_size", "cache_tokens", "tensor_parallel_size",
                      "gpu_memory_utilization", "enforce_eager", "policy", "ref", "prev", "extra", "ray_address",
                      "ray_actors"})
_HINT = "merge only the outputs of one 'sera score --shard i/n' or 'sera generate --shard i/n' job"


@dataclass(frozen=True, kw_only=True)
class MergeConfig(Settings):
    """The settings of one `sera merge`: the shards of one `--shard i/n` job into one file."""

    shards: tuple[str, ...]
    output: str



@dataclass(frozen=True)
class MergeSummary:
    stage: str
    shards: int
    rows: int
    output: str

    def line(self) -> str:
        return f"merged {self.shards} shards of a '{self.stage}' job: {self.rows:,} rows -> {self.output}"


def job_settings(prov: dict[str, Any]) -> dict[str, Any]:
    """What makes shards parts of one job, as named settings: stage, settings, model fingerprints, log-prob
    identities, shard count and input content; an in-memory parent (generate --score) is part of the job."""
    shard = prov.get("shard") or {}
    out: dict[str, Any] = {"stage": prov.get("stage")}
    out.update({f"--{k.replace('_', '-')}": v for k, v in (prov.get("config") or {}).items() if k not in RUN_ONLY})
    out.update({f"{role} model fingerprint": (m or {}).get("fingerprint")
                for role, m in (prov.get("models") or {}).items()})
    out.update({f"{role} log-prob identity": i for role, i in (prov.get("logps") or {}).items()})
    out.update({"shard count": shard.get("count"), "input rows": shard.get("input_rows"),
                "input content": shard.get("input_ids"), "--prev content": shard.get("prev")})
    for parent in prov.get("parents") or []:
        if "file" not in parent:
            out.update({f"{parent.get('stage')} {k}": v for k, v in job_settings(parent).items()
                        if not k.startswith(("shard", "input"))})
    return out


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_same_job(provs: dict[str, dict[str, Any]]) -> None:
    """Raise naming the first setting in which a shard differs from the first one."""
    (first, base), *rest = ((path, job_settings(p)) for path, p in provs.items())
    for path, settings in rest:
        for key in dict.fromkeys([*base, *settings]):
            if base.get(key) != settings.get(key):
                raise InputError(path, f"is a shard of another job than {first}: {key} {_short(base.get(key))} "
                                       f"there, {_short(settings.get(key))} here", hint=_HINT)


def shard_order(provs: dict[str, dict[str, Any]]) -> list[str]:
    """The files in shard order; raise on a repeated or missing shard."""
    count = next(iter(provs.values()))["shard"]["count"]
    seen: dict[int, str] = {}
    for path, prov in provs.items():
        index = prov["shard"]["index"]
        if index in seen:
            raise InputError(path, f"is shard {index}/{count} again (also {seen[index]})", hint="give each shard once")
        seen[index] = path
    missing = [f"{i}/{count}" for i in range(count) if i not in seen]
    if missing:
        what = f"shard {missing[0]} is" if len(missing) == 1 else f"shards {', '.join(missing)} are"
        raise InputError(", ".join(provs), f"{what} missing", hint=f"give all {count} shards of the job")
    return [seen[i] for i in range(count)]


def check_coverage(order: list[str], provs: dict[str, dict[str, Any]]) -> None:
    """The shards' ranges, in order, must tile the whole input: [0, a), [a, b), ..., [z, input rows)."""
    end = 0
    for path in order:
        shard = provs[path]["shard"]
        if shard["start"] != end:
            raise InputError(path, f"covers input rows [{shard['start']}, {shard['stop']}) but the shards before it "
                                   f"end at row {end}", hint=_HINT)
        end = shard["stop"]
    if end != provs[order[-1]]["shard"]["input_rows"]:
        raise InputError(order[-1], f"ends at input row {end} of {provs[order[-1]]['shard']['input_rows']}", hint=_HINT)


def _check_row_order(path: str, table: pa.Table, shard: dict[str, Any]) -> None:
    """A shard's rows are the ones it was written with, in their order: its `id` column against the digest its
    provenance records (`chunk_store.with_rows`). A reordered shard would merge into a file whose rows are not in
    the input's order, unlike an unsharded run's. Shards written before the digest was recorded are not checked."""
    if "rows" not in shard or "id" not in table.column_names:
        return
    if digest(table.column("id").to_pylist()) != shard["rows"]:
        raise InputError(path, f"rows are not those of shard {shard['index']}/{shard['count']} in their order "
                               "(reordered, filtered or edited since it was written?)", hint="rerun that shard")


def _recorded_rows(prov: dict[str, Any]) -> int | None:
    """The rows the provenance says the file holds (`rows` of score, `responses` of generate)."""
    return prov.get("rows", prov.get("responses"))


def merge(config: MergeConfig) -> MergeSummary:
    """Check the shards (see the module docstring), concatenate them in order, write with provenance."""
    from sera_cli.data import provenance
    from sera_cli.data.tables import STDIO, check_writable, expand, write_parquet

    paths = expand(list(config.shards))
    if STDIO in paths:
        raise InputError("<stdin>", "sera merge reads shard files, not standard input", hint="give the file names")
    check_writable(config.output, paths)
    table, prov = merged(paths, config.as_dict())
    write_parquet(provenance.attach(table, prov), config.output)
    return MergeSummary(prov["job"]["stage"], len(prov["parents"]), table.num_rows, config.output)


def merged(paths: list[str], settings: dict[str, Any] | None = None) -> tuple[pa.Table, dict[str, Any]]:
    """The shards' rows in shard order and the merged file's provenance, after every check; `settings` is what
    the provenance records as the merge's own config."""
    from sera_cli.data import lineage, provenance
    from sera_cli.data.tables import read_parquet

    parents: dict[str, dict[str, Any]] = {}
    for path in paths:
        found = lineage.of_file(path)
        if found is None:
            raise InputError(path, "no such file")
        if not isinstance(found.get("shard"), dict):
            raise InputError(path, "is not a shard: its provenance records no --shard i/n", hint=_HINT)
        if path in parents:
            raise InputError(path, "is given twice", hint="give each shard once")
        parents[path] = found
    check_same_job(parents)
    order = shard_order(parents)
    check_coverage(order, parents)
    tables = []
    for path in order:
        table = read_parquet(path)
        if (want := _recorded_rows(parents[path])) is not None and table.num_rows != want:
            raise InputError(path, f"has {table.num_rows:,} rows where its provenance records {want:,}",
                             hint="was it changed after it was written? rerun that shard")
        _check_row_order(path, table, parents[path]["shard"])
        tables.append(table.replace_schema_metadata(None))
    try:
        table = pa.concat_tables(tables)
    except pa.ArrowException as err:
        raise InputError(order[-1], f"columns differ from {order[0]}: {first_line(err)}") from None
    first = parents[order[0]]
    job = {k: v for k, v in first.items() if k in ("stage", "config", "models", "logps", "engine", "sampling")}
    job["config"] = {**job.get("config", {}), "shard": None}
    prov = provenance.record("merge", settings or {"shards": paths}, job=job, logps=first.get("logps"),
                             models=first.get("models"), rows=table.num_rows, parents=[parents[p] for p in order])
    return table, prov


# ------------------------------------------------------------------ the parts of a launch (`parallel.launcher`)


def finished_part(part: Path, config, kind: str) -> bool:
    """With --resume: a part an earlier launch finished for the same shard, settings, models and inputs."""
    from sera_cli.backends.models import resolve
    from sera_cli.data.hashing import file_digest
    from sera_cli.data.lineage import of_file

    prov = of_file(str(part))
    if not prov or prov.get("stage") != kind:
        return False
    shard = prov.get("shard") or {}
    if (shard.get("index"), shard.get("count")) != tuple(config.shard):
        return False
    now = json.loads(json.dumps({k: v for k, v in config.as_dict().items()
                                 if k not in RUN_ONLY and k != "progress"}))
    if {k: v for k, v in (prov.get("config") or {}).items() if k not in RUN_ONLY} != now:
        return False
    digests = [p.get("file_digest") for p in prov.get("parents") or []]
    if digests != [file_digest(p) if os.path.isfile(p) else None for p in config.inputs]:
        return False
    for role, model in (prov.get("models") or {}).items():
        spec = getattr(config, role, None)
        if model and (spec is None or resolve(spec).fingerprint != model.get("fingerprint")):
            return False
    return True


def merge_parts(parts: list[str], output: str, processes: int) -> int:
    """`sera merge` of the parts into `output`, recording the number of processes; returns the rows."""
    from sera_cli.data import provenance
    from sera_cli.data.tables import write_parquet

    table, prov = merged(parts)
    prov["processes"] = processes
    write_parquet(provenance.attach(table, prov), output)
    return table.num_rows
