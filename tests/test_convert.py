"""`sera convert`: HH-RLHF, UltraFeedback and plain layouts into the pairs table; skipped rows; label flips."""

from __future__ import annotations

import gzip
import json

import pyarrow.parquet as pq
import pytest
from conftest import SHARED
from typer.testing import CliRunner

from sera_cli.commands.app import app
from sera_cli.data import provenance
from sera_cli.data.contract import check_pairs
from sera_cli.data.tables import read_inputs

runner = CliRunner()
HH = SHARED / "hh-rlhf"
UF = SHARED / "ultrafeedback-sample"
DIFFER = "whose two dialogues differ before the last turn"

# Rows, pairs written, and skipped rows by reason. The "differ" counts are those PROVENANCE.md gives
# (2,345/2,354, 1,137/1,137 and 2,746/2,749 rows share their prompt); the empty texts were found by reading.
HH_COUNTS = {
    "helpful-base": (2354, 2341, {DIFFER: 9, "with an empty response": 4}),
    "helpful-online": (1137, 1133, {"with an empty response": 3, "with an empty earlier turn": 1}),
    "helpful-rejection-sampled": (2749, 2746, {DIFFER: 3}),
}


def sera(*args):
    return runner.invoke(app, [str(a) for a in args])


def needs(path):
    if not path.exists():
        pytest.skip(f"shared data not found: {path}")
    return path


@pytest.mark.parametrize("split", sorted(HH_COUNTS))
def test_hh_rlhf_counts_and_conversational_shape(tmp_path, split):
    src = needs(HH / split / "test.jsonl.gz")
    rows, kept, skipped = HH_COUNTS[split]
    out = tmp_path / "hh.parquet"
    r = sera("convert", src, "-o", out)
    assert r.exit_code == 0, r.stderr
    assert r.stderr.splitlines()[0] == f"{src}: {rows:,} rows (hh) -> {kept:,} pairs"
    assert r.stderr.splitlines()[-1] == f"wrote {kept:,} conversational pairs -> {out}"
    t = pq.read_table(out)
    assert t.num_rows == kept and t.column_names == ["prompt", "chosen", "rejected", "id"]
    prov = provenance.read(t)
    assert prov["source_rows"] == kept and prov["stage"] == "convert"
    assert {why: len(rs) for why, rs in prov["files"][0]["skipped"].items()} == skipped
    assert check_pairs(read_inputs([str(out)])) == "conversational"
    raw = [json.loads(line) for line in gzip.open(src, "rt", encoding="utf-8")]
    for i in prov["files"][0]["skipped"].get(DIFFER, []):
        c, j = raw[i]["chosen"], raw[i]["rejected"]
        assert c[:c.rfind("\n\nAssistant:")] != j[:j.rfind("\n\nAssistant:")]
    row = t.slice(0, 1).to_pylist()[0]
    first = raw[0]["chosen"]
    assert row["prompt"][0] == {"role": "user", "content": first.split("\n\nHuman:")[1].split("\n\nAssistant:")[0].strip()}
    assert row["prompt"][-1]["role"] == "user"
    assert row["chosen"] == [{"role": "assistant", "content": first[first.rfind("\n\nAssistant:") + 12:].strip()}]


def test_hh_rlhf_all_splits_at_once_and_standard_format(tmp_path):
    needs(HH / "helpful-base" / "test.jsonl.gz")
    out = tmp_path / "hh.parquet"
    r = sera("convert", str(HH / "*" / "test.jsonl.gz"), "-o", out)
    assert r.exit_code == 0 and pq.read_table(out).num_rows == 2341 + 1133 + 2746
    r = sera("convert", HH / "helpful-base" / "test.jsonl.gz", "--format", "standard", "-o", out)
    assert r.exit_code == 0
    t = pq.read_table(out)
    row = t.slice(0, 1).to_pylist()[0]
    assert t.num_rows == 2341 and row["prompt"].startswith("\n\nHuman: ") and row["prompt"].endswith("\n\nAssistant:")
    assert row["chosen"].startswith(" ")     # TRL's standard HH layout keeps the space after "Assistant:"


@pytest.mark.parametrize("name, rows, kept, ties", [("train_clean.jsonl", 1000, 998, 111),
                                                     ("eval_clean.jsonl", 200, 200, 25)])
def test_ultrafeedback_sample_keeps_scores(tmp_path, name, rows, kept, ties):
    src = needs(UF / name)
    out = tmp_path / "uf.parquet"
    r = sera("convert", src, "-o", out)
    assert r.exit_code == 0, r.stderr
    assert r.stderr.splitlines()[0] == f"{src}: {rows:,} rows (plain) -> {kept:,} pairs"
    t = pq.read_table(out)
    assert t.num_rows == kept
    assert {"score_chosen", "score_rejected", "source_index"} <= set(t.column_names)
    sc, sr = t.column("score_chosen").to_pylist(), t.column("score_rejected").to_pylist()
    assert sum(a == b for a, b in zip(sc, sr, strict=True)) == ties
    assert all(a >= b for a, b in zip(sc, sr, strict=True))
    if kept < rows:
        assert r.stderr.splitlines()[1] == "  skipped 2 rows with an empty response (rows 478, 833)"


def test_flip_swaps_a_seeded_fraction_and_marks_it(tmp_path):
    src = needs(UF / "eval_clean.jsonl")
    base, a, b, c = (tmp_path / f"{x}.parquet" for x in "0abc")
    assert sera("convert", src, "-o", base).exit_code == 0
    r = sera("convert", src, "--flip", "0.2", "--seed", "0", "-o", a)
    assert r.exit_code == 0 and r.stderr.splitlines()[-1] == f"wrote 200 standard pairs, 40 flipped -> {a}"
    sera("convert", src, "--flip", "0.2", "--seed", "0", "-o", b)
    sera("convert", src, "--flip", "0.2", "--seed", "1", "-o", c)
    t0, ta, tb, tc = (pq.read_table(p).to_pylist() for p in (base, a, b, c))
    assert [r["flipped"] for r in ta] == [r["flipped"] for r in tb] != [r["flipped"] for r in tc]
    assert sum(r["flipped"] for r in ta) == 40
    for orig, row in zip(t0, ta, strict=True):
        swap = row["flipped"]
        assert (row["chosen"], row["rejected"]) == ((orig["rejected"], orig["chosen"]) if swap else
                                                    (orig["chosen"], orig["rejected"]))
        assert (row["score_chosen"] < row["score_rejected"]) == (swap and orig["score_chosen"] > orig["score_rejected"])


def test_message_list_layouts_and_other_containers(tmp_path):
    def msgs(*pairs):
        return [{"role": role, "content": text} for role, text in pairs]

    implicit = {"chosen": msgs(("user", "Hi?"), ("assistant", "Hello!")),
                "rejected": msgs(("user", "Hi?"), ("assistant", "Go away.")), "score_chosen": 8.0, "score_rejected": 2.0}
    explicit = {"prompt": "Hi?", "chosen": msgs(("user", "Hi?"), ("assistant", "Hello!")),
                "rejected": msgs(("user", "Hi?"), ("assistant", "Go away.")), "messages": [], "prompt_id": "x"}
    differ = {"chosen": msgs(("user", "A"), ("assistant", "B"), ("user", "C"), ("assistant", "D")),
              "rejected": msgs(("user", "A"), ("assistant", "X"), ("user", "C"), ("assistant", "D"))}
    src = tmp_path / "uf.json"
    src.write_text(json.dumps([implicit, explicit, differ]))
    out = tmp_path / "o.parquet"
    r = sera("convert", src, "-o", out)
    assert r.exit_code == 0, r.stderr
    assert r.stderr.splitlines()[1] == f"  skipped 1 row {DIFFER} (rows 2)"
    rows = pq.read_table(out).to_pylist()
    for row in rows:
        assert row["prompt"] == msgs(("user", "Hi?"))
        assert row["chosen"] == msgs(("assistant", "Hello!")) and row["rejected"] == msgs(("assistant", "Go away."))
    assert rows[0]["score_chosen"] == 8.0 and rows[1]["prompt_id"] == "x" and "messages" not in rows[0]
    # A columnar JSON object and Parquet input; a plain file written as conversational.
    cols = tmp_path / "cols.json"
    cols.write_text(json.dumps({"prompt": ["P1", "P2"], "chosen": ["a", "b"], "rejected": ["c", "d"]}))
    assert sera("convert", cols, "--format", "conversational", "-o", out).exit_code == 0
    assert pq.read_table(out).to_pylist()[1]["chosen"] == msgs(("assistant", "b"))
    again = tmp_path / "again.parquet"
    assert sera("convert", out, "-o", again).exit_code == 0
    assert pq.read_table(again).column("prompt").to_pylist() == [msgs(("user", "P1")), msgs(("user", "P2"))]


def test_bad_input_is_one_line_with_row_and_leaves_no_output(tmp_path):
    out = tmp_path / "o.parquet"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p", "chosen": \n')
    r = sera("convert", bad, "-o", out)
    assert r.exit_code == 1 and not out.exists()
    assert r.stderr == (f"error: {bad}, row 1: not valid JSON: Expecting value at character 27 (JSONL needs one "
                        "JSON object per line)\n")
    bad.write_text('{"question": "p", "answer": "a"}\n')
    r = sera("convert", bad, "-o", out)
    assert r.stderr == (f"error: {bad}, row 0: missing column 'chosen' (has: question, answer) (sera convert reads "
                        "HH-RLHF, UltraFeedback and prompt/chosen/rejected layouts)\n")
    multi = tmp_path / "multi.jsonl"
    multi.write_text(json.dumps({"chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d",
                                 "rejected": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: e"}) + "\n")
    assert sera("convert", multi, "--format", "standard", "-o", out).exit_code == 0
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    r = sera("convert", multi, plain, "-o", out)
    assert r.exit_code == 1
    assert r.stderr == (f"error: the inputs convert to different formats ({multi} is conversational, {plain} is "
                        "standard); choose one with --format\n")
    r = sera("convert", plain, "--layout", "csv", "-o", out)  # a fixed choice: a usage error that lists them
    said = " ".join(r.output.replace("│", " ").split())
    assert r.exit_code == 2 and "'csv' is not one of 'auto', 'hh', 'ultrafeedback', 'plain', 'implicit'" in said
    r = sera("convert", plain, "--flip", "1.5", "-o", out)
    assert r.exit_code == 1 and r.stderr == "error: --flip must be a fraction in [0, 1], got 1.5\n"


def test_implicit_prompt_strings_and_messages_as_trl_extracts_them(tmp_path):
    """TRL's implicit-prompt form: only chosen and rejected, both beginning with the prompt."""
    from sera_cli.data.layouts import prompt_end

    assert prompt_end("Q: 2+2? A: 4", "Q: 2+2? A: 5") == len("Q: 2+2? A:")  # the space goes with the answer
    hh = "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Colour?\n\nAssistant:"
    assert prompt_end(hh + " Blue is", hh + " Blue was") == len(hh)  # the last turn's start, not the prefix
    rows = [{"chosen": "Q: 2+2? A: 4", "rejected": "Q: 2+2? A: 5", "score_chosen": 1.0},
            {"chosen": hh + " Blue.", "rejected": hh + " Bluish?"},
            {"chosen": "4", "rejected": "5"}]
    src, out = tmp_path / "implicit.jsonl", tmp_path / "o.parquet"
    src.write_text("".join(json.dumps(r) + "\n" for r in (rows[0], rows[2], rows[1])))
    r = sera("convert", src, "--layout", "implicit", "-o", out)
    assert r.exit_code == 0, r.stderr
    assert r.stderr.splitlines()[:2] == [f"{src}: 3 rows (implicit) -> 2 pairs",
                                         "  skipped 1 row whose chosen and rejected share no prompt (rows 1)"]
    got = pq.read_table(out).to_pylist()
    assert [(g["prompt"], g["chosen"], g["rejected"]) for g in got] == [
        ("Q: 2+2? A:", " 4", " 5"), (hh, " Blue.", " Bluish?")]
    assert got[0]["score_chosen"] == 1.0
    # detected without --layout; conversational output splits the HH prompt into turns
    r = sera("convert", src, "--format", "conversational", "-o", out)
    assert r.exit_code == 0 and r.stderr.splitlines()[0] == f"{src}: 3 rows (implicit) -> 2 pairs", r.stderr
    second = pq.read_table(out).to_pylist()[1]
    assert second["prompt"] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                                {"role": "user", "content": "Colour?"}]
    assert second["chosen"] == [{"role": "assistant", "content": "Blue."}]
    # message lists: the shared leading messages are the prompt (TRL's extract_prompt), with --layout implicit too
    msgs = {"chosen": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello!"}],
            "rejected": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Go away."}]}
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps(msgs) + "\n")
    for layout in ("auto", "implicit"):
        assert sera("convert", chat, "--layout", layout, "--format", "conversational", "-o", out).exit_code == 0
        row = pq.read_table(out).to_pylist()[0]
        assert row["prompt"] == [{"role": "user", "content": "Hi?"}]
        assert row["rejected"] == [{"role": "assistant", "content": "Go away."}]
    # a first row that shares no prompt, and no prompt column: one line
    none = tmp_path / "none.jsonl"
    none.write_text(json.dumps(rows[2]) + "\n")
    r = sera("convert", none, "-o", out)
    assert r.exit_code == 1
    assert r.stderr == (f"error: {none}, row 0, column 'chosen': has no 'prompt' column, and its chosen and "
                        "rejected share no prompt (they do not begin with the same text) (give the prompt in a "
                        "'prompt' column)\n")
