"""Stage records: what each stage of a run read, with which settings, and what it wrote, kept in `run.json`.

A stage is skipped when its output exists, its record's input hashes and settings hash equal the current ones,
and the output still has the hash it had when the stage finished. Every stage writes its output atomically
(temporary file or folder, then rename), and the record is saved right after, so a crash loses at most the
stage in flight. `run.json` also keeps a log of what each invocation ran and skipped.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sera_cli.data.errors import InputError
from sera_cli.data.hashing import digest, file_digest
from sera_cli.data.locking import pid_lock
from sera_cli.data.tables import atomic_path

LEDGER = "run.json"


_MEMO: dict[tuple, str] = {}


def content_hash(path: str | Path) -> str:
    """Hash of an artifact: a Parquet file's bytes, or a model folder's fingerprint (weights, config).

    Remembered per process by the files' names, sizes and modification times, so a model's weights are read
    once per run, not once per stage that uses it.
    """
    p = Path(path).resolve()
    files = sorted(p.iterdir()) if p.is_dir() else [p]
    key = (str(p), tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()))
    if key not in _MEMO:
        if p.is_dir():
            from sera_cli.backends.models import resolve

            _MEMO[key] = resolve(str(p)).fingerprint
        else:
            _MEMO[key] = file_digest(p)
    return _MEMO[key]


def input_hash(spec: str | Path) -> str:
    """Hash of a stage input: an artifact in the workdir, an input file, or a model name such as smollm2-135m."""
    p = Path(spec)
    if p.exists():
        return content_hash(p)
    from sera_cli.data.hub_data import is_dataset_name

    if is_dataset_name(str(spec)):
        return dataset_hash(str(spec))
    from sera_cli.backends.models import resolve

    return resolve(str(spec)).fingerprint


def dataset_hash(spec: str) -> str:
    """Hash of the rows of a Hub dataset split (`org/name:split`), read from the `datasets` cache once per
    process, so a new revision of the dataset reruns the stages that read it."""
    if ("dataset", spec) not in _MEMO:
        import pyarrow as pa
        import xxhash

        from sera_cli.data.hub_data import read_dataset

        table = read_dataset(spec)
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        _MEMO[("dataset", spec)] = xxhash.xxh3_128_hexdigest(sink.getvalue().to_pybytes())
    return _MEMO[("dataset", spec)]


@dataclass(frozen=True)
class Stage:
    """One step of the schedule. `run()` must write `output` atomically and may return a JSON-able summary."""

    key: str                                  # e.g. "iter-2/score"
    output: Path
    inputs: dict[str, str]                    # role -> path or model name
    settings: dict[str, Any]
    run: Callable[[], Any] = field(compare=False)
    title: str = ""                           # what the stage does, for the console


def read_ledger(path: Path) -> dict[str, Any]:
    """A workdir's run.json, checked: a file that is not the JSON a run writes is a one-line error."""
    hint = "it was damaged; move it away and rerun 'sera run' with the same settings to rebuild it"
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(str(path), f"cannot be read: {getattr(err, 'strerror', None) or err}") from None
    except json.JSONDecodeError as err:
        raise InputError(str(path), f"is not valid JSON ({err.msg} at line {err.lineno})", hint=hint) from None
    if not (isinstance(data, dict) and isinstance(data.get("stages"), dict) and isinstance(data.get("log"), list)):
        raise InputError(str(path), "is not a 'sera run' record (no 'stages' and 'log')", hint=hint)
    return data


@dataclass
class Ledger:
    """`WORKDIR/run.json`: the run's config, one record per finished stage, and a log of actions."""

    workdir: Path
    data: dict[str, Any]
    invocation: int

    @classmethod
    def open(cls, workdir: str | Path, config: dict[str, Any]) -> Ledger:
        wd = Path(workdir)
        path = wd / LEDGER
        data = read_ledger(path) if path.exists() else {"stages": {}, "log": []}
        invocation = 1 + max((e["invocation"] for e in data["log"]), default=0)
        data["config"] = config
        return cls(wd, data, invocation)

    def save(self) -> None:
        with atomic_path(self.workdir / LEDGER) as tmp:
            tmp.write_text(json.dumps(self.data, indent=2, default=str))

    def _log(self, key: str, action: str, **extra: Any) -> None:
        self.data["log"].append({"invocation": self.invocation, "stage": key, "action": action,
                                 "at": time.strftime("%Y-%m-%dT%H:%M:%S"), **extra})

    def up_to_date(self, stage: Stage, inputs: dict[str, str], settings: str) -> bool:
        rec = self.data["stages"].get(stage.key)
        if rec is None or not stage.output.exists():
            return False
        if rec["inputs"] != inputs or rec["settings"] != settings:
            return False
        return rec["output_hash"] == content_hash(stage.output)

    def execute(self, stage: Stage, on_start: Callable[[Stage, bool], None] | None = None) -> tuple[str, Any]:
        """Run `stage` unless it is up to date; returns ("ran" | "skipped", summary).

        `on_start(stage, resumable)` is called before it runs; `resumable` is true when an earlier invocation
        started this stage with the same inputs and settings and did not finish it, so its partial work (score
        and generate keep finished chunks beside their output) may be reused; otherwise that work is stale.
        """
        inputs = {role: input_hash(spec) for role, spec in stage.inputs.items()}
        settings = digest(stage.settings)
        if self.up_to_date(stage, inputs, settings):
            self._log(stage.key, "skipped")
            self.save()
            return "skipped", self.data["stages"][stage.key].get("summary")
        started = self.data.setdefault("started", {})
        resumable = started.get(stage.key) == {"inputs": inputs, "settings": settings}
        started[stage.key] = {"inputs": inputs, "settings": settings}
        self.save()
        if on_start:
            on_start(stage, resumable)
        t0 = time.perf_counter()
        summary = stage.run()
        seconds = round(time.perf_counter() - t0, 2)
        if not stage.output.exists():
            raise RuntimeError(f"stage {stage.key} finished without writing {stage.output}")
        self.data["stages"][stage.key] = {
            "output": os.path.relpath(stage.output, self.workdir), "inputs": inputs, "input_specs": stage.inputs,
            "settings": settings, "settings_detail": stage.settings, "output_hash": content_hash(stage.output),
            "seconds": seconds, "summary": summary, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        started.pop(stage.key, None)
        self._log(stage.key, "ran", seconds=seconds)
        self.save()
        return "ran", summary

    def actions(self, invocation: int | None = None) -> dict[str, str]:
        """stage key -> "ran"/"skipped" for one invocation (the current one by default)."""
        n = self.invocation if invocation is None else invocation
        return {e["stage"]: e["action"] for e in self.data["log"] if e["invocation"] == n}


def workdir_lock(workdir: Path):
    """One run at a time per workdir: `WORKDIR/.lock` holds the pid; a lock whose process is gone is taken over."""
    return pid_lock(workdir / ".lock", lambda pid: f"{workdir}: another 'sera run' (pid {pid}) is using this "
                    "workdir; wait for it or give another --workdir")
