"""Resumed work is keyed by content: new weights in the same folder, or new text under the same ids, are
recomputed, never reused; two runs on one output do not collide; a checkpoint cut between its renames resumes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import standard_table
from typer.testing import CliRunner

from sera_cli.commands.app import app
from sera_cli.data import chunk_store
from sera_cli.data.chunk_store import ChunkStore

runner = CliRunner()
SERA = [sys.executable, "-m", "sera_cli"]
INTERRUPTED = "interrupted: no output was written; rerun with --resume to keep finished work\n"


def sera(*args: str):
    return runner.invoke(app, list(args))


def rows(path) -> dict:
    """A table's columns without its metadata (the provenance records the command line)."""
    return pq.read_table(path).to_pydict()


@pytest.fixture
def policy(tmp_path, tiny_policy) -> Path:
    """A copy of the tiny policy whose weights a test may replace in place."""
    return Path(shutil.copytree(tiny_policy, tmp_path / "policy"))


def swap_weights(folder: Path, donor: str) -> None:
    """Replace a model folder's weights with another model's of the same shape (same folder, same config)."""
    shutil.copyfile(Path(donor) / "model.safetensors", folder / "model.safetensors")


def interrupt_after(monkeypatch, saves: int) -> None:
    """Ctrl-C right after the `saves`-th chunk is saved (as a user's Ctrl-C lands between chunks)."""
    real, count = ChunkStore.save, [0]

    def save(self, *a):
        real(self, *a)
        count[0] += 1
        if count[0] == saves:
            raise KeyboardInterrupt

    monkeypatch.setattr(ChunkStore, "save", save)


def partial(out: Path, kind: str) -> Path:
    return out.with_name(f".{out.name}.{kind}.sera-partial")


# ---- score ---------------------------------------------------------------------------------------------


def score_args(src, policy, ref, out, *extra) -> list[str]:
    return ["score", str(src), "--policy", str(policy), "--ref", str(ref), "--chunk-rows", "2", "-q",
            "-o", str(out), *extra]


def resume_equals_fresh(tmp_path, src, policy, ref, out) -> None:
    """`--resume` recomputes the 2 stale chunks (16 sequences), reuses 8, and writes what a fresh run writes."""
    r = sera(*score_args(src, policy, ref, out, "--resume"))
    assert r.exit_code == 0, r.stderr
    assert r.stderr.startswith("scored 6 rows (16 sequences computed, 0 from cache, 8 resumed, "
                               "2 stale chunks recomputed, ")
    fresh = tmp_path / "fresh.parquet"
    assert sera(*score_args(src, policy, ref, fresh)).exit_code == 0
    assert rows(out) == rows(fresh)


def test_score_resume_after_the_weights_changed_equals_a_fresh_run(tmp_path, policy, tiny_ref, monkeypatch):
    """Killed after two chunks of each model (order: policy-0, ref-0, policy-1, ref-1), the policy's weights
    replaced in its folder, then --resume: the reference's chunks are reused, the policy's recomputed."""
    src, out = tmp_path / "pairs.parquet", tmp_path / "out.parquet"
    pq.write_table(standard_table(), src)
    old = tmp_path / "old.parquet"
    assert sera(*score_args(src, policy, tiny_ref, old)).exit_code == 0
    with monkeypatch.context() as m:
        interrupt_after(m, 4)
        r = sera(*score_args(src, policy, tiny_ref, out))
    assert r.exit_code == 130 and r.stderr == INTERRUPTED
    assert sorted(p.name for p in partial(out, "score").iterdir()) == [
        "policy-000000.npz", "policy-000001.npz", "ref-000000.npz", "ref-000001.npz"]

    swap_weights(policy, tiny_ref)
    # 2 chunks x 2 rows x (chosen, rejected) of the reference resumed; both policy chunks stale
    resume_equals_fresh(tmp_path, src, policy, tiny_ref, out)
    assert rows(out)["logp_policy_chosen"] != rows(old)["logp_policy_chosen"]  # the swap changed the numbers
    assert rows(out)["logp_ref_chosen"] == rows(old)["logp_ref_chosen"]
    assert not partial(out, "score").exists()


def test_score_resume_after_row_text_changed_under_the_same_ids(tmp_path, tiny_policy, tiny_ref, monkeypatch):
    table = standard_table().append_column("id", pa.array([f"row{i}" for i in range(6)]))
    src, out = tmp_path / "pairs.parquet", tmp_path / "out.parquet"
    pq.write_table(table, src)
    with monkeypatch.context() as m:
        interrupt_after(m, 4)
        assert sera(*score_args(src, tiny_policy, tiny_ref, out)).exit_code == 130
    chosen = table.column("chosen").to_pylist()
    chosen[3] = " Paris, the capital of France."  # row 3 is in chunk 1; chunk 0 is untouched
    pq.write_table(table.set_column(1, "chosen", pa.array(chosen)), src)
    resume_equals_fresh(tmp_path, src, tiny_policy, tiny_ref, out)


def test_a_rerun_without_resume_says_it_discards_earlier_work(tmp_path, pairs_file, tiny_policy, tiny_ref,
                                                              monkeypatch):
    out = tmp_path / "out.parquet"
    with monkeypatch.context() as m:
        interrupt_after(m, 3)
        assert sera(*score_args(pairs_file, tiny_policy, tiny_ref, out)).exit_code == 130
    r = sera(*score_args(pairs_file, tiny_policy, tiny_ref, out))
    assert r.exit_code == 0, r.stderr
    first, second = r.stderr.splitlines()
    assert first == (f"discarded 3 saved chunk(s) of an earlier unfinished run in {partial(out, 'score')} "
                     "(pass --resume to reuse saved work)")
    assert second.startswith("scored 6 rows (24 sequences computed, 0 from cache, 0 resumed, ")
    again = sera(*score_args(pairs_file, tiny_policy, tiny_ref, out))  # nothing left over: no notice
    assert again.stderr.startswith("scored 6 rows")


def test_a_second_writer_of_the_same_output_stops_and_the_first_finishes(tmp_path, tiny_policy, tiny_ref):
    src, out = tmp_path / "pairs.parquet", tmp_path / "out.parquet"
    pq.write_table(pa.concat_tables([standard_table()] * 10), src)
    first = subprocess.Popen(SERA + score_args(src, tiny_policy, tiny_ref, out), stderr=subprocess.PIPE, text=True)
    folder = partial(out, "score")
    deadline = time.time() + 120
    while not list(folder.glob("*.npz")) and time.time() < deadline and first.poll() is None:
        time.sleep(0.01)
    r = sera(*score_args(src, tiny_policy, tiny_ref, out))
    assert first.poll() is None, "the first run ended before the second started; make it longer"
    assert r.exit_code == 1
    assert r.stderr == (f"error: {out}: another sera process (pid {first.pid}) is writing this output (its "
                        f"partial folder {folder} is locked); wait for it to finish or choose another --output\n")
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert err.startswith("scored 60 rows (240 sequences computed, 0 from cache, 0 resumed")
    assert not folder.exists() and not out.with_name(f".{out.name}.tmp-{first.pid}").exists()
    # the first run's output is whole: its first 6 rows are the 6 pairs scored alone
    alone = tmp_path / "alone.parquet"
    pq.write_table(standard_table(), tmp_path / "six.parquet")
    assert sera(*score_args(tmp_path / "six.parquet", tiny_policy, tiny_ref, alone)).exit_code == 0
    full = pq.read_table(out)
    assert full.num_rows == 60
    for col in ("logp_policy_chosen", "logp_ref_rejected", "irm"):
        np.testing.assert_allclose(full.column(col).to_numpy()[:6], pq.read_table(alone).column(col).to_numpy(),
                                   rtol=1e-6)


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path, pairs_file, tiny_policy, tiny_ref):
    out = tmp_path / "out.parquet"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    partial(out, "score").mkdir()
    (partial(out, "score") / chunk_store.LOCK).write_text(dead.stdout.strip())
    r = sera(*score_args(pairs_file, tiny_policy, tiny_ref, out))
    assert r.exit_code == 0, r.stderr
    assert r.stderr.startswith("scored 6 rows (24 sequences computed")
    assert not partial(out, "score").exists()


# ---- generate ------------------------------------------------------------------------------------------


def gen_args(src, policy, out, *extra) -> list[str]:
    return ["generate", str(src), "--policy", str(policy), "--n", "2", "--max-new-tokens", "4", "--chunk-prompts",
            "2", "--seed", "3", "--top-p", "1", "-q", "-o", str(out), *extra]


def test_generate_resume_after_the_weights_changed_equals_a_fresh_run(tmp_path, policy, tiny_ref, monkeypatch):
    src, out, old = tmp_path / "pairs.parquet", tmp_path / "cands.parquet", tmp_path / "old.parquet"
    pq.write_table(standard_table(), src)
    assert sera(*gen_args(src, policy, old)).exit_code == 0
    with monkeypatch.context() as m:
        interrupt_after(m, 2)
        assert sera(*gen_args(src, policy, out)).exit_code == 130
    assert sorted(p.name for p in partial(out, "generate").iterdir()) == [
        "chunk-000000000.parquet", "chunk-000000002.parquet"]
    swap_weights(policy, tiny_ref)
    r = sera(*gen_args(src, policy, out, "--resume"))
    assert r.exit_code == 0, r.stderr
    assert "; 2 stale chunks generated again ->" in r.stderr and "resumed" not in r.stderr
    fresh = tmp_path / "fresh.parquet"
    assert sera(*gen_args(src, policy, fresh)).exit_code == 0
    assert rows(out) == rows(fresh)
    assert rows(out)["response"] != rows(old)["response"]  # the swap changed the samples
    assert not partial(out, "generate").exists()


def test_generate_resume_keeps_chunks_of_the_same_weights(tmp_path, policy, monkeypatch):
    src, out, straight = tmp_path / "pairs.parquet", tmp_path / "cands.parquet", tmp_path / "straight.parquet"
    pq.write_table(standard_table(), src)
    assert sera(*gen_args(src, policy, straight)).exit_code == 0
    with monkeypatch.context() as m:
        interrupt_after(m, 2)
        assert sera(*gen_args(src, policy, out)).exit_code == 130
    r = sera(*gen_args(src, policy, out, "--resume"))
    assert r.exit_code == 0, r.stderr
    assert "; 2 chunks resumed ->" in r.stderr and "stale" not in r.stderr
    assert rows(out) == rows(straight)


# ---- train checkpoints ---------------------------------------------------------------------------------


def test_a_checkpoint_save_cut_between_its_renames_resumes(tmp_path, tiny_policy, tiny_ref):
    """`save` renames checkpoint -> checkpoint.old, then checkpoint.tmp -> checkpoint. Cut between the two, the
    folder holds the previous checkpoint as .old and the new, complete one as .tmp: --resume continues from the
    new one and ends with the losses of an uninterrupted run."""
    from sera_cli.stages.score.api import score
    from sera_cli.stages.score.config import ScoreConfig
    from sera_cli.stages.train.api import train
    from trainers import TrainConfig

    pq.write_table(standard_table(), tmp_path / "pairs.parquet")
    scored = str(tmp_path / "scored.parquet")
    score(ScoreConfig(inputs=(str(tmp_path / "pairs.parquet"),), output=scored, policy=tiny_policy,
                      ref=tiny_ref, progress=False))
    cfg = TrainConfig(inputs=(scored,), output=str(tmp_path / "model"), policy=tiny_policy, lr=1e-3,
                      batch_size=1, micro_batch=1,
                      progress=False, dtype="float32", save_steps=2)
    train(replace(cfg, output=str(tmp_path / "straight")))
    reference = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]

    def stop_at(step):
        def hook(record):
            if record["step"] == step:
                raise KeyboardInterrupt
        return hook

    work = tmp_path / "model.partial"
    with pytest.raises(KeyboardInterrupt):
        train(cfg, on_step=stop_at(2))
    shutil.copytree(work / "checkpoint", tmp_path / "at-step-2")
    with pytest.raises(KeyboardInterrupt):
        train(replace(cfg, resume=True), on_step=stop_at(4))
    assert json.loads((work / "checkpoint" / "state.json").read_text())["step"] == 4
    (work / "checkpoint").rename(work / "checkpoint.tmp")
    (tmp_path / "at-step-2").rename(work / "checkpoint.old")

    steps = []
    summary = train(replace(cfg, resume=True), on_step=lambda record: steps.append(record["step"]))
    assert steps == [4, 5] and summary.steps == 6
    resumed = [json.loads(x) for x in (tmp_path / "model" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed] == list(range(6))
    for key in ("loss", "reward_margin", "grad_norm", "lr"):
        np.testing.assert_allclose([r[key] for r in resumed], [r[key] for r in reference], rtol=1e-6, atol=1e-7)
