"""Scoring precision: the precision check's arithmetic on hand-made scores, its record in `score`, what `inspect`
and `select` make of it, `--dtype auto` on CPU, and the exact ln 2 start of float32 training."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import standard_table
from typer.testing import CliRunner

from sera_cli.commands.app import app
from sera_cli.data import provenance
from sera_cli.stages.score.precision import (
    check_pairs,
    check_rows,
    dtype_note,
    noise_floor,
    precision_stats,
    under_floor,
)

runner = CliRunner()


def sera(*args: str):
    return runner.invoke(app, list(args))


# ---- the arithmetic, on hand-made scores -----------------------------------------------------------------------

def test_noise_floor_is_the_95th_percentile_of_the_absolute_error_without_interpolation():
    exact = np.zeros(20)
    checked = np.arange(1, 21) / 100  # |errors| 0.01 .. 0.20
    # ceil(0.95 * 20) = 19: the 19th smallest |error| is 0.19; 19 of the 20 errors (95%) do not exceed it
    assert noise_floor(checked, exact) == pytest.approx(0.19)
    assert noise_floor(-checked, exact) == pytest.approx(0.19)  # the sign of an error does not matter
    # 32 pairs: ceil(30.4) = 31st smallest, the second largest
    errors = np.arange(32) * 0.5
    assert noise_floor(np.ones(32) + errors, np.ones(32)) == pytest.approx(15.0)
    assert noise_floor([0.3], [0.1]) == pytest.approx(0.2)  # one pair: its own error
    with pytest.raises(ValueError):
        noise_floor([], [])


def test_precision_stats_on_hand_made_pairs():
    exact = np.array([1.0, -1.0, 0.5, -0.5, 0.05, -0.05, 0.02, 0.0, 2.0, -2.0])
    checked = np.array([1.1, -0.9, 0.45, -0.55, -0.03, 0.04, 0.01, 0.0, 2.0, -2.0])
    s = precision_stats(checked, exact)
    # signs: pairs 4 and 5 flip; the tie (row 7) agrees with itself
    assert s["pairs"] == 10 and s["sign_agreement"] == pytest.approx(0.8)
    err = np.abs(checked - exact)  # 0.1 0.1 0.05 0.05 0.08 0.09 0.01 0 0 0
    assert s["median_abs_error"] == pytest.approx(0.05)
    assert s["noise_floor"] == pytest.approx(0.1) == pytest.approx(np.sort(err)[9])  # ceil(9.5) = 10th
    # |checked| >= 0.1: rows 0, 1, 2, 3, 8, 9, all agree; below: rows 4, 5, 6, 7, of which 4 and 5 flip
    assert s["agreement_above_floor"] == 1.0 and s["agreement_below_floor"] == pytest.approx(0.5)


def test_share_under_the_floor_ignores_non_finite_values():
    assert under_floor([0.1, -0.1, 0.3, -0.5, np.nan], 0.2) == pytest.approx(0.5)
    assert under_floor([0.2], 0.2) == 0.0  # at the floor is not under it
    assert under_floor([], 0.2) == 0.0


def test_check_rows_are_seeded_distinct_and_capped():
    a, b = check_rows(100, 32, 0), check_rows(100, 32, 0)
    assert np.array_equal(a, b) and len(set(a.tolist())) == 32 and np.all(np.diff(a) > 0)
    assert not np.array_equal(a, check_rows(100, 32, 1))
    assert np.array_equal(check_rows(5, 32, 0), np.arange(5))


def test_candidates_are_checked_on_the_max_min_pair_of_a_prompt():
    table = pa.table({"prompt_id": ["a", "a", "a", "b", "c", "c"], "response": list("uvwxyz")})
    reward = np.array([0.5, -1.0, 2.0, 9.0, 0.3, 0.1])
    chosen, rejected, irm = check_pairs(table, {"reward": reward}, 32, 0)
    # "b" has one candidate: no pair; "a" pairs row 2 over row 1, "c" row 4 over row 5 (flat sequence = row)
    assert sorted(zip(chosen.tolist(), rejected.tolist(), strict=True)) == [(2, 1), (4, 5)]
    assert sorted(irm.tolist()) == pytest.approx([0.2, 3.0])
    chosen, rejected, irm = check_pairs(pa.table({"x": [1, 2, 3]}), {"irm": np.array([1.0, 2.0, 3.0])}, 2, 0)
    assert np.array_equal(rejected, chosen + 1) and np.array_equal(irm, np.array([1.0, 2.0, 3.0])[chosen // 2])


def test_dtype_note_only_when_the_dtypes_differ():
    assert dtype_note("float32", "float32") is None and dtype_note(None, "bfloat16") is None
    assert dtype_note("float32", "bfloat16") == (
        "note: the reference log-probs are float32 and the policy's forward runs in bfloat16: the step-0 loss is "
        "not ln 2 even where policy = reference (use one --dtype for both for exact numbers)")


# ---- inspect and select read the check from the provenance ------------------------------------------------------

CHECK = {"dtype": "bfloat16", "seed": 0, "pairs": 32, "sign_agreement": 0.75, "median_abs_error": 0.1,
         "noise_floor": 0.5, "level": 0.95, "agreement_above_floor": 1.0, "agreement_below_floor": 0.6,
         "under_floor": 0.4}


def hand_scored(path: Path, irm: list[float], check: dict | None = CHECK) -> str:
    n = len(irm)
    table = pa.table({"id": [f"r{i}" for i in range(n)], "prompt": [f"p{i}" for i in range(n)],
                      "chosen": ["a"] * n, "rejected": ["b"] * n, "irm": irm})
    prov = provenance.record("score", {}, **({"precision": check} if check else {}))
    pq.write_table(provenance.attach(table, prov), path)
    return str(path)


def test_inspect_shows_the_share_of_pairs_under_the_floor(tmp_path):
    f = hand_scored(tmp_path / "s.parquet", [2.0, 1.0, 0.6, 0.4, -0.2, -0.7, 0.1, 3.0])
    r = sera("inspect", f)
    assert r.exit_code == 0, r.stderr
    assert ("noise floor 0.5 (precision check of 32 pairs, bfloat16 vs float32, sign agreement 75.0%): 37.5% of "
            "pairs have |irm| under it") in r.stdout  # 0.4, -0.2, 0.1: 3 of 8
    r = sera("inspect", f, "--json")
    assert json.loads(r.stdout)["precision"]["under_floor"] == pytest.approx(0.375)
    plain = hand_scored(tmp_path / "plain.parquet", [1.0, 2.0], None)
    assert "noise floor" not in sera("inspect", plain).stdout


def test_select_warns_when_its_cut_falls_under_the_floor(tmp_path):
    f = hand_scored(tmp_path / "s.parquet", [2.0, 1.0, 0.6, 0.4, -0.2, -0.7, 0.1, 3.0])
    r = sera("select", f, "--top", "0.75", "-o", str(tmp_path / "sel.parquet"))  # keeps 6: cut at 0.1
    assert r.exit_code == 0, r.stderr
    assert r.stderr.splitlines()[0] == (
        "warning: the cut (irm 0.1) falls under the noise floor 0.5 that the precision check measured in "
        "bfloat16: pairs near it are ordered by rounding noise (rescore with --dtype float32)")
    assert r.stderr.splitlines()[1].startswith("kept 6 of 8 rows (irm >= 0.1)")
    r = sera("select", f, "--top", "0.5", "-o", str(tmp_path / "sel2.parquet"))  # keeps 4: cut at 0.6
    assert r.exit_code == 0 and "warning" not in r.stderr
    # a selection of a selection still finds the check through its parents
    r = sera("select", str(tmp_path / "sel.parquet"), "--count", "5", "-o", str(tmp_path / "sel3.parquet"))
    assert r.stderr.startswith("warning: the cut (irm 0.4)")
    plain = hand_scored(tmp_path / "plain.parquet", [2.0, 1.0, 0.6, 0.4, -0.2], None)
    assert "warning" not in sera("select", plain, "--top", "0.8", "-o", str(tmp_path / "p.parquet")).stderr


# ---- score: --dtype auto is float32 on CPU; a bfloat16 score records the check ----------------------------------

def test_auto_dtype_scores_in_float32_on_cpu_whatever_its_bf16_support(monkeypatch):
    from sera_cli.backends.models import resolved_dtype
    from trainers import precision

    monkeypatch.setattr(precision, "cpu_flags", lambda cpuinfo=None: frozenset({"avx512_bf16", "amx_bf16"}))
    assert resolved_dtype("auto", "cpu") == "float32"
    assert resolved_dtype("bfloat16", "cpu") == "bfloat16"


def test_bfloat16_score_records_a_check_that_an_independent_float32_score_reproduces(tmp_path, tiny_policy,
                                                                                    tiny_ref):
    pairs = tmp_path / "pairs.parquet"
    pq.write_table(standard_table(), pairs)
    common = (str(pairs), "--policy", tiny_policy, "--ref", tiny_ref, "-q")
    r = sera("score", *common, "--dtype", "bfloat16", "--precision-check", "4", "-o", str(tmp_path / "bf.parquet"))
    assert r.exit_code == 0, r.stderr
    bf = pq.read_table(tmp_path / "bf.parquet")
    check = provenance.read(bf)["precision"]
    r32 = sera("score", *common, "--dtype", "auto", "-o", str(tmp_path / "f32.parquet"))
    assert r32.exit_code == 0, r32.stderr
    f32 = pq.read_table(tmp_path / "f32.parquet")
    assert provenance.read(f32)["logps"]["policy"]["dtype"] == "float32"  # auto on CPU
    assert "precision" not in provenance.read(f32) and "precision check" not in r32.stderr
    rows = check_rows(6, 4, 0)
    want = precision_stats(np.array(bf.column("irm").to_pylist())[rows], np.array(f32.column("irm").to_pylist())[rows])
    assert check["dtype"] == "bfloat16" and check["pairs"] == 4 and check["seed"] == 0
    for key in ("sign_agreement", "median_abs_error", "noise_floor"):  # float32 batches differ: ~1e-7 apart
        assert check[key] == pytest.approx(want[key], abs=1e-5)
    assert check["median_abs_error"] > 0  # bfloat16 does move the IRM
    assert check["under_floor"] == pytest.approx(under_floor(bf.column("irm").to_numpy(), check["noise_floor"]))
    assert r.stderr.splitlines()[1] == (
        f"precision check (4 pairs, bfloat16 vs float32): sign agreement {check['sign_agreement']:.1%}, median "
        f"|IRM error| {check['median_abs_error']:.4g}, noise floor {check['noise_floor']:.4g} "
        f"({check['under_floor']:.1%} of pairs under it)")
    r0 = sera("score", *common, "--dtype", "bfloat16", "--precision-check", "0", "-o", str(tmp_path / "n.parquet"))
    assert r0.exit_code == 0 and "precision" not in provenance.read(pq.read_table(tmp_path / "n.parquet"))


# ---- train: ln 2 at the start in float32; a dtype mismatch is said and recorded --------------------------------

def test_float32_training_from_policy_equal_to_reference_starts_at_ln2(tmp_path, tiny_policy):
    from sera_cli.stages.train.api import train
    from trainers import TrainConfig

    pairs = tmp_path / "pairs.parquet"
    pq.write_table(standard_table(), pairs)
    s = train(TrainConfig(inputs=(str(pairs),), output=str(tmp_path / "pi"), policy=tiny_policy, ref=tiny_policy,
                          dtype="float32", lr=1e-3, batch_size=6, micro_batch=3, max_steps=1, progress=False))
    assert abs(s.first["loss"] - math.log(2)) < 1e-6
    sera_json = json.loads((tmp_path / "pi" / "sera.json").read_text())
    assert sera_json["reference"]["dtype"] == "float32" and sera_json["reference"]["dtype_differs"] is False


def test_stored_float32_reference_under_bfloat16_training_is_said_and_recorded(tmp_path, scored, tiny_policy):
    r = sera("train", scored, "--policy", tiny_policy, "-o", str(tmp_path / "pi"), "--batch-size", "2",
             "--max-steps", "1", "--dtype", "bfloat16", "-q")
    assert r.exit_code == 0, r.stderr
    assert r.stderr.splitlines()[0] == dtype_note("float32", "bfloat16")
    sera_json = json.loads((tmp_path / "pi" / "sera.json").read_text())
    assert sera_json["reference"]["dtype"] == "float32" and sera_json["reference"]["dtype_differs"] is True
    r = sera("train", scored, "--policy", tiny_policy, "-o", str(tmp_path / "pi32"), "--batch-size", "2",
             "--max-steps", "1", "--dtype", "float32", "-q")
    assert r.exit_code == 0 and "note:" not in r.stderr


def test_a_check_that_does_not_fit_in_memory_keeps_the_scores(tmp_path, monkeypatch, tiny_policy, tiny_ref):
    from sera_cli.backends import models

    pairs = tmp_path / "pairs.parquet"
    pq.write_table(standard_table(), pairs)
    real = models.load_model

    def load(ref, dtype="auto", *args, **kw):
        if dtype == "float32":
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(ref, dtype, *args, **kw)

    monkeypatch.setattr(models, "load_model", load)
    r = sera("score", str(pairs), "--policy", tiny_policy, "--ref", tiny_ref, "--dtype", "bfloat16", "-q",
             "-o", str(tmp_path / "s.parquet"))
    assert r.exit_code == 0, r.stderr
    assert r.stderr.splitlines()[0] == (f"precision check skipped: {tiny_policy} does not fit in memory in float32 "
                                        "(the scores are kept; pass --precision-check 0 to skip it)")
    t = pq.read_table(tmp_path / "s.parquet")
    assert t.num_rows == 6 and "precision" not in provenance.read(t)
