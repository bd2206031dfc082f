"""The study script (tests/bench/study.py) at its smoke scale: every method on a tiny random Llama, so the
script cannot rot. Checks the shared iteration 1, the cross-fitted folds, the held-out numbers against the
workdirs' files, and that a rerun does no work."""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import SHARED, needs_shared

STUDY = Path(__file__).parent / "bench" / "study.py"

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (SHARED / "ultrafeedback-sample").exists(),
                                 reason="needs the shared data folder ../shared/data/ultrafeedback-sample")]


def _study():
    spec = importlib.util.spec_from_file_location("study", STUDY)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["study"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    mod.SHARED = SHARED
    return mod


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, tiny_policy):
    study = _study()
    out = tmp_path_factory.mktemp("study")
    study.run_study(study.SCALES["smoke"], out, tiny_policy)
    return study, out, tiny_policy


def _ids(path: Path) -> set[str]:
    return set(pq.read_table(path, columns=["id"]).column("id").to_pylist())


def test_every_method_ran_and_iteration_1_is_shared(smoke):
    study, out, _ = smoke
    group = out / "uf-flip20"
    train = pq.read_table(out / "data" / "uf-24-flip20.parquet")
    assert train.num_rows == 24 and sum(train.column("flipped").to_pylist()) == 5  # round(0.2 * 24)
    assert pq.read_metadata(out / "data" / "uf-heldout-12.parquet").num_rows == 12
    from sera_cli.stages.run.ledger import content_hash

    pi1 = content_hash(group / "dpo" / "iter-1" / "model")
    for m in study.ITER1_SHARED:
        ledger = json.loads((group / m / "run.json").read_text())
        first = {e["stage"]: e["action"] for e in ledger["log"] if e["invocation"] == 1}
        assert first["iter-1/train"] == "skipped", m  # copied from the dpo run, not retrained
        assert content_hash(group / m / "iter-1" / "model") == pi1
        assert (group / m / "iter-2" / "model").exists() and (group / m / "iter-2" / "heldout_scored.parquet").exists()
    for m in ("cdpo", "rdpo"):
        assert json.loads((group / m / "run.json").read_text())["config"]["loss"] == m
        assert content_hash(group / m / "iter-1" / "model") != pi1


def test_cross_fitted_folds_score_rows_their_model_never_saw(smoke):
    _, out, _ = smoke
    wd = out / "uf-flip20" / "sera-select-xfit"
    train = _ids(wd / "train.parquet")
    folds = [_ids(wd / "iter-2" / f"xfit-{k}" / "fold.parquet") for k in range(2)]
    assert folds[0] | folds[1] == train and not folds[0] & folds[1]
    for k in range(2):
        assert _ids(wd / "iter-2" / f"xfit-{k}" / "train.parquet") == train - folds[k]
    scored = pq.read_table(wd / "iter-2" / "scored.parquet")
    assert scored.column("id").to_pylist() == pq.read_table(wd / "train.parquet").column("id").to_pylist()
    # each row's IRM is its fold's score, not the in-sample one
    fold0 = pq.read_table(wd / "iter-2" / "xfit-0" / "scored.parquet").to_pydict()
    irm = dict(zip(scored.column("id").to_pylist(), scored.column("irm").to_pylist(), strict=True))
    assert all(irm[i] == v for i, v in zip(fold0["id"], fold0["irm"], strict=True))
    insample = pq.read_table(out / "uf-flip20" / "sera-select" / "iter-2" / "scored.parquet").to_pydict()
    assert not np.allclose(insample["irm"], scored.column("irm").to_pylist())


def test_tables_match_the_workdirs(smoke):
    study, out, _ = smoke
    text = (out / "tables.md").read_text()
    for m in study.METHODS:
        assert f"| {m} | 1 |" in text
    held = pq.read_table(out / "uf-flip20" / "sera" / "iter-2" / "heldout_scored.parquet").to_pydict()
    acc = float(np.mean(np.asarray(held["irm"]) > 0))
    row = next(line for line in text.splitlines() if line.startswith("| sera | 2 |"))
    assert f"{acc:.1%} [" in row
    lo, hi = study.bootstrap_ci((np.asarray(held["irm"]) > 0).astype(float))
    assert lo <= acc <= hi


def test_rerun_does_no_work(smoke):
    study, out, policy = smoke
    study.run_study(study.SCALES["smoke"], out, policy)
    for wd in (out / "uf-flip20").iterdir():
        ledger = json.loads((wd / "run.json").read_text())
        last = max(e["invocation"] for e in ledger["log"])
        assert {e["action"] for e in ledger["log"] if e["invocation"] == last} == {"skipped"}, wd.name


def test_held_out_pairs_drawn_from_the_training_file_never_overlap_its_sample(tmp_path):
    """--scale cpu-hh draws its training and held-out pairs from one file: one seeded order, disjoint slices."""
    import pyarrow as pa

    study = _study()
    src = tmp_path / "all.parquet"
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(50)], "prompt": [f"p{i}" for i in range(50)]}), src)
    study.sample(src, 20, 0, tmp_path / "train.parquet")
    study.sample(src, 25, 0, tmp_path / "held.parquet", skip=20)
    study.sample(src, None, 0, tmp_path / "rest.parquet", skip=20)
    train, held, rest = (set(pq.read_table(tmp_path / f).column("prompt").to_pylist())
                         for f in ("train.parquet", "held.parquet", "rest.parquet"))
    assert len(train) == 20 and len(held) == 25 and not train & held
    assert rest == {f"p{i}" for i in range(50)} - train  # skip leaves out exactly the training sample
    hh = study.SCALES["cpu-hh"].sets[0]
    assert hh.train == (hh.eval,) and hh.rows == 128 and hh.eval_rows == 200
    # --scale cpu-512 is the cpu study at 4x the rows and nothing else changed but the generated prompts, so its
    # iteration 1 is irm_sweep.py's 512-row lr 1e-5 cell (docs/study.md)
    big, cpu = study.SCALES["cpu-512"], study.SCALES["cpu"]
    assert big.run == {**cpu.run, "gen_prompts": 256} and big.sets == (replace(cpu.sets[0], rows=512),)


def test_cache_link_works_with_a_relative_study_folder(tmp_path, monkeypatch):
    """A relative --out (`--out runs/study`) once gave each workdir a link that pointed nowhere; an old dangling
    link is replaced, and the study folder can move with its links intact."""
    study = _study()
    monkeypatch.chdir(tmp_path)
    out = Path("runs") / "study"
    wd = out / "uf-flip20" / "sera"
    (out / "cache").mkdir(parents=True)
    wd.mkdir(parents=True)
    (wd / "cache").symlink_to(Path("nowhere") / "cache")  # dangling, as an older absolute link can be
    study.link_cache(wd, out)
    (out / "cache" / "logps.sqlite").write_text("x")
    assert (wd / "cache" / "logps.sqlite").read_text() == "x"
    study.link_cache(wd, out)  # a second call leaves a working link alone
    (tmp_path / "runs").rename(tmp_path / "moved")
    assert (tmp_path / "moved" / "study" / "uf-flip20" / "sera" / "cache" / "logps.sqlite").read_text() == "x"


def test_paired_difference_cancels_what_both_policies_share():
    study = _study()
    a, b = np.array([1, 1, 0, 0, 1.0] * 40), np.array([1, 0, 0, 0, 1.0] * 40)
    d, lo, hi = study.paired_diff(a, b)
    assert d == pytest.approx(0.2) and lo < 0.2 < hi
    assert study.paired_diff(a, a) == (0.0, 0.0, 0.0)  # the same outcomes: no difference, no spread
    # resampling pairs together: narrower than two independent intervals' overlap would suggest
    lo_a, hi_a = study.bootstrap_ci(a)
    assert hi - lo < hi_a - lo_a


def test_paired_table_in_the_tables(smoke):
    study, out, _ = smoke
    text = (out / "tables.md").read_text()
    assert "### Paired" in text and "| sera | " in text.split("### Paired")[1].split("###")[0]


def _seeds_module():
    spec = importlib.util.spec_from_file_location("study_seeds", STUDY.parent / "study_seeds.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_seed_table_reads_the_same_accuracies_as_the_workdirs(smoke):
    """tests/bench/study_seeds.py: one folder given twice is two seeds with equal numbers, so each method's mean
    is its accuracy, its difference with dpo is that of the workdirs' held-out files, and AUROCs are read."""
    _, out, _ = smoke
    text = _seeds_module().table([out, out], "uf-flip20")

    def acc(method: str) -> float:
        last = max(int(p.name.split("-")[1]) for p in (out / "uf-flip20" / method).glob("iter-*")
                   if (p / "heldout_scored.parquet").exists())
        irm = pq.read_table(out / "uf-flip20" / method / f"iter-{last}" / "heldout_scored.parquet").column("irm")
        return float(np.mean(np.asarray(irm.to_pylist()) > 0))

    dpo, sera = acc("dpo"), acc("sera")
    row = {line.split(" | ")[0][2:]: line.split(" | ") for line in text.splitlines() if line.startswith("| ")}
    assert row["dpo"][1:4] == [f"{dpo:.1%}"] * 3 and row["dpo"][4] == "-"
    assert row["sera"][1:4] == [f"{sera:.1%}"] * 3
    assert row["sera"][4] == f"{sera - dpo:+.1%}"
    assert row["sera"][5] == f"{2 * (sera > dpo)} of 2 |"
    for name in ("IRM, in-sample", "IRM, cross-fitted"):
        vals = row[name][1:3]
        assert vals[0] == vals[1] and vals[0] != "-" and 0.0 <= float(vals[0]) <= 1.0


def test_irm_sweep_cell_scores_the_pairs_pi_1_trained_on(tmp_path, tiny_policy):
    """tests/bench/irm_sweep.py: one (rows, lr) cell at the smoke scale. The in-sample scoring covers exactly the
    training pairs, with pi_1 (not pi_0: the margins move), pi_0's numbers come from the sweep's shared cache, the
    table's AUROC is the one of the scored file, and a rerun does no work."""
    study = _study()
    spec = importlib.util.spec_from_file_location("irm_sweep", STUDY.parent / "irm_sweep.py")
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    sweep.study = study  # the module whose SHARED points at the test data
    base = study.SCALES["smoke"]
    folder = sweep.cell(tmp_path, 24, 1e-3, base, tiny_policy)
    wd = folder / "uf-flip20" / "dpo"
    scored = pq.read_table(wd / "iter-1" / "insample_scored.parquet").to_pydict()
    train = pq.read_table(folder / "data" / "uf-24-flip20.parquet").to_pydict()
    assert sorted(scored["id"]) == sorted(train["id"]) and sum(scored["flipped"]) == 5
    assert np.abs(np.asarray(scored["irm"])).max() > 0  # pi_1 against pi_0: margins moved
    assert (tmp_path / "cache").is_dir() and (folder / "cache").resolve() == (tmp_path / "cache").resolve()
    from sera_cli.data.rankstats import auroc

    want = auroc(-np.asarray(scored["irm"], float), np.asarray(scored["flipped"], bool))
    row = next(line for line in sweep.table(tmp_path, 0.7, 0).splitlines() if "in-sample" in line)
    assert row.startswith("| 24 | 0.001 |") and f"| {want:.3f} [" in row
    stamp = (wd / "iter-1" / "insample_scored.parquet").stat().st_mtime_ns
    sweep.cell(tmp_path, 24, 1e-3, base, tiny_policy)
    assert (wd / "iter-1" / "insample_scored.parquet").stat().st_mtime_ns == stamp


# ------------------------------------------------------------------------------ the decisive study (issue 35)


@pytest.fixture(scope="module")
def decisive_smoke(tmp_path_factory):
    """tests/bench/decisive.py at --scale decisive-smoke: every phase on a tiny random Llama, a few HH pairs."""
    needs_shared(SHARED / "hh-rlhf" / "helpful-base" / "test.jsonl.gz")
    _study()  # decisive.py imports the study module this registered, whose SHARED is the test data's
    spec = importlib.util.spec_from_file_location("decisive", STUDY.parent / "decisive.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["decisive"] = mod
    spec.loader.exec_module(mod)
    out = tmp_path_factory.mktemp("decisive")
    mod.run(mod.CONFIGS["decisive-smoke"], out)
    return mod, out


def test_decisive_smoke_runs_every_phase(decisive_smoke):
    mod, out = decisive_smoke
    text = (out / "tables.md").read_text()
    rows = [(a, 2) for a in mod.ARMS2] + [(a, 3) for a in mod.ARMS3]
    for arm, it in rows:
        assert f"| {arm} | {it} |" in text, (arm, it)
    assert "Gate " in text and "Machine: CPU" in text and "## Length-only baseline" in text
    results = json.loads((out / "results.json").read_text())
    d = results["data"]
    assert d["sizes"]["held"] == 16 and d["sizes"]["val"] == 16 and d["sizes"]["train-clean"] == 32
    assert d["flipped"] == round(0.3 * 32) and d["excluded"] > 0
    res = results["seeds"]["0"]
    accs = [res["pi1"][res["chosen"]][k]["acc"] for k in ("val", "held")]
    accs += [a["acc"] for a in res["arms"].values()] + [results["baseline"]["heldout"]]
    assert len(res["arms"]) == len(rows)
    assert all(np.isfinite(a) and 0.0 <= a <= 1.0 for a in accs), accs
    # every arm's held-out file is the one its accuracy was read from
    held = pq.read_table(out / "seed-0" / "iter-2" / "irm-top70" / "held.parquet").column("irm").to_pylist()
    assert res["arms"]["irm-top70@2"]["acc"] == pytest.approx(float(np.mean(mod.outcomes(held))))


def test_decisive_smoke_arms_data(decisive_smoke):
    mod, out = decisive_smoke
    train = pq.read_table(out / "data" / "train.parquet").to_pydict()
    n_flips = sum(train["flipped"])
    oracle = pq.read_table(out / "seed-0" / "iter-2" / "oracle" / "data.parquet").to_pydict()
    assert not any(oracle["flipped"]) and len(oracle["id"]) == len(train["id"]) - n_flips  # exactly the flips removed
    for it in (2, 3):
        counts = {arm: pq.read_metadata(out / "seed-0" / f"iter-{it}" / arm / "data.parquet").num_rows
                  for arm in ("irm-top70", "random-70", "xfit-top70")}
        assert set(counts.values()) == {int(0.7 * len(train["id"]))}, counts
    for arm in mod.ARMS2:  # equal steps: the 70% arms run two epochs cut at S
        assert mod.train_steps(out / "seed-0" / "iter-2" / arm / "model") == mod.CONFIGS["decisive-smoke"].steps
    # cross-fitting: each fold model scored only the half it never trained on
    for k in range(2):
        fold = set(pq.read_table(out / "seed-0" / "iter-2" / f"xfit-{k}" / "train.parquet").column("id").to_pylist())
        other = set(pq.read_table(out / "seed-0" / "iter-2" / f"xfit-{k}" / "scored.parquet").column("id").to_pylist())
        assert fold and not fold & other and fold | other == set(train["id"])


def test_decisive_smoke_rerun_skips_everything(decisive_smoke, monkeypatch):
    mod, out = decisive_smoke
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    texts = {n: (out / n).read_text() for n in ("results.json", "tables.md")}

    def no_sera(*args):
        raise AssertionError(f"a rerun ran sera {args}")

    monkeypatch.setattr(mod, "sera", no_sera)
    mod.run(mod.CONFIGS["decisive-smoke"], out)
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert set(after) == set(before)
    changed = [p for p in before if before[p] != after[p] and p.name not in texts]
    assert not changed, changed
    assert {n: (out / n).read_text() for n in texts} == texts
