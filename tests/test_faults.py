"""Fault injection, generated from the `sera` app itself: every command, every float, path or file parameter, every
fault of its class.

Nothing here lists options. The cases are built by walking the Typer app (`sera_cli.commands.app.app`): each parameter is
classed by its declared type and metavar (float; input file or folder; output file or folder; model), and each
class has its faults:

- float: nan, inf, -inf;
- input path: missing, a directory where a file is expected, unreadable, and a name with glob characters whose
  literal file is corrupt while the pattern would match a valid one (so reading the pattern instead of the
  literal name would succeed, and the case fails);
- output path: a directory in the way, an unwritable folder, a parent that is a file, the same file as an input
  by another spelling, and an `OSError` injected into the write (the rename of the temporary fails, ENOSPC);
- model: a missing folder.

Each case runs one command from a tiny valid baseline invocation (`BASELINE`, one per command) with only the
faulty parameter changed, in a forked process (as `tests/test_bad_input.py` runs its cases), and asserts: exit
code 1 or 2, exactly one stderr line, no traceback, inputs byte-identical, nothing at the output path. A new
option is covered without editing this file; a new command needs its baseline (a test says so).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests import test_bad_input
from tests.test_bad_input import ROOT_CAN_DROP, Zygote, _env, _pairs, _snapshot

models = test_bad_input.models  # the session fixture of tiny models (and broken copies) the bad-input cases use

FAST = {"max_length": "64", "max_prompt_length": "32"}

# A tiny valid invocation of each command: {parameter name: value, or list of values for a multi-value one}.
# `{policy}`/`{ref}` are the tiny models; the files are those `workspace` makes.
BASELINE: dict[str, dict[str, object]] = {
    "convert": {"inputs": ["pairs.jsonl"], "output": "out.parquet"},
    "score": {"inputs": ["pairs.parquet"], "policy": "{policy}", "ref": "{ref}", "output": "out.parquet",
              "quiet": True, **FAST},
    "merge": {"shards": ["sh0.parquet", "sh1.parquet", "sh2.parquet"], "output": "out.parquet"},
    "select": {"inputs": ["scored.parquet"], "top": "0.5", "output": "out.parquet"},
    "mix": {"offline": "scored.parquet", "generated": "gen.parquet", "n": "6", "output": "out.parquet"},
    "generate": {"inputs": ["pairs.parquet"], "policy": "{policy}", "n": "2", "max_new_tokens": "2",
                 "chunk_prompts": "6", "output": "out.parquet", "quiet": True, **FAST},
    "train": {"inputs": ["scored.parquet"], "policy": "{policy}", "ref": "{ref}", "max_steps": "1",
              "batch_size": "2", "micro_batch": "2", "dtype": "float32", "output": "out-model", "quiet": True,
              **FAST},
    "run": {"data": ["pairs.parquet"], "policy": "{policy}", "iterations": "1", "n": "2", "max_new_tokens": "2",
            "gen_prompts": "2", "batch_size": "2", "micro_batch": "2", "workdir": "out-wd", "report": False,
            **FAST},
    "demo": {"workdir": "out-wd"},
    "report": {"workdirs": ["wd"], "output_dir": "out-report"},
    "inspect": {"inputs": ["scored.parquet"], "plot": "out.png"},
    "sql": {"query": "SELECT count(*) AS n FROM scored", "inputs": ["scored.parquet"], "output": "out.parquet"},
    "eval": {"policy": ["{policy}"], "baseline": "{ref}", "prompts": "q.jsonl", "judge": "{policy}",
             "max_new_tokens": "2", "judge_max_tokens": "2", "bootstrap": "10", "quiet": True,
             "output_dir": "out-eval"},
    "export": {"target": "trl", "inputs": ["scored.parquet"], "output": "out.parquet"},
}
# Commands whose baseline does real work for minutes on a CPU: their parameters get every fault that fails
# before work starts, but not the injected write (which needs the whole run to reach its write).
SLOW = {"run", "demo"}

OUTPUT_NAMES = {"output", "output_dir", "plot", "workdir", "logging_dir"}
FOLDER_OUTPUTS = {("train", "output"), ("eval", "output_dir"), ("run", "workdir"), ("demo", "workdir"),
                  ("report", "output_dir"), ("train", "logging_dir"), ("run", "logging_dir")}
PATH_METAVARS = {"FILE", "DIR", "FILE|DIR", "PATH"}
# inputs (`sera_cli.data.tables.INPUT_FIELDS`) that name a model: a Hub id or a folder, so only "missing" is a fault
MODEL_NAMES = {"policy", "policies", "ref", "baseline", "judge", "judge_reward", "judge_reward_ref", "judge_rm",
               "prev_policy", "prev_ref"}


# ---------------------------------------------------------------------------------------- the generated table

def _bare(param) -> type | None:
    """The Python type a parameter parses to (float for `float | None`, str for `list[str]`)."""
    from typing import get_args, get_origin

    ann = param.type_descriptor.annotation
    while get_origin(ann) is not None:
        args = [a for a in get_args(ann) if a is not type(None)]
        if not args:
            return None
        ann = args[0]
    if hasattr(ann, "__metadata__"):  # Annotated[float, ...]
        ann = ann.__origin__
    return ann if isinstance(ann, type) else None


def kind(command: str, param) -> str | None:
    """float, input, output, folder-output, model or None (not a float, path or file parameter)."""
    from sera_cli.data.tables import INPUT_FIELDS

    bare = _bare(param)
    if bare is float:
        return "float"
    if bare is not str:
        return None
    metavar = getattr(param, "metavar", None) or ""
    if param.name in OUTPUT_NAMES:
        return "folder-output" if (command, param.name) in FOLDER_OUTPUTS else "output"
    if param.name == "cache":  # read and written, made when missing: a folder output's faults
        return "folder-output"
    if metavar == "MODEL" or param.name in MODEL_NAMES:
        return "model"
    if metavar in PATH_METAVARS or param.name in INPUT_FIELDS or param.name in ("config", "config_file",
                                                                               "workdirs"):
        return "input"
    return None


FAULTS = {
    "float": ("nan", "inf", "-inf"),
    "input": ("missing", "directory", "unreadable", "glob-literal"),
    "output": ("directory", "unwritable", "parent-is-file", "same-as-input", "write-fails"),
    "folder-output": ("is-a-file", "unwritable", "parent-is-file", "same-as-input", "write-fails"),
    "model": ("missing",),
}


@dataclass(frozen=True)
class Case:
    command: str
    param: str
    kind: str
    fault: str

    @property
    def id(self) -> str:
        return f"{self.command}-{self.param}-{self.fault}"


def generated_cases() -> list[Case]:
    import typer

    from sera_cli.commands.app import app

    group = typer.main.get_command(app)
    cases = []
    for name, command in sorted(group.commands.items()):
        for param in command.params:
            k = kind(name, param)
            for fault in FAULTS.get(k, ()):
                if fault == "write-fails" and name in SLOW:
                    continue
                cases.append(Case(name, param.name, k, fault))
    return cases


CASES = generated_cases()


def test_every_command_has_a_baseline():
    import typer

    from sera_cli.commands.app import app

    missing = sorted(set(typer.main.get_command(app).commands) - set(BASELINE))
    assert not missing, f"give these commands a tiny valid invocation in BASELINE: {missing}"


def test_the_table_is_generated_and_counted(capsys):
    kinds = {c.kind for c in CASES}
    assert {"float", "input", "output", "folder-output", "model"} <= kinds
    with capsys.disabled():
        by = {k: sum(c.kind == k for c in CASES) for k in sorted(kinds)}
        print(f"\nfault injection: {len(CASES)} (command, option, fault) cases over "
              f"{len({(c.command, c.param) for c in CASES})} options of {len({c.command for c in CASES})} "
              f"commands: {by}")


# ---------------------------------------------------------------------------------------------- the workspace

@pytest.fixture(scope="session")
def workspace(tmp_path_factory, models) -> Path:
    """The files every baseline reads, made once: pairs, scored pairs (real `score` output), generated pairs,
    three shards, questions, and a finished `sera run` workdir for `report`."""
    from sera_cli.stages.score.api import score
    from sera_cli.stages.score.config import ScoreConfig

    root = tmp_path_factory.mktemp("faults-workspace")
    pq.write_table(_pairs(), root / "pairs.parquet")
    rows = _pairs().to_pylist()
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = dict(policy=models["policy"], ref=models["ref"], max_length=64, max_prompt_length=32, progress=False)
    score(ScoreConfig(inputs=(str(root / "pairs.parquet"),), output=str(root / "scored.parquet"), **common))
    for i in range(3):
        score(ScoreConfig(inputs=(str(root / "pairs.parquet"),), output=str(root / f"sh{i}.parquet"), chunk_rows=2,
                          shard=(i, 3), **common))
    scored = pq.read_table(root / "scored.parquet")
    gen = scored.drop_columns([c for c in ("irm",) if c in scored.column_names]).append_column(
        "irm", pa.array([1.0, 0.5, 0.2, 0.9, 0.3, 0.4]))
    pq.write_table(gen.replace_schema_metadata(scored.schema.metadata), root / "gen.parquet")
    (root / "q.jsonl").write_text('{"prompt": "Say hi."}\n{"prompt": "Name a colour."}\n')
    from typer.testing import CliRunner

    from sera_cli.commands.app import app

    values = {k: v.format(**models) if isinstance(v, str) else v for k, v in BASELINE["run"].items()}
    values["workdir"] = str(root / "wd")
    values["data"] = [str(root / "pairs.parquet")]
    done = CliRunner().invoke(app, _argv("run", values))  # a finished run's workdir, for `report`
    assert done.exit_code == 0, done.output
    return root


# ------------------------------------------------------------------------------------------------ the runner

@pytest.fixture(scope="session")
def fault_zygote(models, tmp_path_factory):
    z = Zygote(models["policy"], tmp_path_factory.mktemp("faults-zygote-cache"))
    yield z
    z.close()


def _argv(command: str, values: dict[str, object]) -> list[str]:
    """The command line of `values` ({parameter: value}), in the command's own parameter order."""
    import typer

    from sera_cli.commands.app import app

    cmd = typer.main.get_command(app).commands[command]
    argv = [command]
    for p in cmd.params:
        if p.name not in values:
            continue
        v = values[p.name]
        if p.param_type_name == "argument":
            argv.extend(v if isinstance(v, list) else [v])
        elif v is True or v is False:
            flag = p.opts[0] if v else (p.secondary_opts or [None])[0]
            argv.extend([flag] if flag else [])
        else:
            for one in v if isinstance(v, list) else [v]:
                argv.extend([p.opts[0], str(one)])
    return argv


def _first_input(values: dict[str, object], work: Path) -> str:
    """The first input file of a baseline (a file inside it, for an input folder such as a workdir)."""
    for key in ("inputs", "shards", "data", "offline", "prompts", "workdirs"):
        if key in values:
            v = values[key]
            first = v[0] if isinstance(v, list) else v
            if (work / first).is_dir():
                first = str(next(p for p in sorted((work / first).rglob("*")) if p.is_file()).relative_to(work))
            return first
    return "pairs.parquet"


def _apply(case: Case, values: dict[str, object], work: Path) -> tuple[dict[str, object], int]:
    """The baseline with the case's fault in its parameter (making the files the fault needs); the errno to
    inject into writes (0: none)."""
    values = dict(values)
    many = lambda v: [v] if isinstance(values.get(case.param), list) or case.param in (  # noqa: E731
        "inputs", "shards", "data", "workdirs") else v
    f = case.fault
    if case.kind == "float":
        values[case.param] = f
    elif case.kind == "model":
        values[case.param] = many("no-such-model-folder/")
    elif case.kind == "input":
        if f == "missing":
            values[case.param] = many("no-such-file.parquet")
        elif f == "directory":
            (work / "a-folder").mkdir()
            values[case.param] = many("a-folder")
        elif f == "unreadable":
            original = values.get(case.param)
            src = work / (original[0] if isinstance(original, list) else str(original)) if original else None
            target = work / "locked.parquet"
            if src is not None and src.is_file():
                shutil.copy(src, target)
            else:
                target.write_text("x = 1\n")
            target.chmod(0)
            values[case.param] = many(target.name)
        elif f == "glob-literal":
            original = values.get(case.param)
            src = work / (original[0] if isinstance(original, list) else str(original)) if original else None
            suffix = src.suffix if src is not None and src.suffix else ".parquet"
            if src is not None and src.is_file():
                shutil.copy(src, work / f"in1{suffix}")  # what the pattern would match: valid
            (work / f"in[1]{suffix}").write_bytes(b"\xff\x00 corrupt: not the file the pattern matches")
            values[case.param] = many(f"in[1]{suffix}")
    else:  # an output
        name = str(values.get(case.param) or ("out.parquet" if case.kind == "output" else f"out-{case.param}"))
        values[case.param] = name
        if f == "directory":
            (work / name).mkdir()
            (work / name / "keep").write_text("x")
        elif f == "is-a-file":
            (work / name).write_text("not a folder")
        elif f == "unwritable":
            (work / "ro").mkdir()
            (work / "ro").chmod(0o555)
            values[case.param] = f"ro/{name}"
        elif f == "parent-is-file":
            (work / "plain.txt").write_text("x")
            values[case.param] = f"plain.txt/{name}"
        elif f == "same-as-input":
            first = _first_input(values, work)
            (work / "sub").mkdir()
            values[case.param] = f"sub/../{first}"  # an input file, spelt another way
        elif f == "write-fails":
            return values, errno.ENOSPC
    return values, 0


def _output_path(case: Case, values: dict[str, object]) -> str | None:
    return str(values[case.param]) if case.kind in ("output", "folder-output") else None


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_fault(case: Case, request, tmp_path, workspace, fault_zygote, models):
    if case.fault == "unreadable" and os.geteuid() == 0 and not ROOT_CAN_DROP:
        pytest.skip("running as root without the capability to drop CAP_DAC_OVERRIDE")
    work, cache = tmp_path / "work", tmp_path / "cache"
    shutil.copytree(workspace, work)
    cache.mkdir()
    baseline = {k: [x.format(**models) for x in v] if isinstance(v, list) else
                v.format(**models) if isinstance(v, str) else v for k, v in BASELINE[case.command].items()}
    values, inject = _apply(case, baseline, work)
    out = _output_path(case, values)
    before = _snapshot(work)
    watched = [Path(models["policy"]), Path(models["ref"])]
    models_before = [_snapshot(d) for d in watched]
    try:
        code, stdout, stderr_bytes = fault_zygote.run(_argv(case.command, values), work, _env(cache), inject=inject)
    finally:
        for p in (work / "ro", work / "locked.parquet"):
            if p.exists():
                p.chmod(0o755)
    stderr = stderr_bytes.decode(errors="replace")
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert code in (1, 2), f"exit code {code}: {stderr[-2000:]}"
    assert "Traceback" not in stderr, stderr[-3000:]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{stderr[-3000:]}"
    assert lines[0].startswith("error: "), lines[0]
    after = _snapshot(work)
    changed = sorted(k for k in before if after.get(k) != before[k])
    assert not changed, f"inputs changed or removed: {changed}"
    if out is not None and case.fault not in ("directory", "is-a-file", "same-as-input"):
        # a cache keeps what finished, by design (each entry written whole; a rerun resumes from it): `--cache`,
        # and eval's output folder, whose answer cache (answers/) and judgment cache (*.sqlite) stay while its
        # results (the other files at its top) must not appear; any other output leaves nothing at its path
        target = work / out
        if "cache" in case.param:
            pass
        elif case.command == "eval" and target.is_dir():
            results = [p.name for p in target.iterdir() if p.is_file() and p.suffix != ".sqlite"]
            assert not results, f"results left in {out}: {results}"
        else:
            assert not target.exists(), f"left at the output path: {out}"
    new = sorted(set(after) - set(before))
    assert not [n for n in new if ".tmp-" in n], f"temporaries left: {new}"
    assert [_snapshot(d) for d in watched] == models_before, "a model folder changed"
