"""Models named by Hugging Face Hub id (`org/name`, optionally `org/name@revision`): the local cache first.

The snapshot folder is found in the Hub cache (`HF_HOME`, `HF_HUB_CACHE`) without a network call; only when it is
missing and `HF_HUB_OFFLINE` is not set is it downloaded. A model that is neither cached nor downloadable is one
line saying so and what to do.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from sera_cli.data.errors import ConfigError, ModelError, first_line

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


def is_hub_id(spec: str) -> bool:
    """`org/name` or `org/name@revision` that is not a local path (a folder of that name wins)."""
    return bool(_REPO_ID.match(spec)) and not Path(spec).exists() and not spec.startswith(".")


def split_revision(spec: str) -> tuple[str, str | None]:
    repo, _, revision = spec.partition("@")
    return repo, revision or None


def with_revision(spec: str | None, revision: str | None, flag: str = "--revision",
                  model_flag: str = "--policy") -> str | None:
    """`spec` with `revision` as its `@revision` suffix: `--policy org/name --revision v1` is `org/name@v1`.
    Both naming different revisions, or a revision for a model that is not a Hub id, is an error."""
    if revision is None:
        return spec
    if spec is None:
        raise ConfigError(f"{flag} {revision} needs {model_flag} (a Hub id, org/name)")
    if not is_hub_id(spec):
        raise ConfigError(f"{flag} {revision}: {model_flag} {spec} is not a Hub id (org/name); a revision names a "
                          "branch, tag or commit of a Hub model")
    repo, suffix = split_revision(spec)
    if suffix is not None and suffix != revision:
        raise ConfigError(f"{model_flag} {spec} names revision {suffix} and {flag} names {revision}: give one")
    return f"{repo}@{revision}"


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def snapshot(spec: str) -> Path:
    """The local snapshot folder of the Hub model `spec` (cache first; download only when online)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo, revision = split_revision(spec)
    try:
        return Path(snapshot_download(repo, revision=revision, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    except Exception as err:  # a malformed cache entry, a bad revision name
        raise ModelError(f"{spec}: cannot read it from the Hugging Face cache: {first_line(err)}") from None
    from huggingface_hub import constants

    where = constants.HF_HUB_CACHE
    if offline():
        raise ModelError(f"{spec}: no local folder of that name, not in the Hugging Face cache ({where}), and HF_HUB_OFFLINE is set: download it "
                         f"where the Hub is reachable (`hf download {repo}`) or give a local model folder")
    try:
        return Path(snapshot_download(repo, revision=revision))
    except Exception as err:  # no network, no such repo, gated repo
        raise ModelError(f"{spec}: no local folder of that name, not in the Hugging Face cache ({where}), and the download failed "
                         f"({first_line(err)[:160]}): check the id, or download it first") from None
