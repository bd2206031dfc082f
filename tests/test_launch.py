"""`score` and `generate` under `accelerate launch` with 2 CPU processes: each rank does its shard, rank 0 merges
them into one output equal to a one-process run; a rank that fails fails the job with one line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import standard_table

from sera_cli.data import provenance
from sera_cli.data.errors import ConfigError
from sera_cli.parallel.launcher import World, world
from sera_cli.stages.generate.api import generate
from sera_cli.stages.generate.config import GenerateConfig
from sera_cli.stages.merge import finished_part, merge_parts
from sera_cli.stages.score.api import score
from sera_cli.stages.score.config import ScoreConfig

LAUNCHER = shutil.which("accelerate", path=os.path.dirname(sys.executable))
needs_launcher = pytest.mark.skipif(LAUNCHER is None, reason="accelerate's launcher is not installed")


def launch(*args: str, processes: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    return subprocess.run([LAUNCHER, "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines",
                           "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "sera_cli", *args],
                          capture_output=True, text=True, env=env, timeout=600)


def six_pairs(tmp_path: Path, rows: int = 6) -> str:
    table = standard_table()
    table = pa.concat_tables([table] * (-(-rows // table.num_rows))).slice(0, rows)
    prompts = [f"{p} (variant {i})" for i, p in enumerate(table.column("prompt").to_pylist())]
    table = table.set_column(table.column_names.index("prompt"), "prompt", pa.array(prompts))
    path = tmp_path / "pairs.parquet"
    pq.write_table(table, path)
    return str(path)


@needs_launcher
def test_two_processes_score_like_one(tmp_path, tiny_policy, tiny_ref):
    pairs = six_pairs(tmp_path)
    out = tmp_path / "ranked.parquet"
    proc = launch("score", pairs, "--policy", tiny_policy, "--ref", tiny_ref, "--chunk-rows", "2", "--dtype",
                  "float32", "-q", "-o", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("score on 2 processes: 6 rows -> ") == 1, proc.stderr  # one line, from rank 0
    single = score(ScoreConfig(inputs=(pairs,), output=str(tmp_path / "single.parquet"), policy=tiny_policy,
                               ref=tiny_ref,
                               chunk_rows=2, dtype="float32", progress=False))
    assert single.rows == 6
    a, b = pq.read_table(out), pq.read_table(tmp_path / "single.parquet")
    assert a.column_names == b.column_names
    assert a.column("id").to_pylist() == b.column("id").to_pylist()
    for col in ("logp_policy_chosen", "logp_policy_rejected", "logp_ref_chosen", "logp_ref_rejected", "irm"):
        np.testing.assert_allclose(a.column(col).to_numpy(), b.column(col).to_numpy(), atol=1e-5, err_msg=col)
    prov = provenance.read(a)
    assert prov["processes"] == 2 and prov["job"]["stage"] == "score"
    assert [p["shard"]["index"] for p in prov["parents"]] == [0, 1]
    assert not list(tmp_path.glob(".ranked.parquet.*")), "the ranks' parts are removed once merged"


@needs_launcher
def test_two_processes_generate_like_one(tmp_path, tiny_policy):
    prompts = six_pairs(tmp_path, rows=4)
    out = tmp_path / "ranked.parquet"
    common = ["--n", "2", "--max-new-tokens", "6", "--seed", "3", "--chunk-prompts", "1", "--engine", "hf",
              "--dtype", "float32"]
    proc = launch("generate", prompts, "--policy", tiny_policy, *common, "-q", "-o", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("generate on 2 processes: 8 rows -> ") == 1, proc.stderr
    generate(GenerateConfig(inputs=(prompts,), output=str(tmp_path / "single.parquet"), policy=tiny_policy,
                            n=2, max_new_tokens=6,
                            seed=3, chunk_prompts=1, engine="hf", dtype="float32", progress=False))
    a, b = pq.read_table(out), pq.read_table(tmp_path / "single.parquet")
    for col in ("prompt_id", "response"):
        assert a.column(col).to_pylist() == b.column(col).to_pylist(), col
    assert provenance.read(a)["processes"] == 2


@needs_launcher
def test_a_failing_rank_fails_the_job_in_one_line(tmp_path, tiny_policy, tiny_ref):
    """Rows 0-1 are rank 0's, rows 2-5 rank 1's; row 5 is longer than a model of 48 positions holds, so only rank
    1 fails (the context is checked per shard). Rank 0 says so once; nothing is merged; rank 0's part stays."""
    short = Path(tmp_path / "short-context")
    shutil.copytree(tiny_policy, short)
    config = json.loads((short / "config.json").read_text())
    config["max_position_embeddings"] = 48
    (short / "config.json").write_text(json.dumps(config))
    table = pq.read_table(six_pairs(tmp_path))
    prompts = table.column("prompt").to_pylist()
    prompts[5] = "a long prompt " * 40
    table = table.set_column(table.column_names.index("prompt"), "prompt", pa.array(prompts))
    pairs = tmp_path / "long.parquet"
    pq.write_table(table, pairs)
    out = tmp_path / "ranked.parquet"
    proc = launch("score", str(pairs), "--policy", str(short), "--ref", str(short), "--chunk-rows", "2",
                  "--dtype", "float32", "-q", "-o", str(out))
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert errors[0].startswith(f"error: rank 1 of 2 failed, so no output was merged: {pairs}, row 5")
    assert "exceed the context" in errors[0], errors[0]
    assert not out.exists()
    assert [p.name for p in (tmp_path / ".ranked.parquet.ranks.sera-partial").glob("part-*")] == \
        ["part-00000-of-00002.parquet"]


def test_a_finished_part_is_reused_only_for_the_same_work(tmp_path, tiny_policy, tiny_ref):
    pairs = six_pairs(tmp_path)
    part = tmp_path / "part-00000-of-00002.parquet"
    config = ScoreConfig(inputs=(pairs,), output=str(part), policy=tiny_policy, ref=tiny_ref, chunk_rows=2,
                         dtype="float32",
                         shard=(0, 2), progress=False)
    score(config)
    assert finished_part(part, replace(config, resume=True), "score")
    assert not finished_part(part, replace(config, beta=0.2), "score")
    assert not finished_part(part, replace(config, shard=(1, 2)), "score")
    assert not finished_part(part, replace(config, ref=tiny_policy), "score")  # another model
    pq.write_table(pq.read_table(pairs).slice(0, 5), pairs)  # the input changed
    assert not finished_part(part, config, "score")


def test_the_world_comes_from_the_launchers_environment(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert world() == World(0, 1, 0)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert world() == World(3, 4, 1) and not world().main
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ConfigError, match="inconsistent: RANK=4 WORLD_SIZE=4"):
        world()


def test_launched_stages_refuse_stdout_and_shards(tmp_path, monkeypatch, tiny_policy, tiny_ref):
    from sera_cli.parallel.launcher import ranked

    pairs = six_pairs(tmp_path)
    config = ScoreConfig(inputs=(pairs,), output="-", policy=tiny_policy, ref=tiny_ref)
    with pytest.raises(ConfigError, match="2 processes cannot share standard output: give -o FILE"):
        ranked(score, config, "score", World(0, 2, 0), finished=finished_part, merge=merge_parts)
    with pytest.raises(ConfigError, match="--shard 0/2 under a launcher of 2 processes"):
        ranked(score, replace(config, output=str(tmp_path / "o.parquet"), shard=(0, 2)), "score", World(0, 2, 0),
               finished=finished_part, merge=merge_parts)
