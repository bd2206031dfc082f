"""Domain errors: the trainer library's (`trainers.errors`), which the CLI edge (`app.py`) prints as one line."""

from trainers.errors import ConfigError, InputError, ModelError, SeraError

__all__ = ["ConfigError", "InputError", "ModelError", "SeraError", "described", "first_line"]


def first_line(err: BaseException) -> str:
    """The first non-empty line of an exception's message, or its type's name when it has none."""
    return next((line.strip() for line in str(err).splitlines() if line.strip()), "") or type(err).__name__


def described(err: BaseException) -> str:
    """One line for an error that crossed a process boundary: a domain error's own message, else its type and
    first line (an unexpected failure names what it was)."""
    if isinstance(err, SeraError):
        return str(err)
    text = first_line(err)
    return text if text == type(err).__name__ else f"{type(err).__name__}: {text}"
