"""The `sera` command: a Typer app whose commands live in `sera_cli/commands/<name>.py`.

Each command module has `register(app)`; `COMMANDS` lists them explicitly, in help order, so a missing module
is an import error here rather than a command that silently disappears. Domain errors become one line on
stderr and a non-zero exit here, once; `SERA_DEBUG=1` shows the traceback instead.
"""

from __future__ import annotations

import sys

import typer
from typer.core import TyperCommand

from sera_cli import __version__
from sera_cli.commands.checked_command import checked
from sera_cli.commands.help_style import with_config_example

app = typer.Typer(
    name="sera",
    help="Curate preference data with SeRA: score implicit rewards, select pairs, bootstrap, mix and train.\n\n"
         "Every stage reads and writes Parquet ('-' is stdin/stdout), so stages chain in shell pipelines.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        print(f"sera {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """sera: SeRA preference-data curation."""


from sera_cli.commands import (  # noqa: E402  (the app above is what the modules register on)
    convert,
    eval,
    export,
    generate,
    inspect,
    merge,
    mix,
    report,
    run,
    score,
    select,
    sql,
    train,
)

COMMANDS = (convert, score, merge, select, mix, generate, train, run, report, inspect, sql, eval, export)
for _command in COMMANDS:
    _command.register(app)
for _info in app.registered_commands:  # every parsed number is finite and in range, or a usage error (numbers.py)
    _info.cls = checked(_info.cls)
for _info in app.registered_commands:  # --config's help example names the command's own options (help_style.py)
    _info.cls = with_config_example(_info.cls or TyperCommand)


def main() -> None:
    """The `sera` entry point. A usage error (unknown option, bad value, missing argument) is one line on stderr
    with exit code 2, like every other error, instead of a boxed usage text."""
    from typer.exceptions import TyperException

    try:
        code = app(standalone_mode=False)
    except TyperException as err:
        message = err.format_message() if hasattr(err, "format_message") else str(err)
        if not message:  # `sera` alone: the help, as Typer prints it
            app()
            return
        ctx = getattr(err, "ctx", None)
        command = ctx.command_path if ctx is not None else "sera"
        sys.stderr.write(f"error: {message} (see '{command} --help')\n")
        sys.exit(getattr(err, "exit_code", 2))
    except typer.Abort:
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    if isinstance(code, int) and code:
        sys.exit(code)
