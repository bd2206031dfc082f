"""Hugging Face Hub datasets named as inputs (`trl-lib/ultrafeedback_binarized`), read through `datasets`.

A name is `org/name` that is not a local path; `--split` (default train) and `--subset` (the config name) travel
with it as one spec, `org/name:split` or `org/name:subset:split`, so every stage reads the same rows and records
them in its provenance. `datasets` reads its cache first and honours HF_DATASETS_OFFLINE / HF_HUB_OFFLINE; a name
that is neither a file nor a dataset it can load is one line saying so and what to do.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa

from sera_cli.data.errors import ConfigError, InputError, first_line

DEFAULT_SPLIT = "train"
_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(:.+)?$")
_FILE_SUFFIXES = (".parquet", ".arrow", ".jsonl", ".json", ".gz", ".csv", ".tsv")


def is_dataset_name(spec: str) -> bool:
    """`org/name` (with an optional `:split` or `:subset:split`) that is not a local path or a file name."""
    name = spec.partition(":")[0]
    return (bool(_NAME.match(spec)) and not spec.startswith(".") and not os.path.exists(spec)
            and not name.lower().endswith(_FILE_SUFFIXES))


def parse(spec: str) -> tuple[str, str | None, str]:
    """(name, subset, split) of a dataset spec; a split may hold a slice with colons, 'train[:100]'."""
    name, _, rest = spec.partition(":")
    if not rest:
        return name, None, DEFAULT_SPLIT
    head, sep, tail = rest.partition(":")
    if sep and "[" not in head:
        return name, head or None, tail or DEFAULT_SPLIT
    return name, None, rest


def with_split(inputs: Sequence[str], split: str | None = None, subset: str | None = None) -> tuple[str, ...]:
    """The inputs with `--split`/`--subset` attached to each Hub dataset name (files stay as they are)."""
    names = [s for s in inputs if is_dataset_name(s)]
    if (split or subset) and not names:
        flag = "--split" if split else "--subset"
        raise ConfigError(f"{flag} applies to Hub dataset inputs (org/name), and none of the inputs is one")
    out = []
    for spec in inputs:
        if is_dataset_name(spec) and ":" not in spec and (split or subset):
            spec = f"{spec}:{subset}:{split or DEFAULT_SPLIT}" if subset else f"{spec}:{split}"
        out.append(spec)
    return tuple(out)


def read_dataset(spec: str) -> pa.Table:
    """The rows of one split of a Hub dataset, as an Arrow table (from the `datasets` cache when it is there)."""
    name, subset, split = parse(spec)
    try:
        import datasets
    except ImportError:
        raise InputError(spec, "no such file; reading it as a Hub dataset needs the datasets package",
                         hint="pip install datasets") from None
    from datasets.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()  # "Using the latest cached version ...": stderr keeps sera's own lines
    try:
        ds = datasets.load_dataset(name, subset, split=split)
    except ValueError as err:  # an unknown split or subset: the message lists the known ones
        raise InputError(spec, first_line(err), hint="choose one with --split or --subset") from None
    except Exception as err:  # not on the Hub, not cached, gated, no network: datasets raises many types
        raise InputError(spec, _missing(name, err)) from None
    if isinstance(ds, datasets.DatasetDict | datasets.IterableDataset | datasets.IterableDatasetDict):
        raise InputError(spec, "is not one split of a dataset", hint="give --split")
    return ds.with_format("arrow")[:].replace_schema_metadata(None)


def offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


def _missing(name: str, err: Exception) -> str:
    from datasets import config

    where = Path(config.HF_DATASETS_CACHE)
    why = "and HF_HUB_OFFLINE is set" if offline() else f"and loading it failed ({first_line(err)[:160]})"
    return (f"no such file, nor a dataset in the Hugging Face cache ({where}), {why}: load it once where the "
            f"Hub is reachable (python -c \"import datasets; datasets.load_dataset('{name}')\"), or give a "
            "local file")

