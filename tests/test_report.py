"""`sera report` on hand-made workdirs: every statistic against values worked out by hand, the side-by-side
table, report.md, the figure, and the error for a folder that is not a run."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from sera_cli.commands.app import app
from sera_cli.stages.report import api as report

runner = CliRunner()


def _write(path: Path, columns: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)


def make_run(root: Path, iterations: int, method: str = "sera") -> Path:
    """A workdir as `sera run` leaves it, with small known tables."""
    _write(root / "train.parquet", {"id": [str(i) for i in range(6)]})
    stages = {"iter-1/train": {"seconds": 10.0, "input_specs": {"data": str(root / "train.parquet")}},
              "iter-1/heldout": {"seconds": 2.5}}
    _write(root / "iter-1/heldout_scored.parquet", {
        "irm": [0.5, -0.2, 0.1, -0.4], "ntok_chosen": [5, 3, 4, 2], "ntok_rejected": [2, 2, 2, 2],
        "flipped": [False, False, False, True]})
    (root / "iter-1/model").mkdir(parents=True)
    (root / "iter-1/model/metrics.jsonl").write_text(
        '{"step": 0, "loss": 0.7, "reward_accuracy": 0.25}\n{"step": 1, "loss": 0.5, "reward_accuracy": 0.75}\n')
    if iterations >= 2:
        _write(root / "iter-2/scored.parquet", {"irm": [1.0, 0.5, 0.5, -1.0, 0.2, 0.0],
                                                 "flipped": [False, False, True, True, False, False]})
        _write(root / "iter-2/selected.parquet", {"flipped": [False, False, True, False]})
        _write(root / "iter-2/candidates.parquet", {"response": ["a", "b", "c", "d"]})
        _write(root / "iter-2/pairs.parquet", {"irm": [0.3]})
        _write(root / "iter-2/mixed.parquet", {"irm": [0.0] * 5})
        stages["iter-2/train"] = {"seconds": 7.0, "input_specs": {"data": str(root / "iter-2/mixed.parquet")}}
    config = {"method": method, "policy": "smollm2-135m", "data": [], "iterations": iterations, "loss": "dpo",
              "beta": 0.1, "k1": 0.7, "k2": 0.3, "n": 4, "ensemble_lambda": 0.3}
    (root / "run.json").write_text(json.dumps({"config": config, "stages": stages, "log": []}))
    return root


def test_statistics_by_hand(tmp_path):
    r = report.collect(make_run(tmp_path / "A", 2))
    one, two = r.iterations
    assert (one.train_rows, one.selected, one.generated, one.irm_mean) == (6, None, None, None)
    assert one.train_loss == pytest.approx(0.6) and one.train_accuracy == pytest.approx(0.5)
    assert one.heldout_accuracy == 0.5                      # irm > 0 in rows 0 and 2 of 4
    assert one.heldout_accuracy_true == 0.75                # row 3 is flipped, and its irm < 0 is right
    assert one.heldout_flip_auroc == 1.0                    # the flipped row has the lowest irm
    assert one.length_corr == pytest.approx(1.0)            # irm ranks = length-difference ranks
    assert one.seconds == 12.5
    assert (two.train_rows, two.selected, two.candidates, two.generated) == (5, 4, 4, 1)
    assert two.irm_mean == pytest.approx(0.2) and two.irm_positive == pytest.approx(4 / 6)
    # -irm ranks flipped rows: -0.5 (row 2) and 1.0 (row 3) against -1, -0.5, -0.2, 0 -> (1 + 0.5) + 4 of 8
    assert two.flip_auroc == pytest.approx(5.5 / 8)
    assert two.flips_kept == 0.5                            # 1 of the 2 flipped rows is in selected
    assert sorted(r.irm) == ["clean", "flipped"] and len(r.irm["flipped"]) == 2


def test_side_by_side_markdown_and_figure(tmp_path):
    a, b = make_run(tmp_path / "A", 2), make_run(tmp_path / "B", 1, method="dpo")
    result = runner.invoke(app, ["report", str(a), str(b), "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    md = (tmp_path / "out/report.md").read_text()
    assert "| statistic | A it1 | A it2 | B it1 |" in md
    assert "| held-out reward accuracy | 50.0% | - | 50.0% |" in md
    assert "| flips kept in top k1 | - | 50% | - |" in md
    assert "- B: method dpo, policy smollm2-135m, data embedded demo set" in md
    png = (tmp_path / "out/report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "held-out reward accuracy" in result.stdout and "A it2" in result.stdout  # the report is stdout
    assert "wrote " in result.stderr and "wrote " not in result.stdout


def test_figure_has_chance_line_distinct_series_and_integer_iterations(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from sera_cli.stages.report.plots import report_figure, save

    reports = [report.collect(make_run(tmp_path / "A", 2)), report.collect(make_run(tmp_path / "B", 1, "dpo"))]
    fig = report_figure(reports)
    acc, loss, hist = fig.axes
    chance = [ln for ln in acc.get_lines() if ln.get_label() == "chance (0.5)"]
    assert len(chance) == 1 and list(chance[0].get_ydata()) == [0.5, 0.5] and chance[0].get_linestyle() == "--"
    series = [ln for ln in acc.get_lines() if ln is not chance[0]]
    assert [ln.get_label() for ln in series] == ["A (given labels)", "A (true labels)", "B (given labels)",
                                                 "B (true labels)"]
    assert len({ln.get_marker() for ln in series}) == 4                  # every series its own marker
    assert len({ln.get_color() for ln in series}) == 2                   # a run keeps its colour...
    assert {ln.get_linestyle() for ln in series} == {"-", "--"}          # ...given and true labels differ in style
    assert [t.get_text() for t in acc.get_legend().get_texts()][-1] == "chance (0.5)"
    assert list(acc.get_xticks()) == [1, 2]                              # iterations, never 0.95 or 1.05
    runs = loss.get_lines()
    assert [ln.get_label() for ln in runs] == ["A it1", "B it1"]
    assert runs[0].get_color() != runs[1].get_color() and runs[0].get_linestyle() != runs[1].get_linestyle()
    assert [t.get_text() for t in hist.get_legend().get_texts()] == ["clean (4)", "flipped (2)", "irm = 0"]
    png = tmp_path / "r.png"
    save(fig, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_json_has_every_iteration_for_machines(tmp_path):
    import json

    a = make_run(tmp_path / "A", 2)
    result = runner.invoke(app, ["report", str(a), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert [r["name"] for r in doc["runs"]] == ["A"] and doc["evals"] == {}
    its = doc["runs"][0]["iterations"]
    assert [i["t"] for i in its] == [1, 2] and its[1]["flips_kept"] == 0.5 and its[1]["train_rows"] == 5


def test_single_run_writes_into_its_workdir(tmp_path):
    a = make_run(tmp_path / "A", 1)
    files = report.write([str(a)])
    assert files.markdown == a / "report.md" and files.figure.exists()
    assert "| statistic | iter 1 |" in files.markdown.read_text()


def test_not_a_workdir_is_one_line(tmp_path):
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 1
    assert result.stderr == (f"error: {tmp_path}: has no run.json: not a 'sera run' workdir "
                             "(or the run has not started)\n")
