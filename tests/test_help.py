"""Help that reads as one program: every command's `--help` shows values in Typer's own placeholder style
(`<str>`, `<float>`, `<int range>`, `<a|b|c>`), fixed choices as choices, and a `--config` example that names only
the command's own options."""

from __future__ import annotations

import re
from typing import get_args

import pytest
import typer.main
from typer.testing import CliRunner

from sera_cli.commands.app import app

runner = CliRunner()
ROOT = typer.main.get_command(app)
COMMANDS = sorted(ROOT.commands)
TYPER_STYLE = re.compile(r"^<[a-z0-9_.|\[\], -]+>(\.\.\.)?$")  # <str>, <int range>, <list[str]>, <auto|hh>...
CLICK_STYLE = re.compile(r"(?:--[a-z0-9-]+|\{[a-z_]+\}|\[[a-z_]+\])\s+([A-Z][A-Z0-9_|/.:]+)(?=[\s\]]|$)", re.M)


def _help(name: str) -> str:
    r = runner.invoke(app, [name, "--help"], env={"COLUMNS": "300", "TERMINAL_WIDTH": "300"}, terminal_width=300)
    assert r.exit_code == 0, r.output
    return r.output


def test_every_command_is_walked():
    assert {"convert", "score", "merge", "select", "mix", "generate", "train", "run", "demo", "report", "inspect",
            "sql", "eval", "export"} <= set(COMMANDS)


@pytest.mark.parametrize("name", COMMANDS)
def test_placeholders_are_typers_own(name):
    cmd = ROOT.commands[name]
    ctx = cmd.make_context(name, ["--help"], resilient_parsing=True)
    for param in cmd.params:
        assert param.metavar is None, f"sera {name} {param.name}: metavar {param.metavar!r} (use Typer's own)"
        shown = param.display_type_rich(ctx)
        assert shown is None or TYPER_STYLE.match(shown), f"sera {name} {param.name}: placeholder {shown!r}"
    help_text = _help(name)
    assert not CLICK_STYLE.findall(help_text), f"sera {name}: {CLICK_STYLE.findall(help_text)}"
    usage = help_text.split("Usage: ", 1)[1].splitlines()[0]
    assert re.fullmatch(r"sera [a-z]+ \[OPTIONS\]( [{\[][a-z_]+[}\]](\.\.\.)?)*\s*", usage), usage


@pytest.mark.parametrize("name", [c for c in COMMANDS if any(p.name == "config_file" for p in
                                                             ROOT.commands[c].params)])
def test_config_example_names_the_commands_own_options(name):
    cmd = ROOT.commands[name]
    own = {o.removeprefix("--") for p in cmd.params for o in getattr(p, "opts", []) if o.startswith("--")}
    flat = " ".join(_help(name).replace("│", " ").split())
    found = re.search(r"--config <str> TOML file of option values \(e\.g\. (.+?)\); flags override it\.", flat)
    assert found, flat
    names = [item.split(" = ")[0] for item in found.group(1).split(", ")]
    assert names and all(n in own for n in names), f"sera {name} --config example names {names}; has {sorted(own)}"


def test_config_example_values_are_accepted(tmp_path):
    """The examples are TOML the command takes: each parses, and names a setting `read_config` knows."""
    import tomllib

    from sera_cli.commands.help_style import EXAMPLES

    for name, items in EXAMPLES.items():
        doc = tomllib.loads("\n".join(items))
        params = {p.name for p in ROOT.commands[name].params}
        assert all(k.replace("-", "_") in params for k in doc), (name, doc)


def test_fixed_choices_are_typed_as_choices():
    from sera_cli.commands.convert import FORMATS, LAYOUTS
    from sera_cli.data.layouts import READERS

    assert get_args(LAYOUTS) == ("auto", *READERS)
    assert get_args(FORMATS) == ("auto", "conversational", "standard")
    convert = ROOT.commands["convert"]
    ctx = convert.make_context("convert", ["--help"], resilient_parsing=True)
    shown = {p.name: p.display_type_rich(ctx) for p in convert.params}
    assert shown["layout"] == "<auto|hh|ultrafeedback|plain|implicit>"
    assert shown["format"] == "<auto|conversational|standard>"
    fixed = {("score", "reward"): "<dpo|ipo|simpo>", ("score", "prev_missing"): "<error|current>",
             ("generate", "engine"): "<auto|hf|vllm>", ("generate", "reward"): "<dpo|ipo|simpo>",
             ("eval", "mode"): "<pairwise|single>", ("eval", "turns"): "<first|all>",
             ("eval", "engine"): "<auto|hf|vllm>", ("train", "schedule"): "<linear|cosine|constant>"}
    for (name, param), want in fixed.items():
        cmd = ROOT.commands[name]
        ctx = cmd.make_context(name, ["--help"], resilient_parsing=True)
        assert next(p for p in cmd.params if p.name == param).display_type_rich(ctx) == want, (name, param)
    from sera_cli.commands import run
    from sera_cli.stages.run.config import METHODS
    from trainers.losses import LOSSES

    assert set(get_args(run.Method)) == set(METHODS) and get_args(run.Loss) == tuple(LOSSES)
    r = runner.invoke(app, ["eval", "--policy", "a", "--baseline", "b", "--prompts", "q.jsonl", "--judge", "j",
                            "--mode", "both", "-o", "out"])
    assert r.exit_code == 2 and "'both' is not one of 'pairwise', 'single'" in " ".join(
        r.output.replace("│", " ").split())


def test_one_rule_for_default_outputs():
    """Every command that writes a table writes it to stdout unless -o names a file."""
    for name in ("convert", "score", "merge", "select", "mix", "generate", "export"):
        output = next(p for p in ROOT.commands[name].params if p.name == "output")
        assert output.default == "-", (name, output.default)
