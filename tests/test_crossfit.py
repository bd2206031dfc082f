"""Cross-fitted IRM (`sera run --cross-fit K`): the fold assignment and the settings that go with it."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sera_cli.data.errors import ConfigError
from sera_cli.stages.run import crossfit
from sera_cli.stages.run.config import build


def test_folds_are_balanced_seeded_and_keep_a_prompt_together():
    prompts = [f"p{i // 2}" for i in range(40)]  # 20 prompts, two rows each
    f = crossfit.folds(prompts, 3, seed=0)
    assert all(f[i] == f[i + 1] for i in range(0, 40, 2))
    assert sorted(np.bincount(f[::2], minlength=3).tolist()) == [6, 7, 7]
    assert (crossfit.folds(prompts, 3, seed=0) == f).all()
    assert not (crossfit.folds(prompts, 3, seed=1) == f).all()
    assert (crossfit.folds(prompts[::-1], 3, seed=0) == f[::-1]).all()  # row order does not matter


def test_write_fold_splits_rows_and_combine_restores_their_order(tmp_path):
    data = tmp_path / "d.parquet"
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(10)], "prompt": [f"p{i}" for i in range(10)],
                             "irm": np.arange(10.0)}), data)
    parts = []
    for k in range(2):
        inside, outside = tmp_path / f"in{k}.parquet", tmp_path / f"out{k}.parquet"
        a = crossfit.write_fold(data, 2, k, 0, True, inside)
        b = crossfit.write_fold(data, 2, k, 0, False, outside)
        assert a["rows"] + b["rows"] == 10 and a["rows"] == 5
        ids_in = set(pq.read_table(inside).column("id").to_pylist())
        assert not ids_in & set(pq.read_table(outside).column("id").to_pylist())
        parts.append(inside)
    crossfit.combine(data, parts[::-1], tmp_path / "all.parquet")
    assert pq.read_table(tmp_path / "all.parquet").column("irm").to_pylist() == list(np.arange(10.0))


@pytest.mark.parametrize(("flags", "problem"), [
    ({"cross_fit": 1}, "cross-fit must be 0 (off) or a number of folds >= 2 (got 1)"),
    ({"cross_fit": 2, "method": "iterative-dpo"},
     "cross-fit scores the rows to select: it needs method sera or sera-select (got iterative-dpo)"),
    ({"loss": "rdpo", "eps": 0.5}, "eps must be in [0, 0.5) (got 0.5)"),
])
def test_bad_settings_are_one_line(flags, problem):
    with pytest.raises(ConfigError) as err:
        build(None, {"data": ("x.parquet",), **flags})
    assert str(err.value) == f"invalid run settings (1 problem): {problem}"


def test_cdpo_and_rdpo_are_run_losses():
    assert build(None, {"data": ("x.parquet",), "loss": "cdpo", "eps": 0.2}).eps == 0.2
