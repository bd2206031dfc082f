"""Hub datasets named as inputs (`org/name`, `--split`, `--subset`), read through `datasets` from a Hugging Face
cache offline; a name that is neither a file nor a cached dataset is one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sera_cli.data.hub_data import is_dataset_name, parse, with_split

pytest.importorskip("datasets")
SERA = [sys.executable, "-m", "sera_cli"]
ROWS = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}", "irm": float(i)} for i in range(6)]


BUILD = """
import json, shutil, sys
from pathlib import Path
import datasets
from datasets.packaged_modules.parquet.parquet import Parquet

files, repo, subsets = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3:]
builder = Parquet(dataset_name=repo.split("/")[1], config_name="default", data_files=files, hash="0123abcd")
builder.download_and_prepare()
root = Path(datasets.config.HF_DATASETS_CACHE) / repo.replace("/", "___")
for subset in subsets:  # where datasets.load_dataset(repo, subset) leaves a dataset it read from the Hub
    target = root / subset / "0.0.0" / "0123abcd"
    shutil.copytree(builder.cache_dir, target)
    info = json.loads((target / "dataset_info.json").read_text())
    (target / "dataset_info.json").write_text(json.dumps({**info, "config_name": subset}))
"""


def cached_dataset(home: Path, repo: str, splits: dict[str, list[dict]], subsets=("default",)) -> None:
    """A Hub dataset in the `datasets` cache under HF_HOME, as a first online `load_dataset(repo)` leaves it."""
    files = {}
    for split, rows in splits.items():
        files[split] = str(home.parent / f"{split}.parquet")
        pq.write_table(pa.Table.from_pylist(rows), files[split])
    done = subprocess.run([sys.executable, "-c", BUILD, json.dumps(files), repo, *subsets],
                          env={**offline_env(home)}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def offline_env(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return {**env, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def sera(env: dict, *args) -> subprocess.CompletedProcess:
    return subprocess.run(SERA + [str(a) for a in args], env=env, capture_output=True, text=True, timeout=300)


def test_names_and_specs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_dataset_name("trl-lib/ultrafeedback_binarized") and is_dataset_name("acme/pairs:test")
    assert not is_dataset_name("data/pairs.parquet") and not is_dataset_name("pairs") and not is_dataset_name("-")
    (tmp_path / "acme" / "pairs").mkdir(parents=True)
    assert not is_dataset_name("acme/pairs")  # a local folder of that name wins
    assert with_split(["x/y", "a.parquet"], "test") == ("x/y:test", "a.parquet")
    assert with_split(["x/y"], None, "en") == ("x/y:en:train",) and with_split(["x/y"]) == ("x/y",)
    assert parse("x/y") == ("x/y", None, "train") and parse("x/y:en:test") == ("x/y", "en", "test")
    assert parse("x/y:train[:10]") == ("x/y", None, "train[:10]")
    assert parse("x/y:en:train[:10]") == ("x/y", "en", "train[:10]")


def test_convert_and_select_read_a_cached_hub_dataset_offline(tmp_path):
    home = tmp_path / "hf"
    cached_dataset(home, "acme/pairs", {"train": ROWS, "test": ROWS[:2]})
    env, out = offline_env(home), tmp_path / "pairs.parquet"
    r = sera(env, "convert", "acme/pairs", "--split", "test", "-o", out)
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines()[0] == "acme/pairs:test: 2 rows (plain) -> 2 pairs"
    assert pq.read_table(out).column("chosen").to_pylist() == ["good 0", "good 1"]
    r = sera(env, "convert", "acme/pairs", "--split", "train[:3]", "-o", out)  # a slice, as datasets reads it
    assert r.returncode == 0 and pq.read_metadata(out).num_rows == 3, r.stderr
    selected = tmp_path / "sel.parquet"  # a command without --split reads the train split
    r = sera(env, "select", "acme/pairs", "--top", "0.5", "-o", selected)
    assert r.returncode == 0, r.stderr
    assert pq.read_table(selected).column("prompt").to_pylist() == ["q3", "q4", "q5"]
    r = sera(env, "convert", "acme/pairs", "--split", "validation", "-o", out)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "validation" in r.stderr, r.stderr


def test_a_name_neither_file_nor_cached_is_one_line(tmp_path):
    env, out = offline_env(tmp_path / "hf"), tmp_path / "o.parquet"
    r = sera(env, "convert", "acme/not-there", "-o", out)
    assert r.returncode == 1 and not out.exists()
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: acme/not-there: no such file, nor a dataset in the Hugging Face cache (")
    assert "HF_HUB_OFFLINE is set" in lines[0] and "load_dataset('acme/not-there')" in lines[0]
    r = sera(env, "convert", tmp_path / "a.jsonl", "--split", "test", "-o", out)
    assert r.returncode == 1 and r.stderr == ("error: --split applies to Hub dataset inputs (org/name), and none of "
                                              "the inputs is one\n")


def test_subset_names_the_config(tmp_path):
    home = tmp_path / "hf"
    cached_dataset(home, "acme/multi", {"train": ROWS}, subsets=("en", "fr"))
    env, out = offline_env(home), tmp_path / "o.parquet"
    r = sera(env, "convert", "acme/multi", "--subset", "fr", "-o", out)
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines()[0] == "acme/multi:fr:train: 6 rows (plain) -> 6 pairs"
    r = sera(env, "convert", "acme/multi", "-o", out)  # two subsets in the cache and none named
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "en, fr" in r.stderr, r.stderr


def test_run_attaches_split_and_subset_to_hub_names(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from sera_cli.commands.app import app
    from sera_cli.data.errors import ConfigError
    from sera_cli.stages.run import api as loop
    from sera_cli.stages.run.config import build

    assert build(None, {"data": ("acme/pairs", "a.parquet"), "split": "train"}).data == ("acme/pairs:train",
                                                                                          "a.parquet")
    toml = tmp_path / "sera.toml"
    toml.write_text('data = ["acme/pairs"]\nsubset = "fr"\nsplit = "test[:100]"\n')
    assert build(toml, {}).data == ("acme/pairs:fr:test[:100]",)
    assert build(toml, {"split": "train"}).data == ("acme/pairs:fr:train",)  # the flag beats the file
    with pytest.raises(ConfigError) as err:
        build(None, {"data": ("a.parquet",), "split": "train", "k1": 2.0})
    assert str(err.value) == ("invalid run settings (2 problems): --split applies to Hub dataset inputs (org/name), "
                              "and none of the inputs is one; k1 must be in (0, 1] (got 2.0)")
    seen = []

    def fake_loop(config, on_stage):  # the config the pipeline receives; no stage runs
        seen.append(config)
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "run", fake_loop)
    r = CliRunner().invoke(app, ["run", "acme/pairs", "--split", "train", "--workdir", str(tmp_path / "w")])
    assert r.exit_code == 130, r.output
    assert seen[0].data == ("acme/pairs:train",) and seen[0].split == "train"


SPLIT_STAGE = """
import sys
from pathlib import Path
from sera_cli.stages.run.config import load
from sera_cli.stages.run.layout import Layout
from sera_cli.stages.run.api import check_start, schedule
from sera_cli.stages.run.ledger import Ledger

config = load(None, {"data": ("acme/pairs",), "split": "test", "heldout": 0.0, "workdir": sys.argv[1]})
check_start(config)
lay = Layout(Path(config.workdir))
lay.root.mkdir(parents=True)
ledger = Ledger.open(lay.root, config.as_dict())
stage = next(schedule(config, lay))
print(stage.key, ledger.execute(stage)[0], ledger.execute(stage)[0])
"""


def test_run_split_stage_reads_a_cached_hub_split(tmp_path):
    home = tmp_path / "hf"
    cached_dataset(home, "acme/pairs", {"train": ROWS, "test": ROWS[:2]})
    done = subprocess.run([sys.executable, "-c", SPLIT_STAGE, str(tmp_path / "w")], env=offline_env(home),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["split/train", "ran", "skipped"]  # the split's rows hash the same again
    assert pq.read_table(tmp_path / "w" / "train.parquet").column("prompt").to_pylist() == ["q0", "q1"]
