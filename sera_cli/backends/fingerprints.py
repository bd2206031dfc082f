"""Model fingerprints that read each weight file once.

A weight file's digest is memoised in this process and on disk (sera's cache folder, `fingerprints/`) under the
file's (resolved path, size, mtime_ns, inode): a file that changes in any of these is read again. A file of a
Hugging Face Hub snapshot is a link to a blob named by its content hash, so it is named by that blob and never
read. The folder fingerprint has the same form as `hashing.tree_digest` (a digest of (name, file digest) pairs).
"""

from __future__ import annotations

import os
from pathlib import Path

from sera_cli.data.hashing import digest, file_digest, tree_digest

_MEMO: dict[tuple[str, int, int, int], str] = {}


def _memo_file(key: tuple[str, int, int, int]) -> Path:
    from sera_cli.data.cache_folder import cache_dir

    return cache_dir() / "fingerprints" / f"{digest(list(key))[:32]}.txt"


def weight_digest(path: Path) -> str:
    """The digest of one weight file, read at most once per (path, size, mtime_ns, inode)."""
    target = path.resolve()
    if path.is_symlink() and target.parent.name == "blobs" and target.parent.parent.name.startswith("models--"):
        return f"hub-blob:{target.name}"  # the Hub cache names each blob by its content hash
    st = target.stat()
    key = (str(target), st.st_size, st.st_mtime_ns, st.st_ino)
    if key in _MEMO:
        return _MEMO[key]
    memo = _memo_file(key)
    try:
        value = memo.read_text().strip()
    except OSError:
        value = ""
    if len(value) != 32:
        value = file_digest(target)
        try:  # the memo is an optimisation: a cache that cannot be written costs a re-read next time
            memo.parent.mkdir(parents=True, exist_ok=True)
            tmp = memo.with_name(f"{memo.name}.tmp-{os.getpid()}")
            tmp.write_text(value + "\n")
            os.replace(tmp, memo)
        except OSError:
            pass
    _MEMO[key] = value
    return value


def folder_digest(folder: str | os.PathLike, suffixes: tuple[str, ...]) -> str:
    """`hashing.tree_digest` of the folder's files ending in `suffixes`, with each file read at most once."""
    return tree_digest(folder, suffixes, weight_digest)
