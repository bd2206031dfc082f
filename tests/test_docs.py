"""The documentation stays true to the code: every relative link in README.md and docs/*.md reaches an existing
file (and heading), and every `sera ...` command they show names a real command with options it has.

Commands come from the console script entry point, so a renamed option or command fails here, not in a reader's
shell. Shell snippets are read as a shell would split them: line continuations, quotes spanning lines, comments,
pipes, `&&`, `;`, redirects, environment assignments and `python -m sera_cli` / `accelerate launch -m sera_cli`.
"""

from __future__ import annotations

import importlib.metadata
import re
import shlex
import sys
import tomllib
from pathlib import Path

import pytest
import typer

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_FENCES = {"", "bash", "sh", "shell", "console", "zsh"}  # ```text, ```python and the like are not commands
SEPARATORS = {"|", "||", "&&", ";", "&", "(", ")", ";;"}
REDIRECTS = {">", ">>", "<", ">&", "&>", "<<", "2>"}
PREFIX_WORDS = {"do", "then", "else", "time", "nohup", "exec", "!", "{", "/usr/bin/time", "-v"}

FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*).*?\n(.*?)^\1\2\s*$", re.M | re.S)
CODE_SPAN = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$")


# --- Markdown ---------------------------------------------------------------------------------------------------

def split_fences(text: str) -> tuple[list[tuple[str, str]], str]:
    """The fenced blocks as (language, body), and the text with them blanked out (line count kept)."""
    blocks = [(m.group(3).lower(), m.group(4)) for m in FENCE.finditer(text)]
    prose = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    return blocks, prose


def code_spans(prose: str) -> list[str]:
    """The inline code spans of text outside fenced blocks, whitespace runs (line breaks) folded to one space."""
    return [" ".join(m.group(2).split()) for m in CODE_SPAN.finditer(prose)]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: link text kept, lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file, repeats numbered `-1`, `-2`, ... as GitHub numbers them."""
    _, prose = split_fences(path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    found = set()
    for line in prose.splitlines():
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def relative_links(path: Path) -> list[str]:
    """Link targets in prose (not in code), leaving out web addresses and mail links."""
    _, prose = split_fences(path.read_text(encoding="utf-8"))
    prose = CODE_SPAN.sub("code", prose)
    return [t for t in LINK.findall(prose) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


def link_problem(page: Path, target: str) -> str | None:
    """Why a relative link from `page` does not resolve, or None."""
    file_part, _, anchor = target.partition("#")
    dest = (page.parent / file_part).resolve() if file_part else page
    if not dest.exists():
        return f"{page.relative_to(ROOT)}: link {target!r}: no file {file_part!r}"
    if anchor:
        if dest.suffix != ".md":
            return f"{page.relative_to(ROOT)}: link {target!r}: an anchor into a file that is not Markdown"
        if anchor not in anchors(dest):
            return f"{page.relative_to(ROOT)}: link {target!r}: {dest.relative_to(ROOT)} has no heading with that anchor"
    return None


# --- Shell snippets ---------------------------------------------------------------------------------------------

def logical_lines(block: str) -> list[str]:
    """A block's commands: backslash-newlines joined, and a line whose quote is still open joined to the next."""
    lines, pending = [], ""
    for line in block.replace("\\\n", " ").splitlines():
        pending = f"{pending}\n{line}" if pending else line
        try:
            shlex.split(pending, comments=True)
        except ValueError:  # a quote spans lines (a multi-line SQL query)
            continue
        lines.append(pending)
        pending = ""
    if pending:
        lines.append(pending)
    return lines


def segments(line: str) -> list[list[str]]:
    """One command line split into simple commands at pipes, `&&`, `;` and `&`; redirects and comments dropped."""
    lex = shlex.shlex(line, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    out, current, tokens = [], [], list(lex)
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token in SEPARATORS:
            out.append(current)
            current = []
        elif token in REDIRECTS:
            i += 1  # and its target
        else:
            current.append(token)
        i += 1
    out.append(current)
    return [s for s in out if s]


def sera_args(words: list[str]) -> list[str] | None:
    """The arguments after `sera` (or `-m sera_cli`) when this simple command runs sera, else None."""
    while words and (re.match(r"[A-Za-z_][A-Za-z0-9_]*=", words[0]) or words[0] in PREFIX_WORDS):
        words = words[1:]  # environment assignments, `do`, `time`, ...
    if not words:
        return None
    if Path(words[0]).name == "sera":
        return words[1:]
    if "-m" in words:
        at = words.index("-m")
        if words[at + 1:at + 2] == ["sera_cli"]:  # python -m, accelerate launch ... -m, torchrun ... -m
            return words[at + 2:]
    return None


def snippet_commands(text: str) -> list[list[str]]:
    """Every sera invocation (its arguments) shown in a Markdown text, in fenced shell blocks and code spans."""
    blocks, prose = split_fences(text)
    lines = [line for lang, body in blocks if lang in SHELL_FENCES for line in logical_lines(body)]
    lines += [span for span in code_spans(prose) if re.search(r"\bsera\b|sera_cli", span)]
    found = []
    for line in lines:
        try:
            parts = segments(line)
        except ValueError:
            if re.match(r"\s*sera\s", line):
                raise AssertionError(f"cannot split this command as a shell would: {line!r}") from None
            continue
        found += [args for words in parts if (args := sera_args(words))]
    return found


# --- The commands the app has -----------------------------------------------------------------------------------

def sera_app() -> typer.Typer:
    """The Typer app behind the `sera` console script (the entry point names `main`; the app is beside it).

    The installed entry point is used when it imports; an editable install made from another checkout can name a
    module this checkout does not have, and then this checkout's own `[project.scripts]` declaration is loaded."""
    try:
        target = importlib.metadata.entry_points(group="console_scripts")["sera"].load()
    except (KeyError, ImportError):
        spec = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]["sera"]
        target = importlib.metadata.EntryPoint(name="sera", value=spec, group="console_scripts").load()
    return target if isinstance(target, typer.Typer) else sys.modules[target.__module__].app


def option_names(command) -> set[str]:
    names = {"--help"}
    for param in command.params:
        if param.param_type_name == "option":
            names.update(param.opts, param.secondary_opts)
    return names


def command_problem(args: list[str], group) -> str | None:
    """Why `sera ARGS` names no command or an option its command lacks, or None."""
    args = [a.strip("[]") for a in args]
    args = [a for a in args if a and a != "..." and not a.endswith("...")]  # placeholders: [--x 1], SHARD...
    if not args:
        return None
    if args[0].startswith("-"):
        command, rest = group, args
    elif args[0] in group.commands:
        command, rest = group.commands[args[0]], args[1:]
    else:
        return f"no command {args[0]!r}"
    known = option_names(command)
    for word in rest:
        is_option = word.startswith("--") or re.fullmatch(r"-[A-Za-z]", word)
        if is_option and word.split("=", 1)[0] not in known:
            name = "sera" if command is group else f"sera {args[0]}"
            return f"{name} has no option {word.split('=', 1)[0]!r}"
    return None


# --- The tests --------------------------------------------------------------------------------------------------

def test_the_pages_exist():
    assert (ROOT / "docs" / "README.md").exists()
    assert len(PAGES) > 5


def test_every_relative_link_resolves(capsys):
    checked, problems = 0, []
    for page in PAGES:
        for target in relative_links(page):
            checked += 1
            if (problem := link_problem(page, target)) is not None:
                problems.append(problem)
    with capsys.disabled():
        print(f"\ntest_docs: {checked} relative links checked in {len(PAGES)} pages")
    assert checked > 40, "the link scan found almost nothing: the pattern is broken"
    assert not problems, "\n".join(problems)


def test_every_sera_command_shown_exists_with_its_options(capsys):
    group = typer.main.get_command(sera_app())
    checked, problems = 0, []
    for page in PAGES:
        for args in snippet_commands(page.read_text(encoding="utf-8")):
            checked += 1
            if (problem := command_problem(args, group)) is not None:
                problems.append(f"{page.relative_to(ROOT)}: sera {' '.join(args)}\n    {problem}")
    with capsys.disabled():
        print(f"\ntest_docs: {checked} sera commands checked in {len(PAGES)} pages")
    assert checked > 80, "the command scan found almost nothing: the parser is broken"
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(("snippet", "expected"), [
    ("sera score a.parquet --policy p/ \\\n  --ref r/ -o s.parquet  # comment --bogus",
     [["score", "a.parquet", "--policy", "p/", "--ref", "r/", "-o", "s.parquet"]]),
    ("sera sql \"SELECT 1\n  FROM t\" t.parquet | sera select - --top 0.7", [["sql", "SELECT 1\n  FROM t", "t.parquet"],
                                                                          ["select", "-", "--top", "0.7"]]),
    ("for i in 0 1; do\n  CUDA_VISIBLE_DEVICES=$i sera score x --shard $i/2 &\ndone; wait",
     [["score", "x", "--shard", "$i/2"]]),
    ("accelerate launch --num_processes 8 -m sera_cli train m.parquet -o pi2/ && sera demo > out.txt",
     [["train", "m.parquet", "-o", "pi2/"], ["demo"]]),
])
def test_snippets_are_split_as_a_shell_would(snippet, expected):
    assert snippet_commands(f"```bash\n{snippet}\n```\n") == expected


def test_a_wrong_option_or_command_is_caught():
    group = typer.main.get_command(sera_app())
    assert command_problem(["score", "x", "--bogus-flag", "1"], group) == "sera score has no option '--bogus-flag'"
    assert command_problem(["scores", "x"], group) == "no command 'scores'"
    assert command_problem(["run", "--report-to", "...", "[--logging-dir", "DIR]"], group) is None


def test_github_slugs():
    assert slug("`sera run`: the SeRA loop, its baselines and the report") == \
        "sera-run-the-sera-loop-its-baselines-and-the-report"
    assert slug("Log-prob conventions (the same as TRL's DPOTrainer 1.16)") == \
        "log-prob-conventions-the-same-as-trls-dpotrainer-116"
