"""`sera inspect` and its rank statistics: checked against hand-computed values and scipy."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy import stats
from typer.testing import CliRunner

from sera_cli.commands.app import app
from sera_cli.data.rankstats import auroc, average_ranks, quantiles, spearman

runner = CliRunner()


def sera(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_average_ranks_by_hand():
    np.testing.assert_array_equal(average_ranks(np.array([10, 20, 20, 5])), [2, 3.5, 3.5, 1])


def test_auroc_by_hand():
    # positives 3, 2; negatives 1, 2: pairs (3>1) (3>2) (2>1) (2=2 counts 1/2) -> 3.5 / 4.
    assert auroc(np.array([3.0, 2.0, 1.0, 2.0]), np.array([True, True, False, False])) == 0.875
    assert auroc(np.array([1.0, 2.0]), np.array([True, True])) is None


def test_spearman_and_quantiles_against_scipy_and_numpy():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 8, 300).astype(float)          # many ties
    y = x + rng.normal(size=300)
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert spearman(np.ones(5), np.arange(5.0)) is None
    q = quantiles(np.arange(101.0))
    assert q == {"min": 0.0, "q05": 5.0, "q25": 25.0, "median": 50.0, "q75": 75.0, "q95": 95.0, "max": 100.0}


def flipped_file(tmp_path, n: int = 400) -> tuple[str, pa.Table]:
    rng = np.random.default_rng(3)
    flipped = rng.random(n) < 0.25
    irm = rng.normal(size=n) + np.where(flipped, -1.0, 0.7)
    irm[:3] = 0.0
    chosen = ["x" * int(k) for k in rng.integers(1, 60, n)]
    rejected = ["y" * int(k) for k in rng.integers(1, 60, n)]
    table = pa.table({"prompt": ["p"] * n, "chosen": chosen, "rejected": rejected,
                      "id": [f"{i:04d}" for i in range(n)], "irm": irm, "reward_chosen": irm / 2,
                      "reward_rejected": -irm / 2, "flipped": flipped,
                      "score_chosen": np.where(flipped, 2.0, 8.0), "score_rejected": np.where(flipped, 8.0, 2.0)})
    path = tmp_path / "scored.parquet"
    pq.write_table(table, path)
    return str(path), table


def brute_auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    pos, neg = scores[positive], scores[~positive]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


def test_inspect_json_on_known_flips(tmp_path):
    path, table = flipped_file(tmp_path)
    r = sera("inspect", path, "--json", "--k1", "0.7")
    assert r.exit_code == 0, r.stderr
    rep = json.loads(r.stdout)
    irm, flipped = table.column("irm").to_numpy(), table.column("flipped").to_numpy(zero_copy_only=False)
    assert rep["rows"] == 400 and rep["kind"] == "pairs"
    assert rep["flipped"]["count"] == int(flipped.sum())
    assert rep["flipped"]["auroc"] == pytest.approx(brute_auroc(irm, ~flipped), abs=1e-6)
    assert rep["score_margin"]["auroc"] == pytest.approx(brute_auroc(irm, ~flipped), abs=1e-6)
    top = np.argsort(-irm, kind="stable")[:280]           # no ties except the three zeros, far from the cut
    assert rep["flipped"]["share_of_top_k1"] == pytest.approx(flipped[top].mean(), abs=1e-6)
    assert rep["flipped"]["kept_in_top_k1"] == pytest.approx(np.isin(np.flatnonzero(flipped), top).mean(), abs=1e-6)
    assert rep["reward_accuracy"] == pytest.approx((irm > 0).mean(), abs=1e-6)
    assert rep["ties"] == pytest.approx(3 / 400, abs=1e-6)
    diff = np.array([len(c) for c in table.column("chosen").to_pylist()]) - \
        np.array([len(c) for c in table.column("rejected").to_pylist()])
    assert rep["length"]["unit"] == "characters"
    assert rep["spearman"]["irm_vs_length_diff"] == pytest.approx(stats.spearmanr(irm, diff).statistic, abs=1e-6)
    assert rep["quantiles"]["median"] == pytest.approx(np.median(irm), abs=1e-6)
    assert sum(rep["histogram"]["counts"]) == 400 and len(rep["histogram"]["counts"]) == 20


def test_inspect_text_and_plot(tmp_path):
    path, _ = flipped_file(tmp_path)
    png = tmp_path / "irm.png"
    r = sera("inspect", path, "--plot", png, "--bins", "5")
    assert r.exit_code == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"{path}: 400 pairs"
    assert lines[2].startswith("reward accuracy (irm > 0) ")
    assert any(ln.startswith("flipped 9") and "AUROC of irm, clean above flipped 0.8" in ln for ln in lines)
    assert lines[-6] == "histogram of irm:" and len(lines[-5:]) == 5
    assert r.stderr == f"plot -> {png}\n"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


def _legend(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


def _lines_at(ax, value: float, axis: int) -> list:
    """The straight lines of `ax` at `value`: vertical (axis 0, x constant) or horizontal (axis 1, y constant)."""
    return [ln for ln in ax.get_lines() if np.allclose(ln.get_data()[axis], value)]


@pytest.mark.parametrize("n", [6, 400])
def test_inspect_figure_shows_clean_flipped_and_the_top_k1_cut(tmp_path, n):
    import matplotlib

    matplotlib.use("Agg")
    from sera_cli.stages.inspect.api import InspectConfig, inspect
    from sera_cli.stages.report.plots import inspect_figure, save

    path, table = flipped_file(tmp_path, n)
    rep = inspect(InspectConfig(inputs=(path,), k1=0.7))
    irm = table.column("irm").to_numpy()
    kept = int(0.7 * n + 1e-9)                            # 4 of 6, 280 of 400
    assert rep["top_k1"] == {"k1": 0.7, "rows": kept, "irm_min": pytest.approx(np.sort(irm)[-kept], abs=1e-6)}
    cut = rep["top_k1"]["irm_min"]
    fig = inspect_figure(pq.read_table(path), rep)
    hist, scatter = fig.axes
    n_flipped = int(table.column("flipped").to_numpy(zero_copy_only=False).sum())
    assert 0 < n_flipped < n
    for ax in (hist, scatter):
        labels = _legend(ax)
        assert f"clean ({n - n_flipped:,})" in labels and f"flipped ({n_flipped:,})" in labels
        assert f"top k1 = 0.7 cut (irm >= {cut:.3g}, {kept:,} kept)" in labels
    assert "--" in [ln.get_linestyle() for ln in _lines_at(hist, cut, 0)]      # vertical: irm is x
    assert "--" in [ln.get_linestyle() for ln in _lines_at(scatter, cut, 1)]   # horizontal: irm is y
    clean, flipped = scatter.collections                                      # one scatter per group
    assert len(clean.get_offsets()) == n - n_flipped and len(flipped.get_offsets()) == n_flipped
    assert clean.get_facecolor()[0][:3] != pytest.approx(flipped.get_facecolor()[0][:3])
    size, alpha = clean.get_sizes()[0], clean.get_alpha()
    shrink = (200 / n) ** 0.5                             # n <= 200: large and opaque; above, area and alpha shrink
    assert (size, alpha) == ((60.0, 0.9) if n == 6 else (pytest.approx(40 * shrink), pytest.approx(0.9 * shrink)))
    assert hist.get_xlabel() == "irm = r(chosen) - r(rejected) [beta x nats]" and hist.get_ylabel() == "pairs [count]"
    assert scatter.get_xlabel() == "len(chosen) - len(rejected) [characters]"
    png = tmp_path / "f.png"
    save(fig, png)
    assert png.stat().st_size > 10_000


def test_inspect_uses_token_counts_when_scored(tmp_path):
    table = pa.table({"prompt": ["p"] * 4, "chosen": ["a", "bb", "c", "d"], "rejected": ["e", "f", "g", "h"],
                      "irm": [1.0, 2.0, 3.0, 4.0], "ntok_chosen": [5, 6, 7, 8], "ntok_rejected": [4, 4, 4, 4]})
    path = tmp_path / "s.parquet"
    pq.write_table(table, path)
    rep = json.loads(sera("inspect", path, "--json").stdout)
    assert rep["length"] == {"unit": "tokens", "chosen_longer": 1.0}
    assert rep["spearman"]["irm_vs_length_diff"] == pytest.approx(1.0)
    assert rep["flipped"] is None and rep["score_margin"] is None


def test_inspect_errors(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["p"], "chosen": ["a"], "rejected": ["b"]}), path)
    r = sera("inspect", path)
    assert r.exit_code == 1
    assert r.stderr == f"error: {path}: has no 'irm' column (inspect reads the output of 'sera score')\n"
    r = sera("inspect", path, "--plot", "x.svg")
    assert r.stderr == "error: --plot x.svg: give a .png file\n"
