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
    from sera_cli.commands.app import app

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

    from sera_cli.commands.app import app

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


LAYERS = ("commands", "stages", "parallel", "backends", "data")  # top to bottom; trainers/ below them all


def _sera_imports(root=None):
    """(module, line, imported module) for every sera_cli import in sera_cli/, lazy ones included."""
    import ast
    from pathlib import Path

    root = root or Path(__file__).resolve().parents[1] / "sera_cli"
    modules = {".".join(p.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__"): p
               for p in sorted(root.rglob("*.py"))}
    found = []
    for mod, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                         for a in node.names if (node.module, a.name) != ("sera_cli", "__version__")]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            found += [(mod, node.lineno, n) for n in names if n.split(".")[0] == "sera_cli"]
    return modules, found


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def upward_imports(root=None) -> list[str]:
    """Imports from a lower layer to a higher one, or from a layer to the package face (`sera_cli` itself)."""
    _, found = _sera_imports(root)
    bad = []
    for mod, line, target in found:
        me, it = _layer(mod), _layer(target)
        if me is None:
            continue
        if (it is not None and it < me) or (target == "sera_cli" and mod.split(".")[1] != "commands"):
            bad.append(f"{mod}:{line} imports {target}")
    return bad


def import_circles(root=None) -> list[list[str]]:
    """Groups of modules that import each other, directly or through others (Tarjan's strongly connected
    components of the import graph, lazy imports included)."""
    import sys

    modules, found = _sera_imports(root)
    graph = {m: sorted({t for s, _, t in found if s == m and t in modules and t != m}) for m in modules}
    index, low, stack, on, circles, counter = {}, {}, [], set(), [], [0]
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                circles.append(sorted(group))

    for v in graph:
        if v not in index:
            visit(v)
    return circles


def test_imports_point_down_only():
    """commands -> stages -> parallel -> backends -> data -> trainers: no module imports a layer above its own
    (ARCHITECTURE.md), and no import circle exists."""
    assert upward_imports() == []
    assert import_circles() == []


def test_the_layer_check_fails_on_an_upward_import(tmp_path):
    import shutil
    from pathlib import Path

    copy = tmp_path / "sera_cli"
    shutil.copytree(Path(__file__).resolve().parents[1] / "sera_cli", copy)
    target = copy / "data" / "hashing.py"
    target.write_text(target.read_text() + "\n\ndef _late():\n    from sera_cli.stages.score.config import ScoreConfig\n")
    line = target.read_text().count("\n")
    assert upward_imports(copy) == [f"sera_cli.data.hashing:{line} imports sera_cli.stages.score.config"]
    assert import_circles(copy) == []
    loop = copy / "backends" / "hub.py"  # models imports hub; hub importing models closes a circle
    loop.write_text(loop.read_text() + "\n\ndef _loop():\n    from sera_cli.backends.models import resolve\n")
    assert any({"sera_cli.backends.hub", "sera_cli.backends.models"} <= set(c) for c in import_circles(copy))


def test_losses_and_rewards_are_named_only_by_the_trainer():
    """Whether a loss or reward needs a reference is `trainers.losses`' to say (`LossSpec.needs_ref`,
    `REWARDS`): no string constant naming the reference-free one appears in sera_cli/."""
    import ast
    from pathlib import Path

    from trainers.losses import LOSSES, REWARDS

    free = {name for name, spec in {**LOSSES, **REWARDS}.items() if not spec.needs_ref}
    root = Path(__file__).resolve().parents[1] / "sera_cli"
    hits = [f"{p.relative_to(root.parent)}:{node.lineno}" for p in sorted(root.rglob("*.py"))
            for node in ast.walk(ast.parse(p.read_text()))
            if isinstance(node, ast.Constant) and node.value in free]
    assert free == {"simpo"} and hits == []
