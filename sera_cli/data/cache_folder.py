"""sera's cache folder (models converted from GGUF, fingerprints, interrupted chunk stores), in one place."""

from __future__ import annotations

import os
from pathlib import Path

from sera_cli.data.errors import ConfigError


def cache_dir() -> Path:
    """sera's cache folder: $SERA_CACHE_DIR, else $XDG_CACHE_HOME/sera, else ~/.cache/sera. A path that exists
    and is not a folder is refused in one line naming the variable (not blamed on what is cached in it)."""
    if env := os.environ.get("SERA_CACHE_DIR"):
        folder, source = Path(env), "SERA_CACHE_DIR"
    else:
        folder = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sera"
        source = "XDG_CACHE_HOME" if "XDG_CACHE_HOME" in os.environ else "the default cache folder"
    for part in (folder, *folder.parents):
        if part.exists():
            if not part.is_dir():
                raise ConfigError(f"sera's cache folder {folder} (from {source}) cannot be used: {part} is a file, "
                                  "not a folder; point SERA_CACHE_DIR at a folder")
            break
    return folder
