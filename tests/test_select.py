"""`sera select`: top fraction/count by IRM, ties by id, thresholds, and max-IRM pairs from candidates."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from sera_cli.commands.app import app
from sera_cli.data import provenance
from sera_cli.data.hashing import file_digest
from sera_cli.data.tables import Inputs, Source
from sera_cli.stages.select.api import choose, fraction_count
from sera_cli.stages.select.candidate_pairs import build_pairs

runner = CliRunner()
MSG = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


def sera(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def scored_table(irm: list[float]) -> pa.Table:
    n = len(irm)
    return pa.table({"prompt": [f"p{i}" for i in range(n)], "chosen": [f"c{i}" for i in range(n)],
                     "rejected": [f"r{i}" for i in range(n)], "id": [f"id{i:03d}" for i in range(n)],
                     "irm": pa.array(irm, pa.float64())})


def write(table: pa.Table, path, prov: dict | None = None) -> str:
    pq.write_table(provenance.attach(table, prov) if prov else table, path)
    return str(path)


def test_fraction_count_floors_without_float_noise():
    assert fraction_count(0.7, 10) == 7          # 0.7 * 10 = 7.000000000000001
    assert fraction_count(0.29, 100) == 29       # 0.29 * 100 = 28.999999999999996
    assert fraction_count(0.7, 3) == 2
    assert fraction_count(1.5, 4) == 6


def test_choose_ranks_by_score_and_breaks_ties_by_id():
    scores = np.array([3.0, 1.0, 2.0, 2.0, 0.0, -1.0])
    ids = pa.array(["f", "e", "d", "c", "b", "a"])
    c = choose(scores, ids, count=2)
    # 3.0, then one of the two 2.0s: id 'c' (row 3) before id 'd' (row 2). Kept rows stay in input order.
    assert c.indices.tolist() == [0, 3] and c.cutoff == 2.0 and c.beyond_top == 4
    assert choose(scores, ids, top=0.5).indices.tolist() == [0, 2, 3]
    c = choose(scores, ids, count=10, drop_ties=True, min_value=0.5)
    assert c.indices.tolist() == [0, 1, 2, 3] and c.ties_dropped == 1 and c.below_min == 1
    assert choose(scores, ids, count=0).cutoff is None


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.sampled_from([-2.0, -0.5, 0.0, 0.25, 1.0, 3.0]), min_size=1, max_size=60),
       top=st.floats(0.01, 1.0), drop_ties=st.booleans(), seed=st.integers(0, 2**16))
def test_select_properties(values, top, drop_ties, seed):
    scores = np.array(values)
    names = [f"{i:03d}" for i in np.random.default_rng(seed).permutation(len(values))]
    ids = pa.array(names)
    c = choose(scores, ids, top=top, drop_ties=drop_ties)
    kept = set(c.indices.tolist())
    k = fraction_count(top, len(values))
    assert len(kept) == len(c.indices) == k - c.ties_dropped
    assert c.indices.tolist() == sorted(kept)                                   # input order
    dropped = [i for i in range(len(values)) if i not in kept and not (drop_ties and values[i] == 0)]
    if kept and dropped:
        assert min(values[i] for i in kept) >= max(values[i] for i in dropped)
        at_cut = [i for i in dropped if values[i] == c.cutoff]
        assert all(names[i] > names[j] for i in at_cut for j in kept if values[j] == c.cutoff)  # ties by id
    # Deterministic and independent of row order: the same ids after a shuffle.
    perm = np.random.default_rng(seed + 1).permutation(len(values))
    again = choose(scores[perm], ids.take(pa.array(perm)), top=top, drop_ties=drop_ties)
    assert {names[int(perm[i])] for i in again.indices} == {names[i] for i in kept}


def test_cli_keeps_top_fraction_with_provenance(tmp_path):
    parent = {"stage": "score", "parents": [{"stage": "convert", "source_rows": 10}], "logps": {"policy": "P"}}
    src = write(scored_table([0.5, -1.0, 2.0, 0.0, 1.5, 0.5, -0.2, 3.0, 0.1, 0.5]), tmp_path / "scored.parquet",
                parent)
    out = tmp_path / "selected.parquet"
    r = sera("select", src, "--top", "0.5", "-o", out)
    assert r.exit_code == 0, r.stderr
    assert r.stderr == f"kept 5 of 10 rows (irm >= 0.5) -> {out}\n"
    t = pq.read_table(out)
    # Three rows tie at 0.5 for two places: the smaller ids win. Rows keep their input order.
    assert t.column("irm").to_pylist() == [0.5, 2.0, 1.5, 0.5, 3.0]
    assert t.column("id").to_pylist() == ["id000", "id002", "id004", "id005", "id007"]
    prov = provenance.read(t)
    assert prov["stage"] == "select" and prov["config"]["top"] == 0.5
    assert prov["parents"] == [{**parent, "file": src, "file_digest": file_digest(src)}]  # each input file, whole
    assert prov["logps"] == {"policy": "P"} and prov["cutoff"] == 0.5


def test_cli_count_min_irm_drop_ties_and_by(tmp_path):
    table = scored_table([0.0, 0.0, 1.0, -1.0, 2.0]).append_column("other", pa.array([5, 4, 3, 2, 1]))
    src = write(table, tmp_path / "s.parquet")
    out = tmp_path / "o.parquet"
    assert sera("select", src, "--drop-ties", "-o", out).exit_code == 0
    assert pq.read_table(out).column("irm").to_pylist() == [1.0, -1.0, 2.0]
    assert sera("select", src, "--count", "3", "--min-irm", "0.5", "-o", out).exit_code == 0
    assert pq.read_table(out).column("irm").to_pylist() == [1.0, 2.0]
    r = sera("select", src, "--count", "2", "--by", "other", "-o", out)
    assert r.exit_code == 0 and r.stderr == f"kept 2 of 5 rows (other >= 4) -> {out}\n"


def test_cli_errors_are_one_line_and_leave_no_output(tmp_path):
    src = write(scored_table([1.0, 2.0, float("nan")]), tmp_path / "s.parquet")
    out = tmp_path / "o.parquet"
    r = sera("select", src, "--top", "0.5", "-o", out)
    assert r.exit_code == 1
    assert r.stderr == f"error: {src}, row 2, column 'irm': is null or NaN (drop the row or rescore it)\n"
    assert not out.exists()
    r = sera("select", src, "--top", "0.5", "--count", "2", "-o", out)
    assert r.stderr == "error: give --top or --count, not both\n" and r.exit_code == 1
    r = sera("select", src, "-o", out)
    assert r.stderr == "error: nothing to select by: give --top, --count, --min-irm or --drop-ties\n"
    r = sera("select", src, "--top", "1.5", "-o", out)
    assert r.stderr == "error: --top must be a fraction in (0, 1], got 1.5\n"
    plain = write(pa.table({"prompt": ["p"], "chosen": ["c"], "rejected": ["r"]}), tmp_path / "p.parquet")
    r = sera("select", plain, "--top", "0.5", "-o", out)
    assert r.stderr == (f"error: {plain}: has no column 'irm' to rank by (has: prompt, chosen, rejected, id) "
                        "(score it first with 'sera score')\n")
    assert not out.exists()


# --- pairs from candidates -------------------------------------------------------------------------------

def candidates(rows: list[tuple[str, str, float]], conversational: bool = False) -> pa.Table:
    pid, resp, reward = zip(*rows, strict=True)
    prompts = [f"Question {p}?" for p in pid]
    prompt = pa.array([[{"role": "user", "content": p}] for p in prompts], MSG) if conversational else prompts
    n = len(rows)
    return pa.table({"prompt_id": list(pid), "prompt": prompt, "response": list(resp), "sample_idx": list(range(n)),
                     "logp_policy": [-float(i) for i in range(n)], "logp_ref": [-2.0 * i for i in range(n)],
                     "ntok": [len(r) for r in resp], "reward": list(reward), "truncated": [i == 1 for i in range(n)]})


CANDIDATES = [("a", "x", 1.0), ("a", "yy", 3.0), ("a", "z", -1.0), ("a", "yy", 3.0),   # pair yy > z, irm 4
              ("b", "u", 2.0), ("b", "u", 2.0),                                      # one distinct response
              ("c", "v", 0.5), ("c", "w", 0.5),                                      # all rewards equal
              ("d", "s", 1.0), ("d", "t", 0.0)]                                      # pair s > t, irm 1


def test_build_pairs_takes_highest_against_lowest_distinct_response():
    table = candidates(CANDIDATES)
    pairs, stats = build_pairs(Inputs(table, (Source("c.parquet", 0, table.num_rows),)))
    assert (stats.prompts, stats.pairs, stats.too_few, stats.all_equal) == (4, 2, 1, 1)
    rows = pairs.to_pylist()
    assert [(r["prompt_id"], r["chosen"], r["rejected"], r["irm"]) for r in rows] == [("a", "yy", "z", 4.0),
                                                                                      ("d", "s", "t", 1.0)]
    a = rows[0]
    assert (a["reward_chosen"], a["reward_rejected"]) == (3.0, -1.0)
    assert (a["logp_policy_chosen"], a["logp_policy_rejected"], a["logp_ref_chosen"], a["ntok_chosen"]) == \
        (-1.0, -2.0, -2.0, 2)
    assert a["truncated"] is True and rows[1]["truncated"] is False


@settings(max_examples=50, deadline=None)
@given(rows=st.lists(st.tuples(st.sampled_from("pqr"), st.sampled_from(["A", "B", "C", "D"]),
                               st.sampled_from([-1.0, 0.0, 0.5, 2.0])), min_size=1, max_size=30),
       seed=st.integers(0, 1000))
def test_build_pairs_properties(rows, seed):
    # One reward per distinct response, as a scorer gives.
    reward_of = {}
    rows = [(p, r, reward_of.setdefault((p, r), w)) for p, r, w in rows]
    table = candidates(rows)
    pairs, stats = build_pairs(Inputs(table, (Source("c", 0, len(rows)),)))
    by_prompt = {}
    for p, r, w in rows:
        by_prompt.setdefault(p, {})[r] = w
    expected = {p: max(d.values()) - min(d.values()) for p, d in by_prompt.items()
                if len(d) > 1 and max(d.values()) > min(d.values())}
    got = {r["prompt_id"]: r for r in pairs.to_pylist()}
    assert {p: r["irm"] for p, r in got.items()} == expected
    assert stats.pairs + stats.too_few + stats.all_equal == stats.prompts == len(by_prompt)
    assert all(r["chosen"] != r["rejected"] for r in got.values())
    perm = np.random.default_rng(seed).permutation(len(rows))
    again, _ = build_pairs(Inputs(table.take(pa.array(perm)), (Source("c", 0, len(rows)),)))
    assert sorted(again.select(["prompt_id", "chosen", "rejected"]).to_pylist(), key=str) == \
        sorted(pairs.select(["prompt_id", "chosen", "rejected"]).to_pylist(), key=str)


def test_cli_pairs_then_top(tmp_path):
    src = write(candidates(CANDIDATES, conversational=True), tmp_path / "cand.parquet", {"stage": "score"})
    out = tmp_path / "gen.parquet"
    r = sera("select", src, "--pairs", "--top", "0.5", "-o", out)
    assert r.exit_code == 0, r.stderr
    assert r.stderr == ("built 2 pairs from 4 prompts (dropped 1 with fewer than two distinct responses, 1 with all "
                        f"rewards equal); kept 1 of 2 rows (irm >= 4) -> {out}\n")
    t = pq.read_table(out)
    row = t.to_pylist()[0]
    assert row["chosen"] == [{"role": "assistant", "content": "yy"}]
    assert row["prompt"] == [{"role": "user", "content": "Question a?"}]
    for col in ("prompt", "chosen", "rejected", "id", "prompt_id", "reward_chosen", "reward_rejected", "irm",
                "logp_policy_chosen", "logp_policy_rejected", "logp_ref_chosen", "logp_ref_rejected",
                "ntok_chosen", "ntok_rejected"):
        assert col in t.column_names
    assert provenance.read(t)["pairs"] == {"prompts": 4, "pairs": 2, "too_few": 1, "all_equal": 1}


def test_candidates_without_pairs_flag_is_an_error(tmp_path):
    src = write(candidates(CANDIDATES), tmp_path / "cand.parquet")
    r = sera("select", src, "--top", "0.5", "-o", tmp_path / "o.parquet")
    assert r.exit_code == 1
    assert r.stderr == (f"error: {src}: holds candidates (one response per row), not pairs (add --pairs to build "
                        "the max-IRM pair of each prompt)\n")


@pytest.mark.parametrize("flag", [["--top", "0.5"], ["--count", "1"]])
def test_stdin_to_stdout(tmp_path, flag):
    src = write(scored_table([1.0, 2.0]), tmp_path / "s.parquet")
    r = runner.invoke(app, ["select", "-", *flag, "-o", "-"], input=open(src, "rb").read())
    assert r.exit_code == 0, r.stderr
    import io

    assert pq.read_table(io.BytesIO(r.stdout_bytes)).column("irm").to_pylist() == [2.0]
