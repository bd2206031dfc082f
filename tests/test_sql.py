"""`sera sql`: DuckDB over files as views named after their stems; read-only; one-line errors."""

from __future__ import annotations

import hashlib
import json

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import xxhash
from typer.testing import CliRunner

from sera_cli.commands.app import app
from sera_cli.data import provenance
from sera_cli.stages.sql import cell, view_name

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


def xxh(path) -> str:
    return xxhash.xxh3_128_hexdigest(path.read_bytes())


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
    assert prov["stage"] == "sql" and prov["parents"] == [{"stage": "score", "file": str(s), "file_digest": xxh(s)}]
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


READ_ONLY = "(sera sql is read-only: it reads only the files it is given and writes nothing)"
LOCKED = "file system operations are disabled by configuration " + READ_ONLY


@pytest.mark.parametrize("query, message", [
    ("EXPLAIN ANALYZE COPY (SELECT * FROM scored LIMIT 1) TO '{s}' (FORMAT parquet)",
     'Permission Error: Cannot access file "{s}" - ' + LOCKED),
    ("EXPLAIN ANALYZE COPY (SELECT 1) TO '{tmp}/new.csv'", 'Permission Error: Cannot access file "{tmp}/new.csv" - '
     + LOCKED),
    ("EXPLAIN ANALYZE CREATE TABLE t AS SELECT * FROM scored",
     'Invalid Input Error: Cannot execute statement of type "EXPLAIN" on database "inputs" which is attached in '
     "read-only mode! " + READ_ONLY),
    ("EXPLAIN ANALYZE SET threads = 1", 'Invalid Input Error: Cannot change configuration option "threads" - the '
     "configuration has been locked " + READ_ONLY),
    ("EXPLAIN ANALYZE SET enable_external_access = true", 'Invalid Input Error: Cannot change configuration option '
     '"enable_external_access" - the configuration has been locked ' + READ_ONLY),
    ("EXPLAIN ANALYZE INSTALL httpfs", 'Permission Error: Cannot access directory "{home}/.duckdb/extensions/'
     '{duckdb_version}/{platform}" - ' + LOCKED),
    ("EXPLAIN ANALYZE LOAD httpfs", "Permission Error: Loading external extensions is disabled through "
     "configuration " + READ_ONLY),
    ("SELECT * FROM read_text('{secret}')", 'Permission Error: Cannot access file "{secret}" - ' + LOCKED),
    ("SELECT * FROM read_csv('{secret}')", 'Permission Error: Cannot access file "{secret}" - ' + LOCKED),
    ("SELECT * FROM read_parquet('{o}')", 'Permission Error: Cannot access file "{o}" - ' + LOCKED),
    ("SELECT * FROM glob('{tmp}/*')", 'Permission Error: Cannot access file "{tmp}/*" - ' + LOCKED),
    ("SELECT * FROM read_parquet('https://example.com/x.parquet')",
     'Permission Error: Cannot access file "https://example.com/x.parquet" - ' + LOCKED),
])
def test_the_query_can_read_only_the_named_files_and_write_nothing(files, tmp_path, monkeypatch, query, message):
    """The connection is locked by DuckDB's own settings, whatever the statement: EXPLAIN ANALYZE runs its
    statement, yet nothing is written, no other file or URL is read, nothing is installed or loaded."""
    s, o = files
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))  # DuckDB installs extensions under ~/.duckdb
    secret = tmp_path / "secret.txt"
    secret.write_text("a,b\n1,2\n")
    before = {p.name: digest(p) for p in tmp_path.iterdir() if p.is_file()}
    with duckdb.connect() as con:
        platform = con.sql("PRAGMA platform").fetchall()[0][0]
    names = {"s": s, "o": o, "tmp": tmp_path, "secret": secret, "home": home, "platform": platform,
             "duckdb_version": f"v{duckdb.__version__}"}
    r = sera("sql", query.format(**names), s)
    assert r.exit_code == 1 and r.stderr == f"error: query failed: {message.format(**names)}\n"
    assert {p.name: digest(p) for p in tmp_path.iterdir() if p.is_file()} == before
    assert list(home.iterdir()) == []


def test_an_output_equal_to_an_input_is_refused(files, tmp_path):
    s, o = files
    before = digest(s), digest(o)
    for out in (s, tmp_path / "." / "scored.parquet"):
        r = sera("sql", "SELECT * FROM scored LIMIT 1", s, o, "-o", out)
        assert r.exit_code == 1
        assert r.stderr == (f"error: {out}: is the input {s} (outputs never replace inputs: choose another output "
                            "path)\n")
    r = sera("sql", "SELECT * FROM iter_1", tmp_path / "*.parquet", "-o", o)
    assert r.stderr == f"error: {o}: is the input {o} (outputs never replace inputs: choose another output path)\n"
    assert (digest(s), digest(o)) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter-1.parquet", "scored.parquet"]


def test_unreadable_inputs_are_one_line_errors(files, tmp_path):
    s, _ = files
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(s.read_bytes()[:-20])
    empty = tmp_path / "empty.parquet"
    empty.write_bytes(b"")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"a": 1}\n{"a": \n')
    (tmp_path / "folder.parquet").mkdir()
    magic = "Parquet magic bytes not found in footer. Either the file is corrupted or this is not a parquet file."
    cases = [
        (cut, f"{cut}: not a readable Parquet file: {magic} (truncated, or not Parquet?)"),
        (empty, f"{empty}: not a readable Parquet file: Parquet file size is 0 bytes (truncated, or not Parquet?)"),
        (bad, f'{bad}: not a readable JSON file: Invalid Input Error: Malformed JSON in file "{bad}", at byte 8 in line 3: '
              "unexpected end of data. (truncated, or not JSON?)"),
        (tmp_path / "folder.parquet", f"{tmp_path / 'folder.parquet'}: is a folder, not a file"),
    ]
    for path, line in cases:
        r = sera("sql", "SELECT 1", path)
        assert r.exit_code == 1 and r.stderr == f"error: {line}\n"


def test_a_page_that_fails_to_decode_names_its_file(tmp_path):
    path = tmp_path / "pages.parquet"
    pq.write_table(pa.table({"x": list(range(5000))}), path, compression="snappy", use_dictionary=False)
    data = bytearray(path.read_bytes())
    data[100:2100] = bytes(2000)  # inside the first data page; the footer stays intact
    path.write_bytes(bytes(data))
    r = sera("sql", "SELECT sum(x) FROM pages", path)
    assert r.exit_code == 1
    assert r.stderr == (f"error: {path}: not a readable Parquet file: IOError: Corrupt snappy compressed data. "
                        "(truncated, or not Parquet?)\n")


def test_every_input_file_is_a_parent_of_the_output(files, tmp_path):
    s, o = files
    notes = tmp_path / "notes.jsonl"
    notes.write_text('{"id": "a", "note": "x"}\n')
    out = tmp_path / "joined.parquet"
    r = sera("sql", "SELECT id, irm, source, note FROM scored JOIN iter_1 USING (id) JOIN notes USING (id)",
             s, o, notes, "-o", out)
    assert r.exit_code == 0, r.stderr
    prov = provenance.read(pq.read_table(out))
    assert prov["parents"] == [{"stage": "score", "file": str(s), "file_digest": xxh(s)},
                               {"file": str(o), "file_digest": xxh(o)},
                               {"file": str(notes), "file_digest": xxh(notes)}]
    assert prov["logps"] is None  # no single parent's log-prob identity is claimed for the mix
