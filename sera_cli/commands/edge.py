"""The error edge of every command: domain errors, failed writes and Ctrl-C become one line on stderr and an exit
code, once; `SERA_DEBUG=1` shows the traceback instead."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable

import typer

from sera_cli.data.errors import SeraError, first_line


def guarded(fn: Callable) -> Callable:
    """Map domain errors to one stderr line and exit code; a failed write (an `OSError` no stage turned into a
    domain error) to one line naming the path and the cause; Ctrl-C to exit 130 with a hint that names
    `--resume` only when the command has it."""
    import inspect

    resumable = "resume" in inspect.signature(fn).parameters
    hint = "rerun with --resume to keep finished work" if resumable else "rerun the same command"

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SeraError as err:
            if os.environ.get("SERA_DEBUG") == "1":
                raise
            if not getattr(err, "silent", False):  # another rank of a launch prints the one line
                sys.stderr.write(f"error: {err}\n")
            raise typer.Exit(err.exit_code) from None
        except OSError as err:
            if os.environ.get("SERA_DEBUG") == "1":
                raise
            where = f"{err.filename}: " if err.filename else ""
            sys.stderr.write(f"error: {where}{err.strerror or first_line(err)} (SERA_DEBUG=1 shows where)\n")
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            sys.stderr.write(f"interrupted: no output was written; {hint}\n")
            raise typer.Exit(130) from None
        finally:
            if "sera_cli.data.tables" in sys.modules:  # (not imported by `sera --help`): the noted inputs were this command's
                sys.modules["sera_cli.data.tables"].forget_noted_inputs()

    return wrapper
