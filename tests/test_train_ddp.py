"""Two CPU processes under `accelerate launch` (DDP over gloo) repeat the loss curve of one process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import standard_table

from sera_cli.stages.train.api import train
from trainers import TrainConfig


def records(folder) -> list[dict]:
    return [json.loads(x) for x in Path(folder, "metrics.jsonl").read_text().splitlines()]


def test_two_processes_give_the_one_process_loss_curve(tmp_path, tiny_policy, tiny_ref):
    """6 pairs in steps of 3: each step splits 2 + 1 over the processes (one micro-batch per pair, so one
    process accumulates two and the other runs a weight-0 filler); each process computes the reference
    log-probs of its own rows. Losses, margins and gradient norms agree with one process within 1e-5."""
    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    if launcher is None:
        pytest.skip("accelerate's launcher is not installed")
    pairs = tmp_path / "pairs.parquet"
    pq.write_table(standard_table(), pairs)
    args = ["train", str(pairs), "--policy", tiny_policy, "--ref", tiny_ref, "--lr", "1e-3", "--batch-size", "3",
            "--micro-batch", "1", "--epochs", "2", "--dtype", "float32", "-q"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "sera_cli", *args,
                           "-o", str(tmp_path / "ddp")], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("trained 4 steps on 6 pairs") == 1  # one summary, from the main process
    # the world size is said before the work and recorded with the model
    assert proc.stderr.count("training on 2 processes (MULTI_CPU, cpu): effective batch 3 pairs per optimizer "
                             "step (up to 2 per process, micro-batches of 1)") == 1, proc.stderr[-2000:]
    sera = json.loads(Path(tmp_path / "ddp" / "sera.json").read_text())
    assert (sera["world_size"], sera["distributed_type"]) == (2, "MULTI_CPU")
    train(TrainConfig(inputs=(str(pairs),), output=str(tmp_path / "single"), policy=tiny_policy,
                      ref=tiny_ref, lr=1e-3, batch_size=3,
                      micro_batch=3, epochs=2, dtype="float32", progress=False))
    assert json.loads(Path(tmp_path / "single" / "sera.json").read_text())["world_size"] == 1
    ddp, single = records(tmp_path / "ddp"), records(tmp_path / "single")
    assert [r["pairs"] for r in ddp] == [3, 3, 3, 3]
    for key in ("loss", "reward_margin", "reward_accuracy", "grad_norm", "lr"):
        np.testing.assert_allclose([r[key] for r in ddp], [r[key] for r in single], atol=1e-5, err_msg=key)
    assert not (tmp_path / "ddp.partial").exists()
