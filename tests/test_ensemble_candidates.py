"""The IRM ensemble on generated samples (SeRA Eq. 7): hand-made rewards through the max/min pairing and the top
k2, `score --prev` on candidates, `generate --score --prev-policy`, and the schedule of `sera run` from t = 3."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from sera_cli.commands.app import app
from sera_cli.data import provenance
from sera_cli.stages.run.api import _iteration
from sera_cli.stages.run.config import RunConfig
from sera_cli.stages.run.layout import Layout
from sera_cli.stages.run.methods import METHODS
from sera_cli.stages.score.ensemble import ensembled_rewards

runner = CliRunner()


def sera(*args: str):
    return runner.invoke(app, list(args))


# Two prompts of three candidates. Under r_now alone prompt a pairs a1 over a3 (IRM 2.0) and wins the top 1;
# under 0.3 * r_prev + 0.7 * r_now prompt a pairs a3 over a2 (0.2) and prompt b's pair (0.5) wins.
IDS = ["a1", "a2", "a3", "b1", "b2", "b3"]
R_NOW = [1.0, 0.0, -1.0, 0.5, 0.0, 0.4]
R_PREV = [-2.0, 0.0, 3.0, 0.5, 0.0, 0.0]


def candidates(reward: list[float]) -> pa.Table:
    return pa.table({"prompt_id": [i[0] for i in IDS], "prompt": [f"question {i[0]}" for i in IDS],
                     "response": [f"answer {i}" for i in IDS], "id": IDS, "reward": reward})


def test_hand_made_rewards_pair_and_rank_by_the_ensembled_margin(tmp_path):
    scored = ensembled_rewards(candidates(R_NOW), candidates(R_PREV), 0.3, {"policy": "p1", "ref": "p0"})
    np.testing.assert_allclose(scored.column("reward").to_numpy(), [0.1, 0.0, 0.2, 0.5, 0.0, 0.28])
    assert scored.column("reward_now").to_pylist() == R_NOW and scored.column("reward_prev").to_pylist() == R_PREV
    assert provenance.read(scored)["ensemble"]["lambda"] == 0.3
    pq.write_table(scored, tmp_path / "ens.parquet")
    pq.write_table(candidates(R_NOW), tmp_path / "now.parquet")

    def pairs(name: str, *extra: str) -> list[tuple]:
        r = sera("select", str(tmp_path / f"{name}.parquet"), "--pairs", *extra, "-o", str(tmp_path / "p.parquet"))
        assert r.exit_code == 0, r.stderr
        t = pq.read_table(tmp_path / "p.parquet")
        return sorted(zip(t.column("chosen").to_pylist(), t.column("rejected").to_pylist(),
                          np.round(t.column("irm").to_numpy(), 9).tolist(), strict=True))

    assert pairs("ens") == [("answer a3", "answer a2", 0.2), ("answer b1", "answer b2", 0.5)]
    assert pairs("now") == [("answer a1", "answer a3", 2.0), ("answer b1", "answer b2", 0.5)]
    assert pairs("ens", "--count", "1") == [("answer b1", "answer b2", 0.5)]  # top k2 by the ensembled IRM
    assert pairs("now", "--count", "1") == [("answer a1", "answer a3", 2.0)]


def test_ensembled_rewards_match_candidates_by_id_not_by_order():
    prev = candidates(R_PREV).take(pa.array([5, 4, 3, 2, 1, 0]))
    scored = ensembled_rewards(candidates(R_NOW), prev, 0.5)
    assert scored.column("reward_prev").to_pylist() == R_PREV
    np.testing.assert_allclose(scored.column("reward").to_numpy(), 0.5 * np.array(R_PREV) + 0.5 * np.array(R_NOW))


def test_score_prev_on_candidates_ensembles_the_reward(tmp_path, tiny_policy, tiny_ref):
    table = candidates([0.0] * 6).drop_columns(["reward"])
    pq.write_table(table, tmp_path / "cands.parquet")
    r = sera("score", str(tmp_path / "cands.parquet"), "--policy", tiny_ref, "--ref", tiny_policy, "-q",
             "-o", str(tmp_path / "prev.parquet"))
    assert r.exit_code == 0, r.stderr
    r = sera("score", str(tmp_path / "cands.parquet"), "--policy", tiny_policy, "--ref", tiny_ref, "-q",
             "--prev", str(tmp_path / "prev.parquet"), "--ensemble-lambda", "0.25", "-o", str(tmp_path / "s.parquet"))
    assert r.exit_code == 0, r.stderr
    prev, s = pq.read_table(tmp_path / "prev.parquet"), pq.read_table(tmp_path / "s.parquet")
    now = s.column("reward_now").to_numpy()
    np.testing.assert_allclose(s.column("reward_prev").to_numpy(), prev.column("reward").to_numpy())
    np.testing.assert_allclose(s.column("reward").to_numpy(), 0.25 * prev.column("reward").to_numpy() + 0.75 * now)
    # policy and reference swapped: the previous reward is minus the current one
    np.testing.assert_allclose(prev.column("reward").to_numpy(), -now, atol=1e-6)


def test_generate_score_with_the_previous_pair(tmp_path, tiny_policy, tiny_ref):
    pq.write_table(pa.table({"prompt": ["Say hi.", "Name a colour."]}), tmp_path / "prompts.parquet")
    out = tmp_path / "cands.parquet"
    r = sera("generate", str(tmp_path / "prompts.parquet"), "--policy", tiny_policy, "--n", "2",
             "--max-new-tokens", "4", "--top-p", "1", "--seed", "3", "-q", "--score", "--ref", tiny_ref,
             "--prev-policy", tiny_ref, "--prev-ref", tiny_policy, "-o", str(out))
    assert r.exit_code == 0, r.stderr
    t = pq.read_table(out)
    now, prev = t.column("reward_now").to_numpy(), t.column("reward_prev").to_numpy()
    np.testing.assert_allclose(t.column("reward").to_numpy(), 0.3 * prev + 0.7 * now)
    np.testing.assert_allclose(prev, -now, atol=1e-6)  # (tiny_ref, tiny_policy) is the current pair swapped
    assert provenance.read(t)["ensemble"]["prev_models"] == {"policy": tiny_ref, "ref": tiny_policy}
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]
    bad = sera("generate", str(tmp_path / "prompts.parquet"), "--policy", tiny_policy, "--prev-policy", tiny_ref,
               "-o", str(tmp_path / "x.parquet"))
    assert bad.exit_code == 1 and bad.stderr == "error: --prev-policy and --prev-ref are used only with --score\n"


@pytest.mark.parametrize("method, t, prev_stage", [("sera", 2, False), ("sera", 3, True), ("sera", 4, True)])
def test_run_rewards_candidates_with_the_previous_pair_from_iteration_3(tmp_path, monkeypatch, method, t,
                                                                       prev_stage):
    config = RunConfig(data=("x.parquet",), method=method, iterations=4, workdir=str(tmp_path))
    stages = {s.key.split("/", 1)[1]: s for s in _iteration(config, Layout(tmp_path), METHODS[method], t, 100)}
    assert ("reward-prev" in stages) == prev_stage
    model = lambda k: config.policy if k == 0 else str(tmp_path / f"iter-{k}" / "model")  # noqa: E731
    assert (stages["reward"].inputs["policy"], stages["reward"].inputs["ref"]) == (model(t - 1), model(t - 2))
    if prev_stage:
        keys = list(stages)
        assert keys.index("generate") < keys.index("reward-prev") < keys.index("reward") < keys.index("pair")
        assert (stages["reward-prev"].inputs["policy"], stages["reward-prev"].inputs["ref"]) == (model(t - 2),
                                                                                               model(t - 3))
        assert stages["reward"].inputs["prev"] == str(tmp_path / f"iter-{t}" / "candidates_scored_prev.parquet")
        assert stages["reward"].settings["ensemble_lambda"] == 0.3
        from types import SimpleNamespace

        from sera_cli.stages.run import api as loop

        done = SimpleNamespace(rows=8, computed=16, cached=0, truncated=0)
        monkeypatch.setattr(loop, "_scored", lambda sc: done)
        cost = stages["reward-prev"].run()
        assert cost["rows"] == 8 and cost["peak_memory_mib"] > 0  # the ensemble's price, for the report
        assert "peak_memory_mib" not in stages["reward"].run()
    else:
        assert "prev" not in stages["reward"].inputs


def test_the_report_shows_the_ensembles_time_and_memory(tmp_path):
    import json

    from sera_cli.stages.report import api as report

    root = tmp_path / "run"
    for t in (1, 2, 3):
        (root / f"iter-{t}").mkdir(parents=True)
    stages = {"iter-3/reward-prev": {"seconds": 42.0, "summary": {"rows": 8, "peak_memory_mib": 1234.5}},
              "iter-3/reward": {"seconds": 40.0, "summary": {"rows": 8}}}
    (root / "run.json").write_text(json.dumps({"config": {"method": "sera"}, "stages": stages, "log": []}))
    r = report.collect(root)
    assert [(i.ensemble_seconds, i.ensemble_memory) for i in r.iterations] == [(None, None), (None, None),
                                                                               (42.0, 1234.5)]
    header, rows = report.table_rows([r])
    got = {row[0]: row[1:] for row in rows}
    assert got["ensemble of candidates: time (s)"] == ["-", "-", "42"]
    assert got["ensemble of candidates: peak memory (MiB)"] == ["-", "-", "1234"]


def test_a_candidate_missing_from_the_previous_rewards_is_one_line_naming_its_row():
    import pyarrow as pa
    import pytest

    from sera_cli.data.errors import InputError
    from sera_cli.stages.score.ensemble import ensembled_rewards

    now = pa.table({"id": ["a", "b", "c"], "reward": [1.0, 2.0, 3.0]})
    prev = pa.table({"id": ["a", "c"], "reward": [0.0, 0.0]})
    with pytest.raises(InputError, match=r"cands\.parquet.*row 1.*candidate b has no reward under the previous "
                                         r"models \(1 of 3 candidates\)"):
        ensembled_rewards(now, prev, 0.3, source="cands.parquet")
    out = ensembled_rewards(now.slice(0, 1), prev, 0.3)
    assert out.column("reward").to_pylist() == [0.7]  # 0.3 * 0 + 0.7 * 1
