"""`sera merge`: the shards of real `sera score --shard i/n` runs on tiny models, checked and joined in order."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from sera_cli.commands.app import app
from sera_cli.data import lineage, provenance

runner = CliRunner()


def sera(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_policy, tiny_ref):
    """One unsharded run and its 2- and 3-shard versions (3 chunks of 2 rows), plus a shard of another job."""
    from conftest import standard_table

    folder = tmp_path_factory.mktemp("merge")
    pairs = folder / "pairs.parquet"
    pq.write_table(standard_table(), pairs)
    common = [pairs, "--policy", tiny_policy, "--ref", tiny_ref, "--chunk-rows", "2", "-q"]
    out = {"full": folder / "full.parquet", "folder": folder}
    assert sera("score", *common, "-o", out["full"]).exit_code == 0
    for n in (2, 3):
        for i in range(n):
            path = out[f"{i}/{n}"] = folder / f"s{i}of{n}.parquet"
            r = sera("score", *common, "--shard", f"{i}/{n}", "-o", path)
            assert r.exit_code == 0, r.stderr
    out["beta"] = folder / "beta.parquet"
    assert sera("score", *common, "--beta", "0.2", "--shard", "1/2", "-o", out["beta"]).exit_code == 0
    return out


@pytest.mark.parametrize("n", [2, 3])
def test_merged_shards_equal_the_unsharded_run(tmp_path, runs, n):
    out = tmp_path / "merged.parquet"
    shards = [runs[f"{i}/{n}"] for i in reversed(range(n))]  # any order on the command line
    r = sera("merge", *shards, "-o", out)
    assert r.exit_code == 0, r.stderr
    assert r.stderr == f"merged {n} shards of a 'score' job: 6 rows -> {out}\n"
    merged, full = pq.read_table(out), pq.read_table(runs["full"])
    assert merged.to_pydict() == full.to_pydict()  # row for row, every column
    prov, full_prov = provenance.read(merged), provenance.read(full)
    assert prov["stage"] == "merge" and prov["rows"] == 6
    assert [p["file"] for p in prov["parents"]] == [str(runs[f"{i}/{n}"]) for i in range(n)]
    assert [p["shard"]["index"] for p in prov["parents"]] == list(range(n))
    assert all(p["file_digest"] for p in prov["parents"])
    assert prov["logps"] == full_prov["logps"] and prov["models"] == full_prov["models"]
    assert prov["job"]["stage"] == "score" and prov["job"]["config"]["shard"] is None
    assert lineage.ref_sources(prov, "m") == [("m", full_prov["logps"]["ref"])]  # train reuses it as one file
    assert {k: v for k, v in prov["job"]["config"].items() if k not in ("output", "shard")} == \
        {k: v for k, v in full_prov["config"].items() if k not in ("output", "shard")}


def _fails(*args) -> str:
    r = sera("merge", *args)
    assert r.exit_code == 1 and r.stdout == "" and r.stderr.count("\n") == 1, r.stderr
    return r.stderr


def test_a_missing_shard_is_named(tmp_path, runs):
    a, c = runs["0/3"], runs["2/3"]
    assert _fails(a, c, "-o", tmp_path / "m.parquet") == \
        f"error: {a}, {c}: shard 1/3 is missing (give all 3 shards of the job)\n"
    assert not (tmp_path / "m.parquet").exists()


def test_a_repeated_shard_is_refused(tmp_path, runs):
    again = tmp_path / "again.parquet"
    shutil.copy(runs["0/2"], again)
    assert _fails(runs["0/2"], runs["1/2"], again, "-o", tmp_path / "m.parquet") == \
        f"error: {again}: is shard 0/2 again (also {runs['0/2']}) (give each shard once)\n"


HINT = "(merge only the outputs of one 'sera score --shard i/n' or 'sera generate --shard i/n' job)"


def test_shards_of_different_jobs_name_the_setting(tmp_path, runs):
    assert _fails(runs["0/2"], runs["beta"], "-o", tmp_path / "m.parquet") == \
        f"error: {runs['beta']}: is a shard of another job than {runs['0/2']}: --beta 0.1 there, 0.2 here {HINT}\n"
    assert _fails(runs["0/2"], runs["1/3"], "-o", tmp_path / "m.parquet") == \
        f"error: {runs['1/3']}: is a shard of another job than {runs['0/2']}: shard count 2 there, 3 here {HINT}\n"


def test_a_file_that_is_not_a_shard(tmp_path, runs):
    assert _fails(runs["0/2"], runs["full"], "-o", tmp_path / "m.parquet") == \
        f"error: {runs['full']}: is not a shard: its provenance records no --shard i/n {HINT}\n"


def test_shards_of_other_input_content(tmp_path, runs, tiny_policy, tiny_ref):
    from conftest import standard_table

    other = tmp_path / "other.parquet"
    pq.write_table(standard_table().slice(0, 5), other)
    shard = tmp_path / "o1.parquet"
    r = sera("score", other, "--policy", tiny_policy, "--ref", tiny_ref, "--chunk-rows", "2", "--shard", "1/2",
             "-q", "-o", shard)
    assert r.exit_code == 0, r.stderr
    assert _fails(runs["0/2"], shard, "-o", tmp_path / "m.parquet") == \
        f"error: {shard}: is a shard of another job than {runs['0/2']}: input rows 6 there, 5 here {HINT}\n"


def test_a_shard_edited_after_scoring(tmp_path, runs):
    cut = tmp_path / "cut.parquet"
    t = pq.read_table(runs["1/2"])
    pq.write_table(t.slice(0, 1).replace_schema_metadata(t.schema.metadata), cut)
    assert _fails(runs["0/2"], cut, "-o", tmp_path / "m.parquet") == \
        f"error: {cut}: has 1 rows where its provenance records 4 (was it changed after it was written? rerun that shard)\n"


def test_merge_never_imports_torch(tmp_path, runs):
    out = tmp_path / "m.parquet"
    script = textwrap.dedent("""
        import json, sys
        for name in ("torch", "transformers", "vllm", "peft", "trl"):
            sys.modules[name] = None
        from typer.testing import CliRunner
        from sera_cli.commands.app import app
        r = CliRunner().invoke(app, ["merge", *sys.argv[1:]])
        print(json.dumps({"code": r.exit_code, "stderr": r.stderr}))
    """)
    done = subprocess.run([sys.executable, "-c", script, str(runs["0/2"]), str(runs["1/2"]), "-o", str(out)],
                          capture_output=True, text=True, check=True)
    assert json.loads(done.stdout.splitlines()[-1]) == {"code": 0, "stderr": f"merged 2 shards of a 'score' job: "
                                                                             f"6 rows -> {out}\n"}


def test_generate_shards_merge_to_the_unsharded_run(tmp_path, runs, tiny_policy):
    pairs = runs["folder"] / "pairs.parquet"
    common = [pairs, "--policy", tiny_policy, "--n", "2", "--max-new-tokens", "3", "--chunk-prompts", "2",
              "--top-p", "1", "--seed", "7", "-q"]
    full, parts = tmp_path / "full.parquet", [tmp_path / f"g{i}.parquet" for i in range(2)]
    assert sera("generate", *common, "-o", full).exit_code == 0
    for i, part in enumerate(parts):
        r = sera("generate", *common, "--shard", f"{i}/2", "-o", part)
        assert r.exit_code == 0, r.stderr
    out = tmp_path / "merged.parquet"
    r = sera("merge", *parts, "-o", out)
    assert r.exit_code == 0, r.stderr
    assert r.stderr == f"merged 2 shards of a 'generate' job: 12 rows -> {out}\n"
    assert pq.read_table(out).replace_schema_metadata(None).equals(pq.read_table(full).replace_schema_metadata(None))
    prov = provenance.read(pq.read_table(out))
    assert prov["job"]["stage"] == "generate" and prov["job"]["sampling"]["n"] == 2
    assert [p["shard"]["index"] for p in prov["parents"]] == [0, 1]
