"""`sera mix`: top k1*N offline + top k2*N generated pairs, de-duplicated, shuffled, N from provenance."""

from __future__ import annotations

import collections

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from sera_cli.commands.app import app
from sera_cli.data import provenance
from sera_cli.data.hashing import file_digest
from sera_cli.stages.mix import plan
from sera_cli.stages.select.api import fraction_count

runner = CliRunner()
CHAIN = {"stage": "select", "parents": [{"stage": "score", "parents": [{"stage": "convert", "source_rows": 10}]}]}


def sera(*args):
    return runner.invoke(app, [str(a) for a in args])


def pairs(rows: list[tuple[str, str, str, float]], prefix: str) -> pa.Table:
    p, c, r, irm = (list(x) for x in zip(*rows, strict=True))
    return pa.table({"prompt": p, "chosen": c, "rejected": r, "id": [f"{prefix}{i:03d}" for i in range(len(rows))],
                     "irm": pa.array(irm, pa.float64())})


def write(table: pa.Table, path, prov: dict | None = None) -> str:
    pq.write_table(provenance.attach(table, prov) if prov else table, path)
    return str(path)


def offline_rows(n: int = 10) -> list[tuple[str, str, str, float]]:
    return [(f"p{i}", f"c{i}", f"r{i}", float(i)) for i in range(n)]


def generated_rows(n: int = 6) -> list[tuple[str, str, str, float]]:
    return [(f"g{i}", f"gc{i}", f"gr{i}", float(10 * i)) for i in range(n)]


row = st.tuples(st.sampled_from("ab"), st.sampled_from("xy"), st.sampled_from("uvw"),
                st.sampled_from([-1.0, 0.0, 0.5, 2.0, 3.0]))


def _best(rows) -> dict:
    best = {}
    for p, c, r, s in rows:
        best[(p, c, r)] = max(s, best.get((p, c, r), -np.inf))
    return best


@settings(max_examples=80, deadline=None)
@given(off=st.lists(row, min_size=1, max_size=25), gen=st.lists(row, min_size=1, max_size=25),
       n=st.integers(1, 30), k1=st.sampled_from([0.1, 0.3, 0.7, 1.0]), k2=st.sampled_from([0.0, 0.3, 0.5, 1.0]))
def test_mix_plan_properties(off, gen, n, k1, k2):
    want_off, want_gen = fraction_count(k1, n), fraction_count(k2, n)
    t_off, t_gen = pairs(off, "o"), pairs(gen, "g")
    keys = ["prompt", "chosen", "rejected"]
    p = plan(pl.from_arrow(t_off.select(keys)), np.array([x[3] for x in off]), t_off.column("id"), want_off,
             pl.from_arrow(t_gen.select(keys)), np.array([x[3] for x in gen]), t_gen.column("id"), want_gen)
    best_off = _best(off)
    kept_off = [off[i][:3] for i in p.offline]
    assert len(kept_off) == len(set(kept_off)) == min(want_off, len(best_off))
    assert p.short_offline == max(0, want_off - len(best_off))
    assert all(off[i][3] == best_off[off[i][:3]] for i in p.offline)     # the best copy of a duplicate
    dropped = [s for k, s in best_off.items() if k not in set(kept_off)]
    if kept_off and dropped:
        assert min(off[i][3] for i in p.offline) >= max(dropped)
    fresh = {k: s for k, s in _best(gen).items() if k not in set(kept_off)}
    kept_gen = [gen[i][:3] for i in p.generated]
    assert len(kept_gen) == len(set(kept_gen)) == min(want_gen, len(fresh))
    assert not set(kept_gen) & set(kept_off)                              # no duplicate pairs across sources
    dropped = [s for k, s in fresh.items() if k not in set(kept_gen)]
    if kept_gen and dropped:
        assert min(gen[i][3] for i in p.generated) >= max(dropped)
    assert p.duplicates == (len(off) - len(best_off)) + (len(gen) - len(fresh))


def test_mix_reads_n_from_provenance_chain_and_counts_sources(tmp_path):
    off = write(pairs(offline_rows(), "o"), tmp_path / "selected.parquet", CHAIN)
    gen = write(pairs(generated_rows(), "g"), tmp_path / "gen.parquet", {"stage": "select"})
    out = tmp_path / "train.parquet"
    r = sera("mix", "--offline", off, "--generated", gen, "--k1", "0.7", "--k2", "0.3", "-o", out)
    assert r.exit_code == 0, r.stderr
    assert r.stderr == (f"wrote 10 rows: 7 offline (k1*N = 7) + 3 generated (k2*N = 3), N = 10; 0 duplicates "
                        f"dropped -> {out}\n")
    t = pq.read_table(out)
    assert collections.Counter(t.column("source").to_pylist()) == {"offline": 7, "generated": 3}
    assert set(t.column("iteration").to_pylist()) == {1}
    by_source = collections.defaultdict(set)
    for s, irm in zip(t.column("source").to_pylist(), t.column("irm").to_pylist(), strict=True):
        by_source[s].add(irm)
    assert by_source == {"offline": {3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0}, "generated": {30.0, 40.0, 50.0}}
    prov = provenance.read(t)
    assert prov["stage"] == "mix" and prov["source_rows"] == 10 and prov["rows"] == {"offline": 7, "generated": 3}
    assert prov["parents"] == [{**CHAIN, "file": off, "file_digest": file_digest(off)},
                               {"stage": "select", "file": gen, "file_digest": file_digest(gen)}]


def test_mix_is_deterministic_under_a_seed_and_shuffles(tmp_path):
    off = write(pairs(offline_rows(40), "o"), tmp_path / "o.parquet")
    gen = write(pairs(generated_rows(20), "g"), tmp_path / "g.parquet")
    ids = []
    for seed in (0, 0, 1):
        out = tmp_path / f"t{len(ids)}.parquet"
        assert sera("mix", "--offline", off, "--generated", gen, "--n", 40, "--seed", seed, "-o", out).exit_code == 0
        ids.append(pq.read_table(out).column("id").to_pylist())
    assert ids[0] == ids[1] and ids[0] != ids[2] and sorted(ids[0]) == sorted(ids[2])
    assert len(ids[0]) == 28 + 12 and ids[0][:28] != sorted(ids[0][:28], reverse=True)


def test_k1_plus_k2_may_exceed_one_and_duplicates_are_dropped(tmp_path):
    off = write(pairs(offline_rows(), "o"), tmp_path / "o.parquet")
    # The best generated pair repeats an offline pair that is kept: it is dropped, the next one fills in.
    gen_rows = generated_rows() + [("p9", "c9", "r9", 99.0)]
    gen = write(pairs(gen_rows, "g"), tmp_path / "g.parquet")
    out = tmp_path / "t.parquet"
    r = sera("mix", "--offline", off, "--generated", gen, "--k1", "1.0", "--k2", "0.5", "--n", "10", "-o", out)
    assert r.exit_code == 0, r.stderr
    t = pq.read_table(out)
    assert t.num_rows == 15 and "1 duplicates dropped" in r.stderr
    triples = list(zip(*(t.column(c).to_pylist() for c in ("prompt", "chosen", "rejected")), strict=True))
    assert len(set(triples)) == 15


def test_missing_n_and_shortfall_are_clear_errors(tmp_path):
    off = write(pairs(offline_rows(), "o"), tmp_path / "o.parquet")
    gen = write(pairs(generated_rows(), "g"), tmp_path / "g.parquet")
    out = tmp_path / "t.parquet"
    r = sera("mix", "--offline", off, "--generated", gen, "-o", out)
    assert r.exit_code == 1
    assert r.stderr == (f"error: {off}: its provenance does not record the size of the original offline set; "
                        "give --n\n")
    r = sera("mix", "--offline", off, "--generated", gen, "--n", "10", "--k2", "0.9", "-o", out)
    assert r.exit_code == 1
    assert r.stderr == (f"error: {gen}: has 6 distinct pairs but k2 x N asks for 9 (lower --k2, give a smaller "
                        "--n, or add --allow-shortfall to take all 6)\n")
    assert not out.exists()
    r = sera("mix", "--offline", off, "--generated", gen, "--n", "10", "--k2", "0.9", "--allow-shortfall",
             "-o", out)
    assert r.exit_code == 0
    assert r.stderr == (f"wrote 13 rows: 7 offline (k1*N = 7) + 6 generated (k2*N = 9), N = 10; 0 duplicates "
                        f"dropped; short by 0 offline and 3 generated -> {out}\n")


def test_standard_and_conversational_do_not_mix(tmp_path):
    off = write(pairs(offline_rows(), "o"), tmp_path / "o.parquet")
    msg = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    conv = pairs(generated_rows(), "g")
    for i, name in enumerate(("prompt", "chosen", "rejected")):
        role = "user" if name == "prompt" else "assistant"
        conv = conv.set_column(i, name, pa.array([[{"role": role, "content": x}] for x in conv.column(name).to_pylist()],
                                                 msg))
    gen = write(conv, tmp_path / "g.parquet")
    r = sera("mix", "--offline", off, "--generated", gen, "--n", "10", "-o", tmp_path / "t.parquet")
    assert r.exit_code == 1
    assert r.stderr == (f"error: {gen}: holds conversational pairs but {off} holds standard pairs (convert both "
                        "with the same --format)\n")


def test_offline_only_and_option_checks(tmp_path):
    off = write(pairs(offline_rows(), "o"), tmp_path / "o.parquet", CHAIN)
    out = tmp_path / "t.parquet"
    r = sera("mix", "--offline", off, "--k2", "0", "-o", out)
    assert r.exit_code == 0 and pq.read_table(out).num_rows == 7
    r = sera("mix", "--offline", off, "-o", out)
    assert r.stderr == "error: --k2 0.3 asks for generated pairs: give --generated or set --k2 0\n"


def test_n_comes_from_convert_through_score_and_select(tmp_path):
    import json

    raw = tmp_path / "raw.jsonl"
    raw.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"}) + "\n"
                           for i in range(10)))
    pairs, scored, selected, out = (tmp_path / f"{n}.parquet" for n in ("pairs", "scored", "selected", "train"))
    assert sera("convert", raw, "-o", pairs).exit_code == 0
    t = pq.read_table(pairs)
    # What `sera score` writes: the input's provenance under "parents", an irm column.
    write(t.append_column("irm", pa.array(np.linspace(-1, 1, 10))), scored,
          {"stage": "score", "parents": [provenance.read(t)]})
    assert sera("select", scored, "--top", "0.7", "-o", selected).exit_code == 0
    r = sera("mix", "--offline", selected, "--k1", "0.5", "--k2", "0", "-o", out)
    assert r.exit_code == 0, r.stderr
    assert r.stderr == f"wrote 5 rows: 5 offline (k1*N = 5) + 0 generated (k2*N = 0), N = 10; 0 duplicates dropped -> {out}\n"
