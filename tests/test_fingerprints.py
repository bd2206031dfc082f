"""A model's fingerprint reads each weight file once: memoised in the process and on disk by (path, size,
mtime_ns, inode); the value is the folder's content hash as before (`hashing.tree_digest`)."""

from __future__ import annotations

import json

import pytest

from sera_cli.backends import fingerprints
from sera_cli.backends.models import _WEIGHT_SUFFIXES, resolve
from sera_cli.data.hashing import tree_digest


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.setenv("SERA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(fingerprints, "_MEMO", {})
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (model / "model.safetensors").write_bytes(b"weights" * 1000)
    return model


@pytest.fixture
def reads(monkeypatch):
    seen = []
    real = fingerprints.file_digest
    monkeypatch.setattr(fingerprints, "file_digest", lambda p: seen.append(p.name) or real(p))
    return seen


def test_a_second_resolve_reads_no_weight_bytes(folder, reads):
    first = resolve(str(folder)).fingerprint
    assert sorted(reads) == ["config.json", "model.safetensors"]
    assert first == tree_digest(folder, _WEIGHT_SUFFIXES)  # the same fingerprint as before the memo
    assert resolve(str(folder)).fingerprint == first
    assert len(reads) == 2


def test_the_memo_on_disk_serves_a_new_process_and_a_changed_file_is_read_again(folder, reads, monkeypatch):
    first = resolve(str(folder)).fingerprint
    monkeypatch.setattr(fingerprints, "_MEMO", {})  # as a new process
    assert resolve(str(folder)).fingerprint == first
    assert len(reads) == 2
    (folder / "model.safetensors").write_bytes(b"other weights")
    changed = resolve(str(folder)).fingerprint
    assert changed != first and reads[-1] == "model.safetensors" and len(reads) == 3
