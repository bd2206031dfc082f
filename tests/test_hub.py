"""Models by Hugging Face Hub id: found in the local Hub cache offline, scored like the same local folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

SERA = [sys.executable, "-m", "sera_cli"]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(home: Path, repo: str, folder: str) -> None:
    """The Hub cache layout `hf download` leaves: refs/main names a snapshot folder holding the files."""
    entry = home / "hub" / ("models--" + repo.replace("/", "--"))
    snap = entry / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    for f in Path(folder).iterdir():
        shutil.copy2(f, snap / f.name)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(COMMIT)


def offline_env(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return {**env, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}


def test_hub_id_loads_from_the_cache_offline_with_the_local_folders_numbers(tmp_path, pairs_file, tiny_policy,
                                                                             tiny_ref):
    home = tmp_path / "hf"
    hub_cache(home, "acme/tiny-policy", tiny_policy)
    env = offline_env(home)
    by_id, by_path = tmp_path / "id.parquet", tmp_path / "path.parquet"
    for policy, out in (("acme/tiny-policy", by_id), (tiny_policy, by_path)):
        proc = subprocess.run(SERA + ["score", pairs_file, "--policy", policy, "--ref", tiny_ref, "-o", str(out),
                                      "-q"], env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    a, b = pq.read_table(by_id), pq.read_table(by_path)
    assert a.column("irm").to_pylist() == b.column("irm").to_pylist()
    assert a.column("logp_policy_chosen").to_pylist() == b.column("logp_policy_chosen").to_pylist()


def test_hub_id_with_revision_and_fingerprint(tmp_path, tiny_policy):
    from sera_cli.backends.hub import is_hub_id, split_revision

    assert is_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct") and is_hub_id("acme/m@v1.0")
    assert not is_hub_id("./acme/m") and not is_hub_id("/abs/path") and not is_hub_id("smollm2-135m")
    assert split_revision("acme/m@v1.0") == ("acme/m", "v1.0") and split_revision("acme/m") == ("acme/m", None)
    home = tmp_path / "hf"
    hub_cache(home, "acme/tiny", tiny_policy)
    code = ("from sera_cli.backends.models import resolve, fingerprint_folder; import sys;"
            f"r = resolve('acme/tiny@{COMMIT}'); print(r.fingerprint == fingerprint_folder(sys.argv[1]), r.kind)")
    proc = subprocess.run([sys.executable, "-c", code, tiny_policy], env=offline_env(home), capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "hf"]


def test_missing_hub_model_offline_is_one_line(tmp_path, pairs_file):
    proc = subprocess.run(SERA + ["score", pairs_file, "--policy", "acme/not-there", "--ref", "acme/not-there", "-o", str(tmp_path / "o.parquet")],
                          env=offline_env(tmp_path / "hf"), capture_output=True, text=True)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "acme/not-there" in lines[0] and "HF_HUB_OFFLINE" in lines[0], proc.stderr
    assert not (tmp_path / "o.parquet").exists()


def test_revision_flag_is_the_at_suffix(tmp_path, pairs_file, tiny_policy, tiny_ref):
    import pytest

    from sera_cli.backends.hub import with_revision
    from sera_cli.data.errors import ConfigError

    assert with_revision("acme/m", "v1") == "acme/m@v1" == with_revision("acme/m@v1", "v1")
    assert with_revision("acme/m@v1", None) == "acme/m@v1" and with_revision(None, None) is None
    with pytest.raises(ConfigError, match=r"^--policy acme/m@v1 names revision v1 and --revision names v2: give one$"):
        with_revision("acme/m@v1", "v2")
    with pytest.raises(ConfigError, match=r"^--revision v1: --policy smollm2-135m is not a Hub id \(org/name\)"):
        with_revision("smollm2-135m", "v1")
    home = tmp_path / "hf"
    hub_cache(home, "acme/tiny-policy", tiny_policy)
    env, out = offline_env(home), tmp_path / "o.parquet"
    proc = subprocess.run(SERA + ["score", pairs_file, "--policy", "acme/tiny-policy", "--revision", COMMIT, "--ref",
                                  tiny_ref, "-o", str(out), "-q"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    prov = json.loads(pq.read_schema(out).metadata[b"sera"])
    assert prov["models"]["policy"]["spec"] == f"acme/tiny-policy@{COMMIT}"
    for args, line in (
            (["--policy", "acme/tiny-policy@main", "--revision", COMMIT, "--ref", tiny_ref],
             f"error: --policy acme/tiny-policy@main names revision main and --revision names {COMMIT}: give one"),
            (["--policy", "acme/tiny-policy", "--ref-revision", "v1"],
             "error: --ref-revision v1 needs --ref (a Hub id, org/name)")):
        proc = subprocess.run(SERA + ["score", pairs_file, *args, "-o", str(tmp_path / "bad.parquet")], env=env,
                              capture_output=True, text=True)
        assert proc.returncode == 1 and proc.stderr == line + "\n", proc.stderr


def test_every_revision_flag_refuses_a_second_revision_before_any_work(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from sera_cli.commands.app import app

    monkeypatch.chdir(tmp_path)
    line = "error: {flag} acme/m@v1 names revision v1 and {rev} names v2: give one\n"
    for args, flag, rev in (
            (["train", "x.parquet", "-o", "out", "--policy", "acme/m@v1", "--revision", "v2"], "--policy", "--revision"),
            (["train", "x.parquet", "-o", "out", "--ref", "acme/m@v1", "--ref-revision", "v2"], "--ref", "--ref-revision"),
            (["generate", "x.parquet", "--policy", "acme/m@v1", "--revision", "v2"], "--policy", "--revision"),
            (["run", "x.parquet", "--policy", "acme/m@v1", "--revision", "v2"], "--policy", "--revision"),
            (["eval", "--policy", "p", "--prompts", "q.jsonl", "-o", "e", "--judge", "acme/m@v1", "--judge-revision",
              "v2"], "--judge", "--judge-revision")):
        r = CliRunner().invoke(app, args)
        assert (r.exit_code, r.stderr) == (1, line.format(flag=flag, rev=rev)), args
    assert not any(tmp_path.iterdir())
