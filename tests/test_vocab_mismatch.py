"""A policy and reference with one tokenizer but output layers of different sizes: one line, before any
weights load."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
from conftest import _tiny_llama, standard_table
from typer.testing import CliRunner

from sera_cli.commands.app import app


def test_different_vocabulary_sizes_are_refused_in_one_line(tmp_path, tiny_policy, smol):
    padded = _tiny_llama(tmp_path / "padded", smol.path, seed=3)
    config = json.loads((padded / "config.json").read_text())
    config["vocab_size"] = 49280  # the same tokenizer, an embedding padded to a multiple of 128
    (padded / "config.json").write_text(json.dumps(config))
    src, out = tmp_path / "pairs.parquet", tmp_path / "scored.parquet"
    pq.write_table(standard_table(), src)
    r = CliRunner().invoke(app, ["score", str(src), "--policy", tiny_policy, "--ref", str(padded), "-o", str(out),
                                 "-q"])
    assert r.exit_code == 1
    assert r.stderr.strip() == (f"error: the vocabularies of {tiny_policy} (49,152 entries) and {padded} (49,280) "
                                "differ; implicit rewards need one vocabulary: use a reference from the same family")
    assert not out.exists()
