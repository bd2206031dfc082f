"""A long job under a scheduler or `nohup` (stderr not a terminal) prints a progress line every N seconds."""

from __future__ import annotations

import os
import re
import subprocess
import sys

SERA = [sys.executable, "-m", "sera_cli"]
LINE = re.compile(r"^\[\d\d:\d\d:\d\d\] scoring \(policy \+ ref\): \d+/\d+ \(\d+%\), \d+ s")


def score(pairs_file, policy, ref, out, every: str):
    env = {**os.environ, "SERA_LOG_EVERY": every}
    return subprocess.run(SERA + ["score", pairs_file, "--policy", policy, "--ref", ref, "-o", str(out)],
                          env=env, capture_output=True, text=True)


def test_non_terminal_runs_print_periodic_progress_lines(tmp_path, pairs_file, tiny_policy, tiny_ref):
    proc = score(pairs_file, tiny_policy, tiny_ref, tmp_path / "a.parquet", "0")
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if LINE.match(line)]
    assert lines and "(100%)" in lines[-1], proc.stderr
    quiet = score(pairs_file, tiny_policy, tiny_ref, tmp_path / "b.parquet", "3600")
    assert quiet.returncode == 0 and not any(LINE.match(line) for line in quiet.stderr.splitlines())
