"""One help style for every command: `--config`'s example names the command's own options.

Value placeholders are Typer's own (`<str>`, `<float>`, `<int range>`, `<a|b|c>` for a fixed choice): no option
sets a `metavar`. tests/test_help.py walks every command's `--help` and holds both rules.
"""

from __future__ import annotations

from typing import Any

CONFIG_HELP = "TOML file of option values (e.g. {example}); flags override it."

# A setting or two each command is commonly given; a command not listed gets its first options with defaults.
EXAMPLES: dict[str, tuple[str, ...]] = {
    "convert": ("flip = 0.2", "seed = 1"),
    "score": ("beta = 0.2", "max-length = 512"),
    "merge": ('output = "scored.parquet"',),
    "select": ("top = 0.7", 'by = "irm"'),
    "mix": ("k1 = 0.7", "k2 = 0.3"),
    "generate": ("n = 4", "temperature = 0.7"),
    "train": ("beta = 0.1", "lr = 5e-7"),
    "eval": ('mode = "single"', "judge-max-tokens = 512"),
    "export": ("drop-truncated = true",),
}


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return f'"{value}"' if isinstance(value, str) else str(value)


def example(name: str, params: list) -> str:
    """`--config`'s example for command `name`: EXAMPLES, or its first two options with a default."""
    if name in EXAMPLES:
        return ", ".join(EXAMPLES[name])
    found = [f"{p.name.replace('_', '-')} = {_toml(p.default)}" for p in params
             if getattr(p, "opts", None) and p.opts[0].startswith("--") and p.name not in ("config_file", "help")
             and isinstance(p.default, bool | int | float | str)]
    return ", ".join(found[:2]) or 'output = "out.parquet"'


def with_config_example(cls: type) -> type:
    """`cls` (a command class) whose `--config` help gives an example drawn from the command's own options."""

    def __init__(self, *args, **kwargs):
        cls.__init__(self, *args, **kwargs)
        for param in self.params:
            if param.name == "config_file" and param.help and param.help.startswith("TOML file of option values"):
                param.help = CONFIG_HELP.format(example=example(self.name or "", self.params))

    return type(cls.__name__, (cls,), {"__init__": __init__})
