"""Tables that Hugging Face `datasets` wrote: a `save_to_disk` folder or one of its `.arrow` files.

Read with pyarrow alone (no `datasets` import): an `.arrow` file is an Arrow IPC stream (or file); a
`save_to_disk` folder lists its shards in `state.json`. A `DatasetDict` folder (`dataset_dict.json`) needs one
split named: its error lists them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa

from sera_cli.data.errors import InputError, first_line


def is_dataset_folder(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and ((p / "state.json").exists() or (p / "dataset_dict.json").exists())


def read_arrow(path: str | Path) -> pa.Table:
    """One `.arrow` file: the IPC stream `datasets` writes, or the IPC file format."""
    try:
        with pa.memory_map(str(path)) as source:
            try:
                return pa.ipc.open_stream(source).read_all()
            except pa.ArrowInvalid:
                source.seek(0)
                return pa.ipc.open_file(source).read_all()
    except (pa.ArrowException, OSError) as err:
        first = first_line(err)
        raise InputError(str(path), f"not a readable Arrow file: {first}") from None


def read_dataset_folder(path: str | Path) -> pa.Table:
    """The rows of a `datasets.Dataset.save_to_disk` folder, shards in order."""
    p = Path(path)
    if (p / "dataset_dict.json").exists():
        splits = json.loads((p / "dataset_dict.json").read_text()).get("splits", [])
        raise InputError(str(path), f"is a DatasetDict with splits {', '.join(splits) or '(none)'}",
                         hint=f"give one split's folder, e.g. {p / (splits[0] if splits else 'train')}")
    try:
        state = json.loads((p / "state.json").read_text())
        files = [p / f["filename"] for f in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError):
        raise InputError(str(path), "has an unreadable state.json (not a datasets save_to_disk folder?)") from None
    tables = [read_arrow(f) for f in files]
    if not tables:
        raise InputError(str(path), "lists no data files in state.json")
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    return table.replace_schema_metadata(None)  # the `huggingface` features metadata is not sera's provenance
