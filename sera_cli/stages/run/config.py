"""The settings of one `sera run`, as a frozen config: defaults < preset < `--config` TOML file < flags.

A TOML file holds the same names as the flags (dashes or underscores), e.g. `k1 = 0.7` or `max-new-tokens = 64`.
Validation collects every problem and reports them all at once in one `ConfigError`.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from sera_cli.backends.engines import ENGINES
from sera_cli.backends.models import DEVICES, DTYPES
from sera_cli.backends.trackers import TRACKERS
from sera_cli.data.errors import ConfigError
from sera_cli.data.numbers import number_problem
from sera_cli.stages.eval.config import MODES
from sera_cli.stages.generate.config import temperature_problems
from trainers.config import Settings
from trainers.losses import LOSSES

METHODS = ("sera", "sera-select", "dpo", "iterative-dpo")


@dataclass(frozen=True, kw_only=True)
class RunConfig(Settings):
    """Everything that shapes a run. `data` empty means the embedded demo set."""

    data: tuple[str, ...] = ()
    split: str | None = None  # of Hub dataset names in `data` (default train); attached to them: org/name:split
    subset: str | None = None  # of Hub dataset names in `data` (the config name): org/name:subset:split
    workdir: str = "sera-run"
    method: str = "sera"
    policy: str = "smollm2-135m"
    iterations: int = 3
    k1: float = 0.7
    k2: float = 0.3
    n: int = 4
    ensemble_lambda: float = 0.3
    loss: str = "dpo"
    beta: float = 0.1
    eps: float = 0.1  # cdpo / rdpo: the assumed label-flip rate
    cross_fit: int = 0  # K >= 2: score each offline fold with a model trained without it (see `crossfit`)
    heldout: float = 0.15
    rows: int | None = None
    seed: int = 0
    # generation
    gen_prompts: int | None = None
    max_new_tokens: int = 128
    temperature: float = 0.7
    top_p: float = 0.95
    engine: str = "auto"
    # training
    lr: float = 5e-6
    batch_size: int = 16
    micro_batch: int = 4
    epochs: int = 1
    lora_r: int = 0
    report_to: str = "none"  # each train stage's experiment tracker (sera_cli.backends.trackers)
    logging_dir: str | None = None  # the trackers' folder, one subfolder per train stage (None: beside each model)
    # models and lengths
    dtype: str = "auto"
    precision_check: int | None = None  # score stages: pairs rescored in float32 (None: 32 unless float32)
    device: str = "auto"
    max_length: int = 1024
    max_prompt_length: int = 512
    batch_tokens: int = 1024
    cache: bool = True
    trust_remote_code: bool = False
    ray_address: str | None = None  # score and generate stages on this Ray cluster ("local": this machine's)
    ray_actors: int | None = None  # None: one per GPU of the cluster, else 2
    # `sera eval` of pi_t against pi_0 at the end of each iteration (with eval = a prompts file)
    eval: str | None = None
    judge: str | None = None
    judge_url: str | None = None
    judge_model: str | None = None
    eval_mode: str = "pairwise"
    eval_max_new_tokens: int = 512
    judge_max_tokens: int = 512


    def check(self, found: Sequence[str] = ()) -> None:
        """Every problem at once, as one ConfigError: `found` (settings `load` could not give a type-correct
        value) and the out-of-range or contradictory ones."""
        p = list(found)
        if self.method not in METHODS:
            p.append(f"method must be one of {', '.join(METHODS)} (got {self.method!r})")
        if self.loss not in LOSSES:
            p.append(f"loss must be one of {', '.join(LOSSES)} (got {self.loss!r})")
        if self.iterations < 1:
            p.append(f"iterations must be >= 1 (got {self.iterations})")
        if self.method == "dpo" and self.iterations != 1:
            p.append(f"method dpo runs one iteration (got iterations = {self.iterations}); "
                     "use iterative-dpo for more")
        if not 0.0 < self.k1 <= 1.0:
            p.append(f"k1 must be in (0, 1] (got {self.k1})")
        if not 0.0 <= self.k2 <= 1.0:
            p.append(f"k2 must be in [0, 1] (got {self.k2})")
        if self.method == "sera" and self.k2 == 0:
            p.append("method sera with k2 = 0 is sera-select: say --method sera-select")
        if self.n < 2:
            p.append(f"n must be >= 2 to form a pair from generated responses (got {self.n})")
        if not 0.0 <= self.ensemble_lambda <= 1.0:
            p.append(f"ensemble-lambda must be in [0, 1] (got {self.ensemble_lambda})")
        if self.loss in ("cdpo", "rdpo") and not 0.0 <= self.eps < 0.5:
            p.append(f"eps must be in [0, 0.5) (got {self.eps})")
        if self.cross_fit == 1 or self.cross_fit < 0:
            p.append(f"cross-fit must be 0 (off) or a number of folds >= 2 (got {self.cross_fit})")
        if self.cross_fit and self.method in ("dpo", "iterative-dpo"):
            p.append("cross-fit scores the rows to select: it needs method sera or sera-select "
                     f"(got {self.method})")
        if self.beta <= 0:
            p.append(f"beta must be > 0 (got {self.beta})")
        if not 0.0 <= self.heldout < 0.5:
            p.append(f"heldout must be in [0, 0.5) (got {self.heldout})")
        for name in ("rows", "gen_prompts"):
            v = getattr(self, name)
            if v is not None and v < 1:
                p.append(f"{name.replace('_', '-')} must be >= 1 (got {v})")
        for name in ("max_new_tokens", "batch_size", "micro_batch", "epochs", "batch_tokens",
                     "max_prompt_length"):
            if getattr(self, name) < 1:
                p.append(f"{name.replace('_', '-')} must be >= 1 (got {getattr(self, name)})")
        if self.max_length <= self.max_prompt_length:
            p.append(f"max-length ({self.max_length}) must exceed max-prompt-length "
                     f"({self.max_prompt_length})")
        if not 0 < self.lr < 1:
            p.append(f"lr must be in (0, 1) (got {self.lr})")
        if self.lora_r < 0:
            p.append(f"lora-r must be >= 0 (got {self.lora_r})")
        p += temperature_problems(self.temperature, self.n, "temperature")
        if not 0.0 < self.top_p <= 1.0:
            p.append(f"top-p must be in (0, 1] (got {self.top_p})")
        if self.dtype not in DTYPES:
            p.append(f"dtype must be one of {', '.join(DTYPES)} (got {self.dtype!r})")
        if self.device not in DEVICES:
            p.append(f"device must be one of {', '.join(DEVICES)} (got {self.device!r})")
        if self.report_to not in TRACKERS:
            p.append(f"report-to must be one of {', '.join(TRACKERS)} (got {self.report_to!r})")
        if self.engine not in ENGINES:
            p.append(f"engine must be one of {', '.join(ENGINES)} (got {self.engine!r})")
        if self.eval and not (self.judge or self.judge_url):
            p.append("eval needs a judge: judge (a local model) or judge-url with judge-model")
        if not self.eval and (self.judge or self.judge_url):
            p.append("judge and judge-url are used only with eval (a prompts file): give eval, or drop them")
        if self.judge_url and not self.judge_model:
            p.append("judge-url needs judge-model (the model name the endpoint serves)")
        if self.eval_mode not in MODES:
            p.append(f"eval-mode must be one of {', '.join(MODES)} (got {self.eval_mode!r})")
        if self.ray_actors is not None and self.ray_actors < 1:
            p.append(f"ray-actors must be >= 1 (got {self.ray_actors})")
        if self.precision_check is not None and self.precision_check < 0:
            p.append(f"precision-check must be >= 0 (got {self.precision_check})")
        if self.eval_max_new_tokens < 1 or self.judge_max_tokens < 1:
            p.append("eval-max-new-tokens and judge-max-tokens must be >= 1")
        if p:
            raise ConfigError(_joined(p))


NAMES = {f.name for f in fields(RunConfig)}
# The embedded demo's settings (README quotes this file). float32 (dtype auto): bfloat16 is fast only on CPUs
# with AMX/AVX512-BF16, and its summed log-probs move by nats with batching. LoRA halves the backward.
DEMO_CONFIG = Path(__file__).resolve().parents[2] / "demo" / "sera-demo.toml"


def read_toml(path: str | Path) -> dict[str, Any]:
    """The settings in a TOML file, keys normalised to field names; problems raise one `ConfigError`."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        raw = tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None
    out, unknown = {}, []
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in NAMES:
            unknown.append(key)
        out[name] = value
    if unknown:
        raise ConfigError(f"{path}: unknown setting(s) {', '.join(sorted(unknown))} "
                          f"(known: {', '.join(sorted(n.replace('_', '-') for n in NAMES))})")
    return out


DEMO_PRESET: dict[str, Any] = read_toml(DEMO_CONFIG)


def load(file: str | Path | None, flags: Mapping[str, Any]) -> RunConfig:
    """The run's config; with no data in the file or the flags, the embedded demo with its small preset."""
    in_file = read_toml(file).get("data") if file is not None else None
    demo = not (flags.get("data") or in_file)
    return build(file, flags, DEMO_PRESET if demo else None)


def build(file: str | Path | None = None, flags: Mapping[str, Any] | None = None,
          preset: Mapping[str, Any] | None = None) -> RunConfig:
    """Merge defaults < preset < file < flags (flags that are None were not given), then validate."""
    merged: dict[str, Any] = dict(preset or {})
    source = {k: "preset" for k in merged}
    if file is not None:
        for k, v in read_toml(file).items():
            merged[k], source[k] = v, str(file)
    for k, v in (flags or {}).items():
        if v is not None:
            if k not in NAMES:
                raise ValueError(f"unknown run setting {k!r}")  # a programming error, not the user's
            merged[k], source[k] = v, "flag"
    if merged.get("method") == "dpo" and source.get("iterations") in (None, "preset"):
        merged["iterations"], source["iterations"] = 1, "method"  # dpo is one iteration unless told otherwise
    if "data" in merged:
        data = merged["data"]
        merged["data"] = (data,) if isinstance(data, str) else tuple(data)
    bad = _type_problems(merged, source)
    if (merged.get("split") or merged.get("subset")) and not {"data", "split", "subset"} & set(bad):
        from sera_cli.data.hub_data import with_split

        try:  # as the stage commands do: the data spec carries its split, so every stage reads the same rows
            merged["data"] = with_split(merged.get("data", ()), merged.get("split"), merged.get("subset"))
        except ConfigError as err:
            bad["split"] = str(err)
    config = RunConfig(**{k: v for k, v in merged.items() if k not in bad})  # defaults stand in for bad types
    config.check(list(bad.values()))
    return config


def _joined(problems: list[str]) -> str:
    head = "1 problem" if len(problems) == 1 else f"{len(problems)} problems"
    return f"invalid run settings ({head}): " + "; ".join(problems)


_TYPES = {f.name: f.type for f in fields(RunConfig)}


def _type_problems(values: Mapping[str, Any], source: Mapping[str, str]) -> dict[str, str]:
    """Values of the wrong type (a TOML file can hold anything): setting -> problem."""
    out = {}
    for k, v in values.items():
        want = _TYPES[k]
        ok = {
            "int": isinstance(v, int) and not isinstance(v, bool),
            "int | None": v is None or (isinstance(v, int) and not isinstance(v, bool)),
            "float": isinstance(v, int | float) and not isinstance(v, bool),
            "str": isinstance(v, str),
            "str | None": v is None or isinstance(v, str),
            "bool": isinstance(v, bool),
            "tuple[str, ...]": isinstance(v, tuple) and all(isinstance(x, str) for x in v),
        }[want]
        if not ok:
            out[k] = f"{k.replace('_', '-')} must be {want.replace(' | None', '')} (got {v!r} from {source[k]})"
        elif (problem := number_problem(k, v)) is not None:  # NaN, inf, a seed < 0, an int beyond 64 bits
            out[k] = f"{k.replace('_', '-')}: {problem} (from {source[k]})"
    return out
