"""`sera sql`: DuckDB over files as views named after their stems; read-only; one-line errors."""

from __future__ import annotations

import hashlib
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from sera_cli import provenance
from sera_cli.app import app
from sera_cli.sqlquery import cell, view_name

runner = CliRunner()


def sera(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def files(tmp_path):
    scored = pa.table({"id": ["a", "b", "c", "d"], "irm": [1.5, -0.5, 0.0, 2.0],
                       "prompt": [[{"role": "user", "content": f"q{i}"}] for i in range(4)]})
    other = pa.table({"id": ["a", "d"], "source": ["offline", "generated"]})
    s, o = tmp_path / "scored.parquet", tmp_path / "iter-1.parquet"
    pq.write_table(provenance.attach(scored, {"stage": "score"}), s)
    pq.write_table(other, o)
    return s, o


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_view_names():
    assert view_name("runs/scored.parquet") == "scored"
    assert view_name("iter-1.parquet") == "iter_1"
    assert view_name("2024.data.csv") == "_2024_data"
    assert view_name("pairs.jsonl.gz") == "pairs"


def test_query_joins_two_files_and_prints_a_table(files):
    s, o = files
    r = sera("sql", "SELECT s.id, irm, source FROM scored s JOIN iter_1 USING (id) ORDER BY irm DESC", s, o)
    assert r.exit_code == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if "│" in ln]
    assert [ln.split("│")[1:4] for ln in lines] == [[" d  ", " 2   ", " generated "], [" a  ", " 1.5 ", " offline   "]]
    assert "2 rows" in r.stdout


def test_json_and_outputs(files, tmp_path):
    s, _ = files
    r = sera("sql", "SELECT count(*) AS n, avg(irm) AS mean FROM scored WHERE irm > 0", s, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout) == [{"n": 2, "mean": 1.75}]
    out = tmp_path / "out.parquet"
    r = sera("sql", "SELECT * FROM scored WHERE irm >= 0 ORDER BY id", s, "-o", out)
    assert r.exit_code == 0 and r.stderr == f"wrote 3 rows -> {out}\n"
    t = pq.read_table(out)
    assert t.column("id").to_pylist() == ["a", "c", "d"]
    prov = provenance.read(t)
    assert prov["stage"] == "sql" and prov["parents"] == [{"stage": "score"}]
    jl = tmp_path / "out.jsonl"
    assert sera("sql", "SELECT id, prompt FROM scored ORDER BY id LIMIT 1", s, "-o", jl).exit_code == 0
    assert json.loads(jl.read_text()) == {"id": "a", "prompt": [{"role": "user", "content": "q0"}]}
    csv = tmp_path / "out.csv"
    assert sera("sql", "SELECT id, irm FROM scored ORDER BY id", s, "-o", csv).exit_code == 0
    assert csv.read_text().splitlines() == ['"id","irm"', '"a",1.5', '"b",-0.5', '"c",0', '"d",2']
    r = sera("sql", "SELECT * FROM scored", s, "-o", csv)
    assert r.exit_code == 1
    assert r.stderr == f"error: {csv}: CSV cannot hold the nested column 'prompt' (write .parquet or .jsonl instead)\n"


@pytest.mark.parametrize("query, message", [
    ("SELEC 1", 'query failed: Parser Error: syntax error at or near "SELEC"'),
    ("SELECT nope FROM scored", 'query failed: Binder Error: Referenced column "nope" not found in FROM clause!'),
    ("COPY scored TO 'x.parquet'", "sera sql runs one read-only SELECT query; got COPY"),
    ("DROP VIEW scored", "sera sql runs one read-only SELECT query; got DROP"),
    ("SELECT 1; SELECT 2", "sera sql runs one read-only SELECT query; got SELECT, SELECT"),
])
def test_bad_or_writing_queries_are_one_line_errors_and_inputs_stay_unchanged(files, query, message):
    s, o = files
    before = digest(s), digest(o)
    r = sera("sql", query, s, o)
    assert r.exit_code == 1 and r.stderr == f"error: {message}\n"
    assert (digest(s), digest(o)) == before


def test_missing_file_and_clashing_names(files, tmp_path):
    s, _ = files
    r = sera("sql", "SELECT 1", tmp_path / "nope.parquet")
    assert r.exit_code == 1 and r.stderr == f"error: {tmp_path / 'nope.parquet'}: no such file\n"
    (tmp_path / "sub").mkdir()
    twin = tmp_path / "sub" / "scored.parquet"
    twin.write_bytes(s.read_bytes())
    r = sera("sql", "SELECT 1", s, twin)
    assert r.stderr == f"error: {twin}: would be the view 'scored' like {s} (rename one of them)\n"


def test_cells_render_messages_and_numbers():
    assert cell([{"role": "user", "content": "Hi\nthere"}]) == "user: Hi there"
    assert cell(1 / 3) == "0.333333"
    assert cell("x" * 100, width=10) == "x" * 9 + "…"
