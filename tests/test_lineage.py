"""Reference log-probs from several files: every file's provenance (and every parent's) is checked by train."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import standard_table
from typer.testing import CliRunner

from sera_cli.commands.app import app
from sera_cli.data import lineage, provenance

runner = CliRunner()
HINT = "(pass --recompute-ref with --ref MODEL to compute them all with one reference)"


def sera(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_policy, tiny_ref):
    """sA: rows 0-2 scored with reference tiny_ref; sA2: rows 3-5, same reference; sB: rows 3-5 with reference
    tiny_policy (another model); raw: rows 3-5 with reference columns but no provenance."""
    folder = tmp_path_factory.mktemp("lineage")
    table = standard_table()
    pq.write_table(table.slice(0, 3), folder / "a.parquet")
    pq.write_table(table.slice(3, 3), folder / "b.parquet")
    out = {}
    for name, rows, ref in (("sA", "a", tiny_ref), ("sA2", "b", tiny_ref), ("sB", "b", tiny_policy)):
        out[name] = folder / f"{name}.parquet"
        r = sera("score", folder / f"{rows}.parquet", "--policy", tiny_policy, "--ref", ref, "-q", "-o", out[name])
        assert r.exit_code == 0, r.stderr
    out["raw"] = folder / "raw.parquet"
    pq.write_table(pq.read_table(out["sA2"]).replace_schema_metadata(None), out["raw"])
    return out


def fingerprint(path) -> str:
    return provenance.read(pq.read_table(path))["logps"]["ref"]["fingerprint"][:12]


def _refused(tmp_path, *args) -> str:
    r = sera("train", *args, "-q", "-o", tmp_path / "out")
    assert r.exit_code == 1 and r.stdout == "" and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "out").exists()
    return r.stderr


def _trains(tmp_path, *args) -> dict:
    r = sera("train", *args, "--max-steps", "1", "--batch-size", "2", "--micro-batch", "2", "-q",
             "-o", tmp_path / "out")
    assert r.exit_code == 0, r.stderr
    return json.loads(Path(tmp_path / "out" / "sera.json").read_text())


def test_two_files_with_two_references_are_refused(tmp_path, files, tiny_policy, tiny_ref):
    a, b = files["sA"], files["sB"]
    line = (f"error: {a}, {b}: their reference log-probs come from different references: "
            f"{a}: fingerprint '{fingerprint(a)}'; {b}: fingerprint '{fingerprint(b)}' {HINT}\n")
    assert fingerprint(a) != fingerprint(b)
    assert _refused(tmp_path, a, b, "--policy", tiny_policy, "--ref", tiny_ref) == line
    assert _refused(tmp_path, a, b, "--policy", tiny_policy) == line  # without --ref: neither is trusted
    assert _refused(tmp_path, b, a, "--policy", tiny_policy, "--ref", tiny_policy).startswith(
        f"error: {b}, {a}: their reference log-probs come from different references: {b}: fingerprint")


def test_recompute_ref_trains_on_the_two_files(tmp_path, files, tiny_policy, tiny_ref):
    prov = _trains(tmp_path, files["sA"], files["sB"], "--policy", tiny_policy, "--ref", tiny_ref, "--recompute-ref")
    assert prov["reference"]["source"] == "computed"
    assert [p["file"] for p in prov["parents"]] == [str(files["sA"]), str(files["sB"])]


def test_same_reference_in_several_files_is_reused(tmp_path, files, tiny_policy, tiny_ref):
    prov = _trains(tmp_path, files["sA"], files["sA2"], "--policy", tiny_policy, "--ref", tiny_ref)
    assert prov["reference"]["source"] == "input"
    assert prov["reference"]["logps"]["fingerprint"][:12] == fingerprint(files["sA"])
    assert [p["stage"] for p in prov["parents"]] == ["score", "score"]


def test_select_of_two_references_is_refused(tmp_path, files, tiny_policy, tiny_ref):
    a, b = files["sA"], files["sB"]
    sel = tmp_path / "sel.parquet"
    assert sera("select", a, b, "--top", "1.0", "-o", sel).exit_code == 0
    prov = provenance.read(pq.read_table(sel))
    assert [p["file"] for p in prov["parents"]] == [str(a), str(b)] and prov["logps"] is None
    assert _refused(tmp_path, sel, "--policy", tiny_policy, "--ref", tiny_ref) == (
        f"error: {sel}: its reference log-probs come from different references: "
        f"{a}: fingerprint '{fingerprint(a)}'; {b}: fingerprint '{fingerprint(b)}' {HINT}\n")


def test_select_of_one_reference_keeps_it(tmp_path, files, tiny_policy, tiny_ref):
    sel = tmp_path / "sel.parquet"
    assert sera("select", files["sA"], files["sA2"], "--top", "1.0", "-o", sel).exit_code == 0
    prov = provenance.read(pq.read_table(sel))
    assert prov["logps"] == provenance.read(pq.read_table(files["sA"]))["logps"]
    assert _trains(tmp_path, sel, "--policy", tiny_policy, "--ref", tiny_ref)["reference"]["source"] == "input"


def test_sql_union_of_two_references_is_refused(tmp_path, files, tiny_policy, tiny_ref):
    a, b = files["sA"], files["sB"]
    merged = tmp_path / "merged.parquet"
    r = sera("sql", "SELECT * FROM sA UNION ALL SELECT * FROM sB", a, b, "-o", merged)
    assert r.exit_code == 0, r.stderr
    assert _refused(tmp_path, merged, "--policy", tiny_policy, "--ref", tiny_ref) == (
        f"error: {merged}: its reference log-probs come from different references: "
        f"{a}: fingerprint '{fingerprint(a)}'; {b}: fingerprint '{fingerprint(b)}' {HINT}\n")


def test_sql_with_a_parent_of_unknown_reference_is_refused(tmp_path, files, tiny_policy):
    a, raw = files["sA"], files["raw"]
    merged = tmp_path / "merged.parquet"
    r = sera("sql", "SELECT * FROM sA UNION ALL SELECT * FROM raw", a, raw, "-o", merged)
    assert r.exit_code == 0, r.stderr
    assert _refused(tmp_path, merged, "--policy", tiny_policy) == (
        f"error: {merged}: its reference log-probs come from different references: "
        f"{a}: fingerprint '{fingerprint(a)}'; {raw}: no reference recorded {HINT}\n")


def test_a_file_without_provenance_beside_a_scored_one_is_refused(tmp_path, files, tiny_policy, tiny_ref):
    a, raw = files["sA"], files["raw"]
    assert _refused(tmp_path, a, raw, "--policy", tiny_policy, "--ref", tiny_ref) == (
        f"error: {a}, {raw}: their reference log-probs come from different references: "
        f"{a}: fingerprint '{fingerprint(a)}'; {raw}: no reference recorded {HINT}\n")


def test_resolution_follows_every_parent():
    ref1, ref2 = {"fingerprint": "1"}, {"fingerprint": "2"}
    score1 = {"stage": "score", "logps": {"policy": None, "ref": ref1}, "parents": [{"file": "pairs"}]}
    score2 = {"stage": "score", "logps": {"policy": None, "ref": ref2}}
    sel = {"stage": "select", "logps": None, "parents": [{**score1, "file": "a"}, {**score2, "file": "b"}]}
    assert lineage.ref_sources(sel, "sel") == [("a", ref1), ("b", ref2)]
    assert lineage.ref_sources({"stage": "sql", "parents": [{**sel, "file": "sel"}]}, "q") == [("a", ref1), ("b", ref2)]
    assert lineage.ref_sources(None, "raw") == [("raw", None)]
    assert lineage.common_logps([{**score1, "file": "a"}, {**score1, "file": "c"}]) == score1["logps"]
    assert lineage.common_logps(sel["parents"]) is None
    assert lineage.common_logps([{**score1, "file": "a"}, {"file": "raw"}]) is None
