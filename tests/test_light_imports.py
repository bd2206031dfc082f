"""Light commands (`sera --help`, convert, select, mix, sql, inspect) run with torch impossible to import."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pyarrow as pa
import pyarrow.parquet as pq

SCRIPT = textwrap.dedent("""
    import json, sys

    # As if not installed: `import torch` raises ModuleNotFoundError and find_spec("torch") is None.
    for name in ("torch", "transformers", "vllm", "peft", "trl"):
        sys.modules[name] = None
    from typer.testing import CliRunner
    from sera_cli.app import app

    runner = CliRunner()
    for args in json.loads(sys.argv[1]):
        r = runner.invoke(app, args)
        print(json.dumps({"args": args, "code": r.exit_code, "stderr": r.stderr[-400:],
                          "exception": repr(r.exception) if r.exit_code else None}))
    print(json.dumps({"heavy": sorted(m for m in ("torch", "transformers") if sys.modules.get(m) is not None)}))
""")


def test_light_commands_never_import_torch(tmp_path):
    raw = tmp_path / "raw.jsonl"
    raw.write_text("\n".join(json.dumps({"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"})
                             for i in range(10)) + "\n")
    pairs, scored, selected = (str(tmp_path / f"{n}.parquet") for n in ("pairs", "scored", "selected"))
    cands, gen, train = (str(tmp_path / f"{n}.parquet") for n in ("cands", "gen", "train"))
    table = pa.table({"prompt": [f"q{i}" for i in range(10)], "chosen": [f"good {i}" for i in range(10)],
                      "rejected": [f"bad {i}" for i in range(10)], "irm": [float(i) for i in range(10)]})
    pq.write_table(table, scored)
    pq.write_table(pa.table({"prompt_id": ["a", "a", "b", "b"], "prompt": ["x", "x", "y", "y"],
                             "response": ["r1", "r2", "r3", "r4"], "reward": [1.0, 0.0, 2.0, 0.5]}), cands)
    commands = [["--help"], *([c, "--help"] for c in ("convert", "select", "mix", "sql", "inspect")),
                ["convert", str(raw), "-o", pairs],
                ["select", scored, "--top", "0.7", "-o", selected],
                ["select", cands, "--pairs", "-o", gen],
                ["mix", "--offline", selected, "--generated", gen, "--n", "10", "--k2", "0.2", "-o", train],
                ["sql", "SELECT count(*) FROM train", train, "--json"],
                ["inspect", train, "--plot", str(tmp_path / "irm.png")]]
    done = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(commands)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    for r in results[:-1]:
        assert r["code"] == 0, r
    assert len(results) == len(commands) + 1 and results[-1] == {"heavy": []}


def test_each_light_command_help_has_an_example():
    from typer.testing import CliRunner

    from sera_cli.app import app

    for command in ("convert", "select", "mix", "sql", "inspect"):
        r = CliRunner().invoke(app, [command, "--help"])
        assert r.exit_code == 0 and f"Example: sera {command} " in r.stdout, command


def test_the_trainer_never_imports_the_cli():
    """`trainers/` is a leaf library: none of its modules imports `sera_cli` (checked on the source, so a lazy
    import inside a function counts too)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "trainers"
    found = []
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{path.name}: {n}" for n in names if n.split(".")[0] == "sera_cli"]
    assert found == []
