"""Hugging Face `datasets` outputs as inputs: a `save_to_disk` folder and its `.arrow` files, read by every
command that reads pairs (and `sera convert`), without importing `datasets`."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from sera_cli.commands.app import app
from sera_cli.data.tables import read_parquet

datasets = pytest.importorskip("datasets")
runner = CliRunner()
ROWS = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}", "irm": float(i)} for i in range(7)]


@pytest.fixture
def saved(tmp_path):
    folder = tmp_path / "ds"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(folder), num_shards=2)
    return folder


def test_save_to_disk_folder_and_arrow_shards_read_as_the_rows(saved):
    assert read_parquet(str(saved)).to_pylist() == ROWS
    shards = sorted(saved.glob("*.arrow"))
    assert len(shards) == 2
    assert sum((read_parquet(str(s)).to_pylist() for s in shards), []) == ROWS


def test_commands_read_a_folder_like_the_parquet_file(saved, tmp_path):
    r = runner.invoke(app, ["select", str(saved), "--top", "0.5", "-o", str(tmp_path / "sel.parquet")])
    assert r.exit_code == 0, r.output
    assert [row["prompt"] for row in pq.read_table(tmp_path / "sel.parquet").to_pylist()] == ["q4", "q5", "q6"]
    r = runner.invoke(app, ["convert", str(saved), "-o", str(tmp_path / "pairs.parquet")])
    assert r.exit_code == 0, r.output
    assert pq.read_table(tmp_path / "pairs.parquet").num_rows == 7


def test_dataset_dict_folder_names_its_splits(tmp_path):
    folder = tmp_path / "dd"
    ds = datasets.Dataset.from_list(ROWS)
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(folder))
    r = runner.invoke(app, ["select", str(folder), "--top", "0.5", "-o", str(tmp_path / "o.parquet")])
    assert r.exit_code != 0 and len(r.stderr.splitlines()) == 1
    assert "is a DatasetDict with splits train, test" in r.stderr and str(folder / "train") in r.stderr
    r = runner.invoke(app, ["select", str(folder / "train"), "--top", "0.5", "-o", str(tmp_path / "o.parquet")])
    assert r.exit_code == 0, r.output
