"""No command replaces one of its inputs: an output equal to an input (same path, a symlink or hard link to it, a
glob matching it, or for a folder output an input inside it) is refused in one line before any work, and the
folder is left exactly as it was: the input byte for byte, no output, temp or partial file."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import standard_table
from typer.testing import CliRunner

from sera_cli.commands.app import app

runner = CliRunner()
HINT = "(outputs never replace inputs: choose another output path)"


def sera(*args):
    return runner.invoke(app, [str(a) for a in args])


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (hidden ones too) with the hash of its bytes; folders as 'dir'."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            out[os.path.relpath(os.path.join(root, d), folder)] = "dir"
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, folder)] = hashlib.sha256(Path(p).read_bytes()).hexdigest()
    return out


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A folder with pairs, scored pairs and a model-like folder; the tests run inside it."""
    monkeypatch.chdir(tmp_path)
    pairs = standard_table()
    pq.write_table(pairs, "pairs.parquet")
    scored = pairs.append_column("irm", pa.array([0.5, -1.0, 2.0, 0.0, 1.5, -0.25]))
    pq.write_table(scored, "scored.parquet")
    pq.write_table(scored, "scored.png")  # inspect's --plot must end in .png
    Path("model").mkdir()
    Path("model", "config.json").write_text("{}")
    return tmp_path


def refused(work: Path, args: list, output: str, problem: str, header: str = "") -> None:
    before = snapshot(work)
    r = sera(*args)
    assert r.exit_code == 1, (r.stdout, r.stderr)
    assert r.stderr == f"{header}error: {output}: {problem} {HINT}\n"
    assert snapshot(work) == before


@pytest.mark.parametrize("args, output, problem", [
    (["convert", "pairs.parquet", "-o", "pairs.parquet"], "pairs.parquet", "is the input pairs.parquet"),
    (["select", "scored.parquet", "--top", "0.5", "-o", "scored.parquet"], "scored.parquet",
     "is the input scored.parquet"),
    (["mix", "--offline", "scored.parquet", "--k2", "0", "--n", "6", "-o", "scored.parquet"], "scored.parquet",
     "is the input scored.parquet"),
    (["mix", "--offline", "pairs.parquet", "--generated", "scored.parquet", "--n", "6", "-o", "scored.parquet"],
     "scored.parquet", "is the input scored.parquet"),
    (["score", "pairs.parquet", "--policy", "no-such-model", "--reward", "simpo", "-o", "pairs.parquet"],
     "pairs.parquet",
     "is the input pairs.parquet"),
    (["score", "pairs.parquet", "--policy", "no-such-model", "--reward", "simpo", "--prev", "scored.parquet",
      "-o", "scored.parquet"], "scored.parquet", "is the input scored.parquet"),
    (["generate", "pairs.parquet", "--policy", "no-such-model", "-o", "pairs.parquet"], "pairs.parquet",
     "is the input pairs.parquet"),
    (["sql", "SELECT * FROM scored LIMIT 1", "scored.parquet", "-o", "scored.parquet"], "scored.parquet",
     "is the input scored.parquet"),
    (["inspect", "scored.png", "--plot", "scored.png"], "scored.png", "is the input scored.png"),
    (["select", "scored.parquet", "--top", "0.5", "-o", "./scored.parquet"], "./scored.parquet",
     "is the input scored.parquet"),
    (["select", "s*.parquet", "--top", "0.5", "-o", "scored.parquet"], "scored.parquet",
     "is the input scored.parquet"),
])
def test_an_output_equal_to_an_input_is_refused(work, args, output, problem):
    refused(work, args, output, problem)


def test_links_to_an_input_are_refused(work):
    os.symlink("scored.parquet", "soft.parquet")
    os.link("scored.parquet", "hard.parquet")
    refused(work, ["select", "scored.parquet", "--top", "0.5", "-o", "soft.parquet"], "soft.parquet",
            "is the input scored.parquet")
    refused(work, ["select", "scored.parquet", "--top", "0.5", "-o", "hard.parquet"], "hard.parquet",
            "is the input scored.parquet")


def test_train_refuses_to_replace_its_data_or_its_policy(work):
    Path("out").mkdir()
    pq.write_table(standard_table(), "out/pairs.parquet")
    refused(work, ["train", "pairs.parquet", "--policy", "no-such-model", "-o", "pairs.parquet", "--overwrite"],
            "pairs.parquet", "is the input pairs.parquet")
    refused(work, ["train", "out/pairs.parquet", "--policy", "no-such-model", "-o", "out", "--overwrite"],
            "out", "holds the input out/pairs.parquet")
    refused(work, ["train", "pairs.parquet", "--policy", "model", "-o", "model", "--overwrite"],
            "model", "is the input model")


def test_run_refuses_data_or_policy_inside_its_workdir(work):
    Path("wd").mkdir()
    pq.write_table(standard_table(), "wd/train.parquet")
    # The refusal is the only line: the run's header prints only once its first stage starts.
    refused(work, ["run", "wd/train.parquet", "--workdir", "wd", "--no-report"], "wd",
            "holds the input wd/train.parquet")
    Path("wd/pi0").mkdir()
    refused(work, ["run", "pairs.parquet", "--policy", "wd/pi0", "--workdir", "wd", "--no-report"], "wd",
            "holds the input wd/pi0")


def test_an_output_that_is_not_an_input_is_written(work):
    r = sera("select", "scored.parquet", "--top", "0.5", "-o", "scored-top.parquet")
    assert r.exit_code == 0, r.stderr
    assert pq.read_table("scored-top.parquet").num_rows == 3
