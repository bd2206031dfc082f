"""Domain errors. Library code (the trainer and sera_cli) raises these; the CLI edge prints them as one line and exits
non-zero."""

from __future__ import annotations


class SeraError(Exception):
    """An expected failure the user can fix. `str(err)` is the one line the user sees."""

    exit_code = 1


class InputError(SeraError):
    """Bad input data, located by file, row (0-based, as in the file) and column."""

    def __init__(self, file: str, problem: str, *, row: int | None = None, column: str | None = None,
                 hint: str | None = None):
        self.file, self.row, self.column, self.problem, self.hint = file, row, column, problem, hint
        where = file
        if row is not None:
            where += f", row {row}"
        if column is not None:
            where += f", column '{column}'"
        msg = f"{where}: {problem}"
        if hint:
            msg += f" ({hint})"
        super().__init__(msg)


class ModelError(SeraError):
    """A model or tokenizer cannot be found, loaded, or does not fit its role."""


class ConfigError(SeraError):
    """Options that contradict each other or are out of range."""
