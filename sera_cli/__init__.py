"""sera: curate preference data for LLM alignment with SeRA (Ko et al. 2024).

The library face: every `sera` command is a function of one frozen config, importable from here, doing what
the command does (the command only parses its options into the config and prints the summary the function
returns). Names load lazily, so `import sera_cli` imports no torch.

    from sera_cli import ScoreConfig, score
    summary = score(ScoreConfig(inputs=("pairs.parquet",), output="scored.parquet", policy="pi1/",
                                ref="smollm2-135m"))

One SeRA iteration from Python: docs/python.md.
"""

from importlib import import_module

__version__ = "0.1.0"

_NAMES = {  # name -> module that defines it (the stage's own module; configs beside their stage)
    "convert": "sera_cli.stages.convert", "ConvertConfig": "sera_cli.stages.convert",
    "score": "sera_cli.stages.score.api", "ScoreConfig": "sera_cli.stages.score.config",
    "select": "sera_cli.stages.select.api", "SelectConfig": "sera_cli.stages.select.api",
    "generate": "sera_cli.stages.generate.api", "GenerateConfig": "sera_cli.stages.generate.config",
    "mix": "sera_cli.stages.mix", "MixConfig": "sera_cli.stages.mix",
    "merge": "sera_cli.stages.merge", "MergeConfig": "sera_cli.stages.merge",
    "train": "sera_cli.stages.train.api", "TrainConfig": "trainers.config",
    "run": "sera_cli.stages.run.api", "RunConfig": "sera_cli.stages.run.config", "run_config": "sera_cli.stages.run.config",
    "evaluate": "sera_cli.stages.eval.api", "EvalConfig": "sera_cli.stages.eval.config",
    "inspect": "sera_cli.stages.inspect.api", "InspectConfig": "sera_cli.stages.inspect.api",
    "sql": "sera_cli.stages.sql", "SqlConfig": "sera_cli.stages.sql",
    "export": "sera_cli.stages.export", "ExportConfig": "sera_cli.stages.export",
    "report": "sera_cli.stages.report.api",
}
_ALIASES = {"run_config": "build", "report": "write"}  # names whose function is called otherwise in its module

__all__ = sorted([*_NAMES, "__version__"])


def __getattr__(name: str):
    if name in _NAMES:
        value = getattr(import_module(_NAMES[name]), _ALIASES.get(name, name))
        globals()[name] = value  # once loaded, a plain attribute
        return value
    raise AttributeError(f"module 'sera_cli' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
