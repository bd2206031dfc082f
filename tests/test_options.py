"""Options with fixed choices: a wrong value is one line listing the choices; TRL's spellings are accepted."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from sera_cli.commands.app import app
from sera_cli.commands.options import check_device, check_dtype

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


@pytest.mark.parametrize(("command", "titles"), [
    ("score", ("Input/output", "Models", "Reward", "Performance", "Resume & sharding")),
    ("generate", ("Input/output", "Models", "Sampling", "Reward", "Performance", "Resume & sharding")),
    ("train", ("Input/output", "Models", "Loss", "Optimisation", "Performance", "Resume & sharding")),
    ("run", ("Input/output", "Method", "Models", "Generation", "Performance", "Evaluation")),
])
def test_help_groups_options_in_panels_and_cuts_no_option_name_at_80_columns(command, titles):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TERMINAL_WIDTH"}
    done = subprocess.run([sys.executable, "-m", "sera_cli", command, "--help"], env={**env, "COLUMNS": "80"},
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert max(map(len, done.stdout.splitlines())) <= 80
    for title in titles:
        assert f"─ {title} ─" in done.stdout, title
    words = set(done.stdout.translate(str.maketrans("│,/", "   ")).split())
    params = typer.main.get_command(app).commands[command].params
    names = [opt for p in params for opt in (*p.opts, *p.secondary_opts) if opt.startswith("--")]
    assert len(names) > 20 and not [n for n in names if n not in words]  # each option's name whole
    assert "…" not in done.stdout


def test_config_file_gives_defaults_that_flags_override(tmp_path, monkeypatch):
    import json

    import pyarrow.parquet as pq

    from sera_cli.data import provenance

    raw, pairs, kept = tmp_path / "raw.jsonl", tmp_path / "pairs.parquet", tmp_path / "kept.parquet"
    raw.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}",
                                       "irm": float(i)}) + "\n" for i in range(10)))
    (tmp_path / "convert.toml").write_text("flip = 0.5\nseed = 3\n")
    r = runner.invoke(app, ["convert", str(raw), "--config", str(tmp_path / "convert.toml"), "--seed", "4",
                            "-o", str(pairs)])
    assert r.exit_code == 0, r.output
    settings = provenance.read(pq.read_table(pairs))["config"]
    assert (settings["flip"], settings["seed"]) == (0.5, 4)  # from the file, and the flag over the file
    (tmp_path / "select.toml").write_text('by = "irm"\ntop = 0.5\ndrop-ties = true\n')
    for flags, rows in (([], 5), (["--top", "0.3"], 3)):
        r = runner.invoke(app, ["select", str(pairs), "--config", str(tmp_path / "select.toml"), *flags,
                                "-o", str(kept)])
        assert r.exit_code == 0, r.output
        assert pq.read_metadata(kept).num_rows == rows
    (tmp_path / "bad.toml").write_text("k3 = 1\n")
    for command in (["select", str(pairs)], ["score", str(pairs)]):
        r = runner.invoke(app, [*command, "--config", str(tmp_path / "bad.toml"), "-o", str(kept)])
        assert r.exit_code == 2 and "unknown setting(s) k3 (known: " in r.output, r.output
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, ["convert", "raw.jsonl", "--config", "none.toml"])
    assert r.exit_code == 2 and "none.toml: no such config file" in r.output, r.output


def test_shell_completion_is_offered():
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0 and "--install-completion" in r.output and "--show-completion" in r.output
