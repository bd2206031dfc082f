"""`sera export trl`: TRL's column names, the numbers unchanged, and refusals that keep TRL's numbers honest."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
from typer.testing import CliRunner

from sera_cli.commands.app import app
from sera_cli.data import provenance

runner = CliRunner()


def scored(path, truncated=(False, False, False), ref_chosen=(-1.5, -2.0, -3.25)):
    table = pa.table({"prompt": ["a", "b", "c"], "chosen": ["x", "y", "z"], "rejected": ["u", "v", "w"],
                      "id": ["1", "2", "3"], "logp_ref_chosen": list(ref_chosen),
                      "logp_ref_rejected": [-4.0, -5.5, -6.0], "irm": [0.1, 0.2, 0.3],
                      "truncated": list(truncated)})
    pq.write_table(provenance.attach(table, {"stage": "score", "config": {"max_length": 256}}), path)
    return str(path)


def test_columns_are_trls_and_numbers_unchanged(tmp_path):
    out = tmp_path / "trl.parquet"
    r = runner.invoke(app, ["export", "trl", scored(tmp_path / "s.parquet"), "-o", str(out)])
    assert r.exit_code == 0, r.output
    t = pq.read_table(out)
    assert t.column_names == ["prompt", "chosen", "rejected", "id", "ref_chosen_logps", "ref_rejected_logps"]
    assert t.column("ref_chosen_logps").to_pylist() == [-1.5, -2.0, -3.25]
    assert "--max-length 256" in r.stderr
    assert provenance.read(t)["parents"][0]["stage"] == "score"


def test_truncated_rows_are_refused_or_dropped(tmp_path):
    src, out = scored(tmp_path / "s.parquet", truncated=(False, True, False)), tmp_path / "trl.parquet"
    r = runner.invoke(app, ["export", "trl", src, "-o", str(out)])
    assert r.exit_code != 0 and not out.exists()
    assert r.stderr.startswith(f"error: {src}, row 1, column 'truncated': ") and "--drop-truncated" in r.stderr
    r = runner.invoke(app, ["export", "trl", src, "-o", str(out), "--drop-truncated"])
    assert r.exit_code == 0 and pq.read_table(out).column("id").to_pylist() == ["1", "3"]


def test_unscored_or_non_finite_input_is_one_line(tmp_path):
    pairs = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["a"], "chosen": ["x"], "rejected": ["y"]}), pairs)
    r = runner.invoke(app, ["export", "trl", str(pairs), "-o", str(tmp_path / "o.parquet")])
    assert r.exit_code != 0 and "has no column 'logp_ref_chosen'" in r.stderr and len(r.stderr.splitlines()) == 1
    bad = scored(tmp_path / "nan.parquet", ref_chosen=(-1.0, float("nan"), -2.0))
    r = runner.invoke(app, ["export", "trl", bad, "-o", str(tmp_path / "o.parquet")])
    assert r.stderr.startswith(f"error: {bad}, row 1, column 'logp_ref_chosen': is not a finite log-prob")
    r = runner.invoke(app, ["export", "parquet", bad, "-o", str(tmp_path / "o.parquet")])
    assert r.exit_code != 0 and "the targets are: trl" in r.stderr
