"""Options with fixed choices: a wrong value is one line listing the choices; TRL's spellings are accepted."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from sera_cli.app import app
from sera_cli.options import check_device, check_dtype

runner = CliRunner()


@pytest.mark.parametrize("command", [
    ["score", "x.parquet", "--policy", "p", "--ref", "r", "-o", "o.parquet", "--dtype", "fp17"],
    ["score", "x.parquet", "--policy", "p", "--ref", "r", "-o", "o.parquet", "--device", "gpu"],
    ["generate", "x.parquet", "--policy", "p", "-o", "o.parquet", "--dtype", "fp17"],
    ["train", "x.parquet", "--policy", "p", "-o", "out", "--dtype", "fp17"],
    ["train", "x.parquet", "--policy", "p", "-o", "out", "--device", "gpu"],
    ["run", "x.parquet", "--dtype", "fp17"],
    ["run", "x.parquet", "--device", "tpu"],
])
def test_a_wrong_choice_is_refused_before_any_work_with_the_choices_listed(command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, command)
    assert r.exit_code == 2
    assert "is not one of auto" in r.output and ("float32" in r.output or "cuda" in r.output)
    assert not any(tmp_path.iterdir())  # nothing written


def test_trl_and_vllm_spellings_map_to_the_canonical_dtype():
    assert [check_dtype(v) for v in ("bf16", "fp16", "FP32", "half", "bfloat16", None)] == \
        ["bfloat16", "float16", "float32", "float16", "bfloat16", None]
    assert check_device("cuda:1") == "cuda:1" and check_device("CPU") == "cpu"
    with pytest.raises(typer.BadParameter):
        check_device("gpu")


def test_parquet_is_never_written_to_a_terminal(tmp_path):
    """`-o -` with stdout a terminal: refused before any work, one line saying how to pipe or redirect."""
    import os
    import pty
    import sys

    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["a"], "chosen": ["b"], "rejected": ["c"]}), src)
    pid, fd = pty.fork()
    if pid == 0:  # the child: stdout and stderr are the terminal
        os.execv(sys.executable, [sys.executable, "-m", "sera_cli", "select", str(src), "--top", "1", "-o", "-"])
    out = b""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    _, status = os.waitpid(pid, 0)
    text = out.decode(errors="replace").strip()
    assert os.waitstatus_to_exitcode(status) != 0
    assert text.startswith("error: -: standard output is a terminal") and "PAR1" not in text, text
