"""Benchmark: `select` + `mix` on 1,000,000 synthetic scored pairs (target: under 10 s on a 2-core CPU).

Run: .venv/bin/python tests/bench/curate.py [--rows 1000000]

Stages, timed through the library calls the CLI makes (Parquet read and write included):
  select: top 0.7 of N offline scored pairs by IRM           -> 0.7 N rows
  mix:    those + 0.4 N generated pairs (1% repeat offline ones), k1 0.7, k2 0.3, N from provenance
Baseline, in the same process: reading and writing the same Parquet bytes with no selection logic
(the I/O floor). Also timed, outside the target: `select --pairs` on N scored candidates (4 per prompt),
and the whole `sera select` command line in a subprocess (start-up included).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sera_cli.data import provenance
from sera_cli.stages.mix import MixConfig, mix
from sera_cli.stages.select.api import SelectConfig, select

TARGET_S = 10.0


def texts(prefix: str, ids: np.ndarray, width: int) -> pa.Array:
    pad = "x" * width
    return pa.array([f"{prefix} {i} {pad}" for i in ids.tolist()], pa.string())


def scored_pairs(n: int, seed: int, prefix: str) -> pa.Table:
    rng = np.random.default_rng(seed)
    idx = np.arange(n)
    lp = rng.normal(-120, 30, (4, n))
    beta = 0.1
    rc, rr = beta * (lp[0] - lp[2]), beta * (lp[1] - lp[3])
    return pa.table({
        "prompt": texts(f"{prefix} prompt", idx // 2, 60), "chosen": texts(f"{prefix} chosen", idx, 100),
        "rejected": texts(f"{prefix} rejected", idx, 100), "id": pa.array([f"{prefix}{i:015x}" for i in rng.permutation(n)]),
        "logp_policy_chosen": lp[0], "logp_policy_rejected": lp[1], "logp_ref_chosen": lp[2],
        "logp_ref_rejected": lp[3], "ntok_chosen": rng.integers(5, 300, n), "ntok_rejected": rng.integers(5, 300, n),
        "reward_chosen": rc, "reward_rejected": rr, "irm": np.round(rc - rr, 3), "truncated": rng.random(n) < 0.01})


def candidates(n: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    idx = np.arange(n)
    return pa.table({"prompt_id": pa.array([f"p{i}" for i in (idx // 4).tolist()]),
                     "prompt": texts("prompt", idx // 4, 60), "response": texts("response", rng.integers(0, n, n), 100),
                     "sample_idx": idx % 4, "logp_policy": rng.normal(-120, 30, n), "logp_ref": rng.normal(-120, 30, n),
                     "ntok": rng.integers(5, 300, n), "reward": np.round(rng.normal(0, 1, n), 2),
                     "truncated": rng.random(n) < 0.01})


CPU: list[float] = []


def timed(fn, *args):
    """Wall seconds and the result; the process CPU seconds go to CPU (a check on a machine shared with
    other work: on an idle 2-core machine, wall time lies between CPU / 2 and CPU)."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn(*args)
    CPU.append(time.process_time() - c0)
    return time.perf_counter() - t0, out


def io_floor(offline: Path, generated: Path, kept: int, mixed: int, tmp: Path) -> float:
    """Read and write what select and mix read and write, with no selection in between."""
    t0 = time.perf_counter()
    t = pq.read_table(offline)
    pq.write_table(t.slice(0, kept), tmp / "floor1.parquet")
    a, b = pq.read_table(tmp / "floor1.parquet"), pq.read_table(generated)
    both = pa.concat_tables([a, b.slice(0, mixed - a.num_rows)], promote_options="permissive")
    pq.write_table(both, tmp / "floor2.parquet")
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    rows = parser.parse_args().rows
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        t0 = time.perf_counter()
        offline = scored_pairs(rows, 0, "o")
        gen = scored_pairs(rows * 4 // 10, 1, "g")
        dup = offline.take(np.arange(0, rows, 100)[: gen.num_rows // 100])   # 1% of generated repeat offline pairs
        gen = pa.concat_tables([gen.slice(dup.num_rows), dup.select(gen.column_names)])
        prov = {"stage": "score", "parents": [{"stage": "convert", "source_rows": rows}]}
        pq.write_table(provenance.attach(offline, prov), tmp / "scored.parquet")
        pq.write_table(provenance.attach(gen, {"stage": "select"}), tmp / "generated.parquet")
        pq.write_table(candidates(rows, 2), tmp / "candidates.parquet")
        print(f"data: {rows:,} offline scored pairs, {gen.num_rows:,} generated pairs, {rows:,} candidates "
              f"(built in {time.perf_counter() - t0:.1f} s)")
        del offline, gen, dup

        floor = io_floor(tmp / "scored.parquet", tmp / "generated.parquet", rows * 7 // 10, rows, tmp)
        t_sel, s = timed(select, SelectConfig(inputs=(str(tmp / "scored.parquet"),), top=0.7,
                                              output=str(tmp / "selected.parquet")))
        t_mix, m = timed(mix, MixConfig(offline=str(tmp / "selected.parquet"),
                                        generated=str(tmp / "generated.parquet"), output=str(tmp / "train.parquet")))
        t_pairs, p = timed(select, SelectConfig(inputs=(str(tmp / "candidates.parquet"),), pairs=True, top=0.3,
                                                output=str(tmp / "pairs.parquet")))
        cmd = [sys.executable, "-m", "sera_cli", "select", str(tmp / "scored.parquet"), "--top", "0.7",
               "-o", str(tmp / "cli.parquet")]
        t_cli, done = timed(subprocess.run, cmd)
        assert done.returncode == 0
        total = t_sel + t_mix
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(f"select top 0.7:      {t_sel:6.2f} s  ({s.rows_in:,} -> {s.rows_out:,} rows; CPU {CPU[0]:.2f} s)")
        print(f"mix k1 0.7, k2 0.3:  {t_mix:6.2f} s  ({m.rows:,} rows, {m.plan.duplicates:,} duplicates dropped; "
              f"CPU {CPU[1]:.2f} s)")
        print(f"select + mix:        {total:6.2f} s  (target < {TARGET_S:.0f} s: {'met' if total < TARGET_S else 'MISSED'}; "
              f"CPU {CPU[0] + CPU[1]:.2f} s; load average {load:.1f} on {os.cpu_count()} cores)")
        print(f"I/O floor:           {floor:6.2f} s  (select + mix / floor = {total / floor:.2f}x)")
        print(f"select --pairs:      {t_pairs:6.2f} s  ({rows:,} candidates -> {p.pairs.pairs:,} pairs, kept {p.rows_out:,})")
        print(f"sera select (CLI):   {t_cli:6.2f} s  (process start-up included)")


if __name__ == "__main__":
    main()
