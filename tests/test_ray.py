"""`score` and `generate` on a local Ray cluster (2 CPUs, 2 actors, tiny random Llamas): one process's output."""

from __future__ import annotations

import re
import shutil
import sqlite3
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import standard_table
from typer.testing import CliRunner

from sera_cli.commands.app import app
from sera_cli.data import provenance
from sera_cli.stages.generate.config import GenerateConfig
from sera_cli.stages.score.config import ScoreConfig

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")
runner = CliRunner()


@pytest.fixture(scope="module", autouse=True)
def cluster():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # a new one, whatever runs
    yield
    ray.shutdown()


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if "sera-partial" in p.name or ".tmp" in p.name)


def test_ray_score_equals_one_process(tmp_path, pairs_file, tiny_policy, tiny_ref, monkeypatch):
    """3 chunks of 2 rows over 2 actors: the rows, their order, ids and log-probs of one process; both actors
    write their log-probs to the one --cache; --resume takes the chunks a run kept and needs no actor."""
    from sera_cli.data.chunk_store import ChunkStore
    from sera_cli.stages.score.api import score
    from sera_cli.stages.score.on_ray import ray_score

    one = ScoreConfig(inputs=(pairs_file,), output=str(tmp_path / "one.parquet"), policy=tiny_policy, ref=tiny_ref,
                      chunk_rows=2, progress=False)
    score(one)
    on_ray = replace(one, output=str(tmp_path / "ray.parquet"), cache=str(tmp_path / "cache"), ray_address="local",
                     ray_actors=2)
    finish = ChunkStore.finish
    monkeypatch.setattr(ChunkStore, "finish", lambda self: None)  # the chunks stay, as after an interruption
    s = ray_score(on_ray)
    monkeypatch.setattr(ChunkStore, "finish", finish)
    a, b = pq.read_table(one.output), pq.read_table(on_ray.output)
    assert a.column_names == b.column_names and a.num_rows == b.num_rows == 6
    for col in a.column_names:
        if pa.types.is_floating(a.schema.field(col).type):
            np.testing.assert_allclose(b.column(col).to_numpy(), a.column(col).to_numpy(), rtol=0, atol=1e-5)
        else:
            assert b.column(col).equals(a.column(col)), col
    prov = provenance.read(b)
    assert prov["stage"] == "score" and prov["ray"]["actors"] == 2 and prov["ray"]["address"] == "local"
    assert prov["logps"] == provenance.read(a)["logps"] and prov["parents"][0]["file"] == pairs_file
    assert (s.rows, s.computed, s.cached) == (6, 24, 0)
    resumed = ray_score(replace(on_ray, resume=True))
    assert (resumed.resumed, resumed.computed) == (24, 0) and not leftovers(tmp_path)
    assert pq.read_table(on_ray.output).replace_schema_metadata(None).equals(b.replace_schema_metadata(None))
    with sqlite3.connect(tmp_path / "cache" / "logps.sqlite") as db:  # written by both actors at once
        assert db.execute("SELECT count(*) FROM logps").fetchone() == (24,)


def gen_config(inp: str, policy: str, out) -> GenerateConfig:
    return GenerateConfig(inputs=(inp,), output=str(out), policy=policy, engine="hf", n=2, max_new_tokens=6,
                          top_p=1.0, seed=7, chunk_prompts=2, batch_size=8, device="cpu", progress=False)


def test_ray_generate_equals_one_process_and_resumes_its_chunks(tmp_path, pairs_file, tiny_policy, monkeypatch):
    """The same responses, byte for byte, as one process (hf engine, same seed); then a run interrupted in one
    process after its first chunk is finished on Ray with --resume, and again equals the full run."""
    from sera_cli.stages.generate import generation as gen_run
    from sera_cli.stages.generate.api import generate
    from sera_cli.stages.generate.on_ray import ray_generate

    one = gen_config(pairs_file, tiny_policy, tmp_path / "one.parquet")
    generate(one)
    s = ray_generate(replace(one, output=str(tmp_path / "ray.parquet"), ray_address="local", ray_actors=2))
    a, b = pq.read_table(one.output), pq.read_table(tmp_path / "ray.parquet")
    assert b.replace_schema_metadata(None).equals(a.replace_schema_metadata(None)) and a.num_rows == 12
    assert provenance.read(b)["ray"]["actors"] == 2 and s.responses == 12 and s.tokens > 0

    real, calls = gen_run._Work._chunk, []

    def interrupted(self, engine, c, *args):
        calls.append(c)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, engine, c, *args)

    monkeypatch.setattr(gen_run._Work, "_chunk", interrupted)
    target = tmp_path / "resumed.parquet"
    with pytest.raises(KeyboardInterrupt):
        generate(replace(one, output=str(target)))
    s = ray_generate(replace(one, output=str(target), resume=True, ray_address="local"))
    assert s.resumed == 1 and pq.read_table(target).replace_schema_metadata(None).equals(a.replace_schema_metadata(None))
    assert not leftovers(tmp_path)


def test_bad_input_is_the_same_line_with_ray(tmp_path, tiny_policy, tiny_ref):
    rows = standard_table().to_pylist()
    rows[3]["chosen"] = None
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=standard_table().schema), bad)
    args = ["score", str(bad), "--policy", tiny_policy, "--ref", tiny_ref, "-q", "-o", str(tmp_path / "out.parquet")]
    one, on_ray = runner.invoke(app, args), runner.invoke(app, [*args, "--ray", "--ray-actors", "2"])
    assert one.exit_code == on_ray.exit_code == 1
    assert on_ray.stderr == one.stderr and one.stderr.startswith(f"error: {bad}, row 3, column 'chosen'")
    assert not (tmp_path / "out.parquet").exists()


def test_a_failing_actor_fails_the_job_with_one_line(tmp_path, pairs_file, tiny_policy, tiny_ref, capfd):
    """Weights that the driver can fingerprint but no actor can load: one line naming the chunk, its rows and the
    actor; no output."""
    broken = tmp_path / "broken"
    shutil.copytree(tiny_policy, broken)
    for f in broken.glob("*.safetensors"):
        f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not safetensors at all")
    out = tmp_path / "out.parquet"
    r = runner.invoke(app, ["score", pairs_file, "--policy", str(broken), "--ref", tiny_ref, "--chunk-rows", "3",
                            "--ray-address", "local", "--ray-actors", "1", "-q", "-o", str(out)])
    assert r.exit_code == 1
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.fullmatch(r"error: chunk [01] \(rows (0-2|3-5)\) failed on Ray actor \S+:\d+: .+",
                                             errors[0]), r.stderr
    assert str(broken) in errors[0] and "Traceback" not in capfd.readouterr().err  # nor Ray Data's trace
    assert not out.exists() and not list(tmp_path.glob("*.tmp*"))


def test_ray_missing_is_one_line(tmp_path, pairs_file, tiny_policy, monkeypatch):
    import sys

    from sera_cli.data.errors import ConfigError
    from sera_cli.parallel.ray_pool import _join

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ConfigError, match=re.escape("--ray needs Ray Data, which is not installed: "
                                                    "pip install 'sera[ray]'")):
        _join("auto")
