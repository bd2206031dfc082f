"""Domain errors: the trainer library's (`trainers.errors`), which the CLI edge (`app.py`) prints as one line."""

from trainers.errors import ConfigError, InputError, ModelError, SeraError

__all__ = ["ConfigError", "InputError", "ModelError", "SeraError"]
