"""A long job under a scheduler or `nohup` (stderr not a terminal) prints a progress line every N seconds."""

from __future__ import annotations

import os
import re
import subprocess
import sys

SERA = [sys.executable, "-m", "sera_cli"]
LINE = re.compile(r"^\[\d\d:\d\d:\d\d\] log-probs of policy \S+ \+ reference \S+: [\d,]+/[\d,]+ tokens \(\d+%\), \d+ s")


def score(pairs_file, policy, ref, out, every: str):
    env = {**os.environ, "SERA_LOG_EVERY": every}
    return subprocess.run(SERA + ["score", pairs_file, "--policy", policy, "--ref", ref, "-o", str(out)],
                          env=env, capture_output=True, text=True)


def test_non_terminal_runs_print_periodic_progress_lines(tmp_path, pairs_file, tiny_policy, tiny_ref):
    proc = score(pairs_file, tiny_policy, tiny_ref, tmp_path / "a.parquet", "0")
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if LINE.match(line)]
    assert lines and "(100%)" in lines[-1], proc.stderr
    assert f"log-probs of policy {tiny_policy} + reference {tiny_ref}: " in lines[-1]  # the models, by name
    assert re.search(r"  rate [\d,]+ tokens/s$", lines[-1]), lines[-1]  # the count's unit, and no rows/s
    done, total = re.search(r": ([\d,]+)/([\d,]+) tokens \(100%\)", lines[-1]).groups()
    assert done == total and int(total.replace(",", "")) > 6 * 2  # tokens of 6 pairs, not rows
    quiet = score(pairs_file, tiny_policy, tiny_ref, tmp_path / "b.parquet", "3600")
    assert quiet.returncode == 0 and not any(LINE.match(line) for line in quiet.stderr.splitlines())


def test_train_progress_shows_pairs_and_tokens_per_second(monkeypatch, capsys):
    from sera_cli.stages.train.api import progress_bar

    monkeypatch.setenv("SERA_LOG_EVERY", "0")
    with progress_bar(True, 2, 0) as show:
        show({"loss": 0.69, "reward_accuracy": 0.5, "pairs": 4, "tokens": 100, "seconds": 0.5})
        show({"loss": 0.6, "reward_accuracy": 1.0, "pairs": 4, "tokens": 300, "seconds": 1.5})
    last = [line for line in capsys.readouterr().err.splitlines() if line.strip()][-1]
    assert re.match(r"^\[\d\d:\d\d:\d\d\] training: 2/2 steps \(100%\), \d+ s", last), last
    assert last.endswith("loss 0.6000  acc 1.00  speed 4.0 pairs/s  200 tokens/s"), last


def test_log_lines_do_not_wrap_outside_a_terminal(capsys):
    from sera_cli.data.console import console

    line = "iter-1/reference " + "reference log-probs of pi_0 on the training rows " * 4
    console.print(line)
    assert capsys.readouterr().err == line + "\n"


def test_a_finished_bar_leaves_no_empty_line_in_a_log(monkeypatch, capsys):
    from rich.progress import BarColumn, TextColumn

    from sera_cli.data.console import Progress, console

    monkeypatch.setenv("SERA_LOG_EVERY", "0")
    console.print("before")
    with Progress(TextColumn("{task.description}"), BarColumn(), console=console) as bar:
        task = bar.add_task("counting", total=2, unit="rows")
        bar.update(task, advance=2)
    console.print("after")
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "before" and lines[-1] == "after" and "" not in lines
    assert lines[1].endswith("counting: 2/2 rows (100%), 0 s"), lines
