"""`sera train` on TRL's reference columns (`ref_chosen_logps`/`ref_rejected_logps`): the same numbers as sera's
`logp_ref_*`; with no provenance they are computed again with `--ref`, or used as they are with --trust-stored-ref."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from sera_cli.commands.app import app
from sera_cli.stages.export import ExportConfig, export
from sera_cli.stages.train.api import train
from trainers import TrainConfig

TRL = {"logp_ref_chosen": "ref_chosen_logps", "logp_ref_rejected": "ref_rejected_logps"}


@pytest.fixture(scope="module")
def stored_losses(tmp_path_factory, scored, tiny_policy, tiny_ref) -> list[float]:
    out = tmp_path_factory.mktemp("stored") / "pi"
    assert train(config(scored, out, tiny_policy, ref=tiny_ref)).ref_source == "input"
    return losses(out)


def config(inputs, output, policy, **kw) -> TrainConfig:
    base = dict(lr=1e-3, batch_size=2, micro_batch=2, max_steps=2, progress=False, dtype="float32")
    return TrainConfig(inputs=(str(inputs),), output=str(output), policy=policy, **{**base, **kw})


def losses(folder) -> list[float]:
    return [json.loads(x)["loss"] for x in Path(folder, "metrics.jsonl").read_text().splitlines()]


def trl_file(scored: str, path: Path) -> str:
    """The scored pairs as TRL's own precompute leaves them: TRL's column names, no sera provenance."""
    t = pq.read_table(scored).select(["prompt", "chosen", "rejected", *TRL])
    pq.write_table(t.rename_columns(["prompt", "chosen", "rejected", *TRL.values()]).replace_schema_metadata(None),
                   path)
    return str(path)


def test_trl_columns_without_provenance_need_ref_or_trust(tmp_path, scored, tiny_policy):
    trl = trl_file(scored, tmp_path / "trl.parquet")
    r = CliRunner().invoke(app, ["train", trl, "--policy", tiny_policy, "-o", str(tmp_path / "out"), "-q"])
    assert r.exit_code == 1 and not (tmp_path / "out").exists()
    assert r.stderr.splitlines()[-1] == (
        f"error: {trl}: its TRL reference log-probs (ref_chosen_logps, ref_rejected_logps) carry no provenance "
        "(give --ref MODEL to compute them again, or pass --trust-stored-ref to use them as they are)")


def test_trl_columns_are_computed_again_with_ref_or_trusted(tmp_path, scored, tiny_policy, tiny_ref,
                                                           stored_losses):
    trl = trl_file(scored, tmp_path / "trl.parquet")
    again = train(config(trl, tmp_path / "again", tiny_policy, ref=tiny_ref))
    assert again.ref_source == "computed"
    np.testing.assert_allclose(losses(tmp_path / "again"), stored_losses, atol=1e-5)
    trusted = train(config(trl, tmp_path / "trusted", tiny_policy, trust_stored_ref=True))
    assert trusted.ref_source == "input"
    np.testing.assert_allclose(losses(tmp_path / "trusted"), stored_losses, atol=1e-5)


def test_sera_export_trl_keeps_the_provenance_that_lets_train_reuse_them(tmp_path, scored, tiny_policy, tiny_ref,
                                                                       stored_losses):
    out = tmp_path / "trl.parquet"
    export(ExportConfig(inputs=(scored,), output=str(out), target="trl"))
    assert {"ref_chosen_logps", "ref_rejected_logps"} <= set(pq.read_schema(out).names)
    summary = train(config(out, tmp_path / "pi", tiny_policy, ref=tiny_ref))
    assert summary.ref_source == "input"  # checked against --ref through the export's provenance
    np.testing.assert_allclose(losses(tmp_path / "pi"), stored_losses, atol=1e-5)
