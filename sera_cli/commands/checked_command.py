"""The class of every `sera` command: a Typer command whose numbers are checked as they are parsed.

`app.py` gives it to every registered command, so a new command or option is covered without a line of its own:
every parameter's value as given (a flag, a `--config` file value, a default) goes through
`sera_cli.data.numbers.raw_problem` before the option's own conversion and range checks, and all the problems are
reported at once as one usage error (exit 2).
"""

from __future__ import annotations

import typer
from typer.core import TyperCommand

from sera_cli.data.numbers import option_problem

_PROBLEMS = "sera.number_problems"


def _checked(param, process):
    def process_value(ctx, value):
        problem = option_problem(ctx, param, value)
        if problem is None:
            return process(ctx, value)
        ctx.meta.setdefault(_PROBLEMS, []).append(problem)
        return None  # reported with the others once parsing ends

    return process_value


class CheckedCommand(TyperCommand):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for param in self.params:
            param.process_value = _checked(param, param.process_value)

    def parse_args(self, ctx, args):
        ctx.meta[_PROBLEMS] = []
        rest = super().parse_args(ctx, args)
        if ctx.meta[_PROBLEMS]:
            raise typer.BadParameter("; ".join(ctx.meta[_PROBLEMS]), ctx=ctx)
        return rest


def checked(cls: type | None) -> type:
    """`cls` (a command's class; None or TyperCommand by default) with the checks of `CheckedCommand`."""
    if cls is None or cls is TyperCommand or issubclass(cls, CheckedCommand):
        return CheckedCommand
    return type(f"Checked{cls.__name__}", (CheckedCommand, cls), {})
