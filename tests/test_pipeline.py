"""`sera run`: config precedence and validation, stage records, the schedule of each method, the demo data,
and two SeRA iterations end to end on a tiny random Llama, resumed after deleting the last stage's output."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from sera_cli.commands.app import app
from sera_cli.data.errors import ConfigError
from sera_cli.data.provenance import read as read_prov
from sera_cli.stages.run.api import _iteration
from sera_cli.stages.run.config import DEMO_PRESET, RunConfig, build, load
from sera_cli.stages.run.data import DEMO_DATA, split
from sera_cli.stages.run.layout import Layout
from sera_cli.stages.run.ledger import Ledger, Stage
from sera_cli.stages.run.methods import METHODS

runner = CliRunner()


# ---- config ------------------------------------------------------------------------------------------


def test_precedence_defaults_file_flags(tmp_path):
    toml = tmp_path / "sera.toml"
    toml.write_text('data = ["a.parquet"]\nk1 = 0.5\nmax-new-tokens = 64\nensemble_lambda = 0.2\n')
    config = build(toml, {"k1": 0.6, "n": None, "iterations": 2})
    assert (config.k1, config.max_new_tokens, config.ensemble_lambda) == (0.6, 64, 0.2)  # flag beats file
    assert (config.iterations, config.n, config.k2) == (2, 4, 0.3)  # flag; None is "not given"; default
    assert config.data == ("a.parquet",)


def test_no_data_means_the_demo_preset_under_file_and_flags(tmp_path):
    toml = tmp_path / "sera.toml"
    toml.write_text("n = 3\n")
    config = load(toml, {"workdir": "w"})
    assert config.data == () and config.n == 3 and config.workdir == "w"
    assert config.iterations == DEMO_PRESET["iterations"] and config.max_new_tokens == DEMO_PRESET["max_new_tokens"]
    assert load(None, {"data": ("x.parquet",)}).iterations == RunConfig().iterations


def test_every_problem_reported_at_once(tmp_path):
    toml = tmp_path / "sera.toml"
    toml.write_text('k1 = 1.5\nn = 1\nloss = "ppo"\n')
    with pytest.raises(ConfigError) as err:
        build(toml, {"method": "dpo", "iterations": 3})
    assert str(err.value) == (
        "invalid run settings (4 problems): loss must be one of dpo, ipo, slic, simpo, cdpo, rdpo (got 'ppo'); "
        "method dpo runs one iteration (got iterations = 3); use iterative-dpo for more; "
        "k1 must be in (0, 1] (got 1.5); n must be >= 2 to form a pair from generated responses (got 1)")


def test_dpo_is_one_iteration_unless_told_otherwise():
    assert build(None, {"method": "dpo"}).iterations == 1
    assert load(None, {"method": "dpo"}).iterations == 1  # under the demo preset's 2
    with pytest.raises(ConfigError, match="method dpo runs one iteration"):
        build(None, {"method": "dpo", "iterations": 2})


def test_toml_unknown_key_and_wrong_type(tmp_path):
    toml = tmp_path / "sera.toml"
    toml.write_text('k3 = 1\n')
    with pytest.raises(ConfigError, match=r"sera.toml: unknown setting\(s\) k3 \(known: "):
        build(toml, {})
    toml.write_text('iterations = "two"\nbeta = true\n')
    with pytest.raises(ConfigError) as err:
        build(toml, {"k1": 2.0})
    assert str(err.value) == (f"invalid run settings (3 problems): iterations must be int (got 'two' from {toml}); "
                              f"beta must be float (got True from {toml}); k1 must be in (0, 1] (got 2.0)")
    toml.write_text('k1 = [\n')
    with pytest.raises(ConfigError, match="not valid TOML"):
        build(toml, {})


def test_cli_config_error_is_one_line_exit_1(tmp_path):
    result = runner.invoke(app, ["run", "x.parquet", "--k1", "2", "--n", "1", "--workdir", str(tmp_path / "w")])
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        "error: invalid run settings (2 problems): k1 must be in (0, 1] (got 2.0); "
        "n must be >= 2 to form a pair from generated responses (got 1)"]
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("command", ["run", "demo", "report"])
def test_help_has_an_example(command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0 and "Example: sera " in result.output


# ---- stage records ------------------------------------------------------------------------------------


def _writer(path: Path, text: str, calls: list):
    def run():
        calls.append(path.name)
        path.write_text(text)
        return {"chars": len(text)}
    return run


def test_stage_skips_only_when_output_inputs_and_settings_match(tmp_path):
    src, out, calls = tmp_path / "in.txt", tmp_path / "out.txt", []
    src.write_text("a")

    def stage(settings):
        return Stage("s", out, {"src": str(src)}, settings, _writer(out, "x", calls))

    ledger = Ledger.open(tmp_path, {})
    assert ledger.execute(stage({"k": 1})) == ("ran", {"chars": 1})
    assert ledger.execute(stage({"k": 1}))[0] == "skipped"
    assert ledger.execute(stage({"k": 2}))[0] == "ran"        # settings changed
    src.write_text("b")
    assert ledger.execute(stage({"k": 2}))[0] == "ran"        # input changed
    out.write_text("tampered")
    assert ledger.execute(stage({"k": 2}))[0] == "ran"        # output changed since recorded
    out.unlink()
    assert ledger.execute(stage({"k": 2}))[0] == "ran"        # output gone
    assert calls == ["out.txt"] * 5
    again = Ledger.open(tmp_path, {})                          # a new invocation reads run.json
    assert again.invocation == 2 and again.execute(stage({"k": 2}))[0] == "skipped"
    assert again.actions() == {"s": "skipped"} and ledger.actions(1) == {"s": "ran"}


def test_a_stage_that_crashed_resumes_its_partial_work_only_with_the_same_inputs(tmp_path):
    out, seen = tmp_path / "out.txt", []

    def crash():
        raise KeyboardInterrupt

    def stage(settings, run):
        return Stage("s", out, {}, settings, run)

    ledger = Ledger.open(tmp_path, {})
    with pytest.raises(KeyboardInterrupt):
        ledger.execute(stage({"k": 1}, crash), on_start=lambda s, resumable: seen.append(resumable))
    again = Ledger.open(tmp_path, {})
    with pytest.raises(KeyboardInterrupt):
        again.execute(stage({"k": 1}, crash), on_start=lambda s, resumable: seen.append(resumable))
    again.execute(stage({"k": 2}, _writer(out, "x", [])), on_start=lambda s, resumable: seen.append(resumable))
    assert seen == [False, True, False]  # the second try may reuse the first's chunks; new settings may not
    assert again.data["started"] == {}


# ---- methods as data -------------------------------------------------------------------------------


@pytest.mark.parametrize("name, t, keys", [
    ("sera", 1, ["reference", "train", "heldout"]),
    ("sera", 2, ["score", "select", "prompts", "generate", "reward", "pair", "mix", "reference", "train", "heldout"]),
    ("sera-select", 3, ["score", "select", "mix", "reference", "train", "heldout"]),
    ("iterative-dpo", 2, ["reference", "train", "heldout"]),
    ("dpo", 1, ["reference", "train", "heldout"]),
])
def test_schedule_of_each_method(tmp_path, name, t, keys):
    config = RunConfig(data=("x.parquet",), method=name, iterations=1 if name == "dpo" else 3, workdir=str(tmp_path),
                       k2=0.0 if name == "sera-select" else 0.3)
    stages = list(_iteration(config, Layout(tmp_path), METHODS[name], t, n_offline=100))
    assert [s.key.split("/")[1] for s in stages] == keys
    by = {s.key.split("/")[1]: s for s in stages}
    assert by["train"].inputs["ref"] == (config.policy if t == 1 else str(tmp_path / f"iter-{t - 1}" / "model"))
    if "score" in by:
        assert by["score"].inputs["policy"].endswith(f"iter-{t - 1}/model")
        assert ("prev" in by["score"].inputs) == (t >= 3)


def test_simpo_needs_no_reference_stage(tmp_path):
    config = RunConfig(data=("x.parquet",), loss="simpo", workdir=str(tmp_path))
    keys = [s.key for s in _iteration(config, Layout(tmp_path), METHODS["sera"], 1, 10)]
    assert keys == ["iter-1/train", "iter-1/heldout"]


# ---- demo data -------------------------------------------------------------------------------------


def test_demo_data_is_small_seeded_and_marks_its_flips():
    from sera_cli.demo.make_demo_data import make_pairs

    committed = pq.read_table(DEMO_DATA)
    assert DEMO_DATA.stat().st_size < 200_000
    assert committed.equals(make_pairs())  # the script remakes the committed file exactly
    flipped = committed.column("flipped").to_pylist()
    assert len(flipped) == 240 and sum(flipped) == 48
    row = committed.slice(0, 1).to_pylist()[0]
    assert row["prompt"][0] == {"role": "system", "content": "Answer in one short sentence."}
    assert len(set(committed.column("id").to_pylist())) == 240


def test_heldout_split_ignores_row_order():
    table = pq.read_table(DEMO_DATA)
    train, held = split(table, 0.2, seed=0)
    assert len(held) == 48 and len(train) == 192
    shuffled = table.take(list(range(table.num_rows))[::-1])
    _, held2 = split(shuffled, 0.2, seed=0)
    ids = table.column("id").to_pylist()
    assert {ids[i] for i in held} == {shuffled.column("id")[i].as_py() for i in held2}


# ---- end to end ----------------------------------------------------------------------------------


STAGE_OF = {"split": "split", "reference": "reference", "score": "score", "select": "select",
            "prompts": "prompts", "generate": "generate", "reward": "score", "pair": "select", "mix": "mix",
            "heldout": "score"}


def test_two_iterations_end_to_end_then_only_the_deleted_stage_reruns(tmp_path, tiny_policy):
    from sera_cli.stages.run.api import run

    wd = tmp_path / "wd"
    config = build(None, {"data": (str(DEMO_DATA),), "policy": tiny_policy, "workdir": str(wd), "iterations": 2,
                          "rows": 16, "gen_prompts": 3, "n": 2, "max_new_tokens": 6, "max_length": 80,
                          "max_prompt_length": 40, "batch_size": 4, "lr": 1e-4, "heldout": 0.25})
    first = run(config)
    lay = Layout(wd)
    ledger = json.loads(lay.ledger.read_text())
    assert not first.skipped and set(first.ran) == set(ledger["stages"])
    assert list(first.ran) == ["split/train", "split/heldout", "iter-1/reference", "iter-1/train", "iter-1/heldout",
                               "iter-2/score", "iter-2/select", "iter-2/prompts", "iter-2/generate",
                               "iter-2/reward", "iter-2/pair", "iter-2/mix", "iter-2/reference",
                               "iter-2/train", "iter-2/heldout"]
    for key, rec in ledger["stages"].items():
        out = wd / rec["output"]
        if key.startswith("iter-") and key.endswith("/train"):
            sera = json.loads((out / "sera.json").read_text())
            assert sera["stage"] == "train" and (out / "metrics.jsonl").exists()
            assert sera["reference"]["source"] == "input"  # reference log-probs came from the score stage
            continue
        prov = read_prov(pq.read_table(out))
        assert prov["stage"] == STAGE_OF[key.split("/")[0 if key.startswith("split") else 1]], key
    assert pq.read_metadata(lay.train).num_rows == 12 and pq.read_metadata(lay.heldout).num_rows == 4
    assert pq.read_metadata(lay.selected(2)).num_rows == 8  # floor(0.7 * 12)
    score2 = read_prov(pq.read_table(lay.scored(2)))
    assert score2["models"]["policy"]["spec"] == str(lay.model(1))
    assert score2["models"]["ref"]["spec"] == tiny_policy
    # the cache: pi_0's log-probs of the offline rows (iteration 1's reference) serve iteration 2's scoring,
    # and pi_1's log-probs of the mixed rows (from scoring and rewarding) are iteration 2's reference
    assert ledger["stages"]["iter-2/score"]["summary"] == {"rows": 12, "computed": 24, "cached": 24, "truncated": 0}
    assert ledger["stages"]["iter-2/reference"]["summary"]["computed"] == 0
    mixed = pq.read_table(lay.mixed(2)).column("source").to_pylist()
    assert mixed.count("offline") == 8 and 1 <= mixed.count("generated") <= 3
    train2 = json.loads((lay.model(2) / "sera.json").read_text())
    assert train2["config"]["policy"] == train2["config"]["ref"] == str(lay.model(1))

    lay.heldout_scored(2).unlink()
    second = run(config)
    assert second.ran == ("iter-2/heldout",) and len(second.skipped) == 14
    log = json.loads(lay.ledger.read_text())["log"]
    assert [e["stage"] for e in log if e["invocation"] == 2 and e["action"] == "ran"] == ["iter-2/heldout"]

    # the CLI with the same settings: nothing to do, then the report
    args = ["run", str(DEMO_DATA), "--policy", tiny_policy, "--workdir", str(wd), "--iterations", "2", "--rows", "16",
            "--gen-prompts", "3", "--n", "2", "--max-new-tokens", "6", "--max-length", "80", "--max-prompt-length",
            "40", "--batch-size", "4", "--lr", "1e-4", "--heldout", "0.25"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "iter-2/train up to date, skipped" in result.stderr
    assert "held-out reward accuracy" in result.stdout and (wd / "report.md").exists()  # the report: stdout
    assert result.stdout.splitlines()[-1].startswith(f"wrote {wd}/; try next: sera report {wd}  |  ")
    assert "ran 0 stage(s), skipped 15 up to date" in result.stderr


def test_workdir_lock_refuses_a_live_run_and_takes_over_a_dead_one(tmp_path):
    import os
    import subprocess
    import sys
    import time

    from sera_cli.stages.run.ledger import workdir_lock

    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # a live Python holder
    try:
        time.sleep(1.1)  # the lock is written after its holder started (a pid reused later is not the holder)
        (tmp_path / ".lock").write_text(str(holder.pid))
        with pytest.raises(ConfigError, match=rf"another 'sera run' \(pid {holder.pid}\) is using this workdir"):
            with workdir_lock(tmp_path):
                pass
    finally:
        holder.kill()
        holder.wait()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / ".lock").write_text(dead.stdout.strip())
    with workdir_lock(tmp_path):
        assert (tmp_path / ".lock").read_text() == str(os.getpid())
    assert not (tmp_path / ".lock").exists()


def test_report_to_tensorboard_logs_each_train_stage_and_changes_no_stage(tmp_path, tiny_policy):
    pytest.importorskip("tensorboard")
    wd, tb = tmp_path / "wd", tmp_path / "tb"
    args = ["run", str(DEMO_DATA), "--method", "dpo", "--policy", tiny_policy, "--workdir", str(wd), "--rows", "8",
            "--max-length", "64", "--max-prompt-length", "32", "--batch-size", "4", "--heldout", "0.25",
            "--no-report"]
    r = runner.invoke(app, [*args, "--report-to", "tensorboard", "--logging-dir", str(tb)])
    assert r.exit_code == 0, r.output
    assert list((tb / "iter-1-train").rglob("events.out.tfevents.*")), list(tb.rglob("*"))
    again = runner.invoke(app, args)  # tracking is not a setting of the stage: nothing reruns
    assert again.exit_code == 0 and "ran 0 stage(s)" in again.stderr, again.output
    bad = runner.invoke(app, [*args, "--report-to", "neptune"])
    assert bad.exit_code == 2 and "is not one of none, tensorboard" in bad.output
