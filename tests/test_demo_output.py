"""`sera demo` as a first experience: the report on stdout, stage lines on stderr, and a last line naming the
workdir and three commands that work on its files. The loop itself is replaced by one that leaves a hand-made
workdir (tests/test_report.py's), so this takes a second instead of the demo's minutes."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from sera_cli.commands.app import app
from sera_cli.stages.run import api as loop
from sera_cli.stages.run.api import RunSummary
from tests.test_report import make_run

runner = CliRunner()


@pytest.fixture
def fake_loop(monkeypatch):
    """`run_loop` that announces one stage and leaves a two-iteration workdir, as the demo would."""

    def run(config, on_stage):
        work = make_run(Path(config.workdir), 2)
        scored = work / "iter-2" / "scored.parquet"  # with the text columns a scored file has, for `sera inspect`
        table = pq.read_table(scored)
        n = table.num_rows
        table = table.append_column("prompt", pa.array([f"Question {i}?" for i in range(n)]))
        table = table.append_column("chosen", pa.array([" yes" * (i + 1) for i in range(n)]))
        table = table.append_column("rejected", pa.array([" no"] * n))
        pq.write_table(table, scored)
        return RunSummary(str(config.workdir), ran=("iter-1/train",), skipped=(), seconds=3.0)

    monkeypatch.setattr(loop, "run", run)


def test_demo_prints_the_report_on_stdout_and_ends_with_the_folder_and_next_steps(tmp_path, fake_loop):
    work = tmp_path / "sera-demo"
    r = runner.invoke(app, ["demo", "--workdir", str(work)])
    assert r.exit_code == 0, r.stderr
    out = r.stdout.splitlines()
    assert out[0].startswith("sera report") and any(line.startswith("│ held-out reward accuracy") for line in out)
    assert "50.0%" in r.stdout  # iteration 1's held-out accuracy of make_run: irm > 0 in 2 of 4 rows
    scored = work / "iter-2" / "scored.parquet"
    query = ("SELECT flipped, count(*) AS pairs, round(avg(irm), 3) AS mean_irm FROM scored GROUP BY flipped "
             "ORDER BY flipped")
    assert out[-1] == (f"wrote {work}/; try next: sera report {work}  |  sera inspect {scored} --plot "
                       f"{work / 'irm.png'}  |  sera sql {shlex.quote(query)} {scored}")
    assert "ran 1 stage(s), skipped 0 up to date, in 3 s" in r.stderr and "ran 1 stage" not in r.stdout
    assert (work / "report.md").exists() and (work / "report.png").exists()


def test_the_three_next_commands_work_on_the_workdir(tmp_path, fake_loop):
    work = tmp_path / "sera-demo"
    last = runner.invoke(app, ["demo", "--workdir", str(work)]).stdout.splitlines()[-1]
    commands = last.split("try next: ", 1)[1].split("  |  ")
    assert len(commands) == 3
    results = [runner.invoke(app, shlex.split(c)[1:]) for c in commands]
    assert [x.exit_code for x in results] == [0, 0, 0], [x.stderr for x in results]
    assert (work / "irm.png").stat().st_size > 0
    # make_run's iter-2 scored rows: clean irm 1.0, 0.5, 0.2, 0.0 (mean 0.425), flipped 0.5, -1.0 (mean -0.25)
    rows = runner.invoke(app, shlex.split(commands[2])[1:] + ["--json"]).stdout
    assert json.loads(rows) == [{"flipped": False, "pairs": 4, "mean_irm": 0.425},
                                {"flipped": True, "pairs": 2, "mean_irm": -0.25}]


def test_a_workdir_without_flips_gets_a_query_without_them(tmp_path):
    from sera_cli.commands.run_output import next_commands

    (tmp_path / "iter-1").mkdir()
    pq.write_table(pa.table({"irm": [0.5, -0.5, 1.0]}), tmp_path / "iter-1" / "heldout_scored.parquet")
    sql = next_commands(tmp_path)[2]
    r = runner.invoke(app, shlex.split(sql)[1:] + ["--json"])
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout) == [{"positive": False, "pairs": 1}, {"positive": True, "pairs": 2}]
