"""Numbers are finite or refused: the one check that every command option and every config value goes through.

A float option or setting must be finite (NaN and +/-inf are refused: `--beta inf` would make every IRM NaN,
`--max-grad-norm nan` every weight), unless it is listed in `NON_FINITE_OK` with the meaning it gives infinity.
An integer must be within +/-2^53, the largest range that every place a setting goes holds exactly (a JSON
reader's doubles, DuckDB, numpy's int64, torch); a seed must be in [0, 2^53]. `number_problem` says what is
wrong with one value; the CLI edge (`checked_command.CheckedCommand`), the run config (`pipeline.config`) and
the stage configs (`config_problems`) collect every problem and report them all at once.
"""

from __future__ import annotations

import math
from typing import Any

INT_MAX = 2**53  # and -2**53
SEED_MAX = 2**53
# option/setting names (underscored) for which an infinite value has a documented meaning; none today
NON_FINITE_OK: frozenset[str] = frozenset()


def number_problem(name: str, value: Any) -> str | None:
    """What is wrong with `value` given for setting `name` (its parameter name, underscored), or None.

    Lists and tuples are checked element by element; other types pass (their own parsing checks them)."""
    if isinstance(value, list | tuple):
        return next((p for v in value if (p := number_problem(name, v))), None)
    if isinstance(value, bool):
        return None
    if isinstance(value, float):
        if math.isnan(value) or (math.isinf(value) and name not in NON_FINITE_OK):
            return f"{value} is not a finite number"
        return None
    if isinstance(value, int):
        if name == "seed" and not 0 <= value <= SEED_MAX:
            return f"{value} is not a seed in [0, 2^53]"
        if not -INT_MAX <= value <= INT_MAX:
            return f"{value} is beyond 2^53, the largest integer held exactly everywhere"
    return None


def config_problems(config) -> list[str]:
    """`number_problem` of every field of a dataclass config (a stage's settings given through the Python API,
    where no option parsing checked them), as '--name: problem'."""
    from dataclasses import fields

    return [f"--{f.name.replace('_', '-')}: {p}" for f in fields(config)
            if (p := number_problem(f.name, getattr(config, f.name))) is not None]


def raw_problem(name: str, annotation: object, value: Any) -> str | None:
    """`number_problem` of a value as given (a flag's text, a config file's value), before the option's own
    conversion and range checks, which would call NaN "not >= 0" and pass it where no range is set."""
    if isinstance(value, list | tuple):
        return next((p for v in value if (p := raw_problem(name, annotation, v))), None)
    if isinstance(value, str) and annotation in (float, int):
        try:
            value = annotation(value.strip())
        except ValueError:
            return None  # not a number at all: the option's own parsing says so
    return number_problem(name, value)


def option_problem(ctx, param, value: Any) -> str | None:
    """One text for a parameter's number problem, naming the option as the user spelt it and, when the value
    came from a `--config` file, that file; None when there is none."""
    annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)
    problem = raw_problem(param.name, annotation, value) if value is not None else None
    if problem is None:
        return None
    flag = max(param.opts, key=len) if getattr(param, "opts", None) else param.name
    source = ctx.get_parameter_source(param.name)
    where = ""
    if source is not None and source.name == "DEFAULT_MAP" and ctx.params.get("config_file"):
        where = f" (from {ctx.params['config_file']})"
    return f"{flag}: {problem}{where}"
