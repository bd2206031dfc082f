"""`sera score` as users run it: pipelines, resume, shards, cache, ensembles, candidates and bad input."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import standard_table
from typer.testing import CliRunner

from sera_cli.commands.app import app
from sera_cli.data import provenance

runner = CliRunner()
SERA = [sys.executable, "-m", "sera_cli"]


def sera(*args: str):
    return runner.invoke(app, list(args))


def scored(path) -> pa.Table:
    return pq.read_table(path)


def test_score_writes_contract_columns_and_provenance(tmp_path, pairs_file, tiny_policy, tiny_ref):
    out = tmp_path / "scored.parquet"
    r = sera("score", pairs_file, "--policy", tiny_policy, "--ref", tiny_ref, "-o", str(out), "-q")
    assert r.exit_code == 0, r.stderr
    assert r.stderr.startswith("scored 6 rows (24 sequences computed, 0 from cache, 0 resumed")
    t = scored(out)
    for col in ("prompt", "chosen", "rejected", "id", "logp_policy_chosen", "logp_policy_rejected",
                "logp_ref_chosen", "logp_ref_rejected", "ntok_chosen", "ntok_rejected", "reward_chosen",
                "reward_rejected", "irm", "truncated"):
        assert col in t.column_names
    d = t.to_pydict()
    beta = 0.1
    np.testing.assert_allclose(d["reward_chosen"], beta * (np.array(d["logp_policy_chosen"]) - d["logp_ref_chosen"]))
    np.testing.assert_allclose(d["irm"], np.array(d["reward_chosen"]) - d["reward_rejected"])
    prov = provenance.read(t)
    assert prov["stage"] == "score" and prov["config"]["beta"] == 0.1
    assert prov["logps"]["policy"]["fingerprint"] != prov["logps"]["ref"]["fingerprint"]
    assert prov["logps"]["ref"]["max_length"] == 1024 and prov["versions"]["sera"]
    assert prov["models"]["policy"]["spec"] == tiny_policy


def test_dpo_without_ref_is_an_error(tmp_path, pairs_file, tiny_policy):
    r = sera("score", pairs_file, "--policy", tiny_policy, "-o", str(tmp_path / "o.parquet"))
    assert r.exit_code == 1
    assert r.stderr == ("error: --reward dpo needs --ref (the reference model is never taken silently from "
                        "the policy)\n")
    assert not (tmp_path / "o.parquet").exists()


def test_simpo_is_reference_free(tmp_path, pairs_file, tiny_policy):
    out = tmp_path / "simpo.parquet"
    r = sera("score", pairs_file, "--policy", tiny_policy, "--reward", "simpo", "--beta", "2", "-o", str(out), "-q")
    assert r.exit_code == 0, r.stderr
    d = scored(out).to_pydict()
    assert d["logp_ref_chosen"] == [None] * 6
    np.testing.assert_allclose(d["reward_chosen"], 2 * np.array(d["logp_policy_chosen"]) / d["ntok_chosen"])


def test_ipo_reward_is_the_length_averaged_log_ratio(tmp_path, pairs_file, tiny_policy, tiny_ref):
    """The margin `sera run --loss ipo` selects on is the one IPO trains on: log-ratios divided by token counts."""
    out = tmp_path / "ipo.parquet"
    r = sera("score", pairs_file, "--policy", tiny_policy, "--ref", tiny_ref, "--reward", "ipo", "-o", str(out), "-q")
    assert r.exit_code == 0, r.stderr
    d = {k: np.array(v) for k, v in scored(out).to_pydict().items() if k.startswith(("logp", "ntok", "irm"))}
    h = ((d["logp_policy_chosen"] - d["logp_ref_chosen"]) / d["ntok_chosen"]
         - (d["logp_policy_rejected"] - d["logp_ref_rejected"]) / d["ntok_rejected"])
    np.testing.assert_allclose(d["irm"], 0.1 * h, rtol=1e-6)
    assert not np.allclose(d["ntok_chosen"], d["ntok_rejected"])  # the averaging changes the margin here


def test_run_scores_with_the_reward_its_loss_trains_on():
    from sera_cli.stages.run.config import RunConfig
    from sera_cli.stages.run.stage_configs import reward as _reward

    assert [_reward(RunConfig(loss=loss)) for loss in ("dpo", "ipo", "slic", "simpo", "cdpo", "rdpo")] == \
        ["dpo", "ipo", "dpo", "simpo", "dpo", "dpo"]


def test_stdout_pipeline(tmp_path, pairs_file, tiny_policy, tiny_ref):
    cmd = SERA + ["score", pairs_file, "--policy", tiny_policy, "--ref", tiny_ref, "-o", "-", "-q"]
    proc = subprocess.run(cmd, capture_output=True, check=True)
    t = pq.read_table(io.BytesIO(proc.stdout))
    assert t.num_rows == 6 and "irm" in t.column_names
    assert b"scored 6 rows" in proc.stderr
    # and stdin: read back what was piped in
    proc2 = subprocess.run(SERA + ["score", "-", "--policy", tiny_policy, "--ref", tiny_ref, "-o", "-", "-q"],
                           input=proc.stdout, capture_output=True, check=True)
    assert pq.read_table(io.BytesIO(proc2.stdout)).column("irm").to_pylist() == t.column("irm").to_pylist()


def test_two_shards_equal_one_run(tmp_path, pairs_file, tiny_policy, tiny_ref):
    common = ["--policy", tiny_policy, "--ref", tiny_ref, "--chunk-rows", "2", "-q"]
    assert sera("score", pairs_file, *common, "-o", str(tmp_path / "full.parquet")).exit_code == 0
    for i in (0, 1):
        r = sera("score", pairs_file, *common, "--shard", f"{i}/2", "-o", str(tmp_path / f"s{i}.parquet"))
        assert r.exit_code == 0, r.stderr
    parts = [scored(tmp_path / f"s{i}.parquet") for i in (0, 1)]
    assert parts[0].num_rows + parts[1].num_rows == 6 and parts[0].num_rows > 0
    joined = pa.concat_tables(parts).drop_columns([]).to_pydict()
    full = scored(tmp_path / "full.parquet").to_pydict()
    assert joined == full


def test_cache_second_run_does_no_forward_pass(tmp_path, pairs_file, tiny_policy, tiny_ref, monkeypatch):
    cache = str(tmp_path / "cache")
    args = ["score", pairs_file, "--policy", tiny_policy, "--ref", tiny_ref, "--cache", cache, "-q"]
    assert sera(*args, "-o", str(tmp_path / "a.parquet")).exit_code == 0

    import sera_cli.backends.logps.batched
    import sera_cli.backends.models

    def forbidden(*a, **k):
        raise AssertionError("a forward pass ran although every row was cached")

    monkeypatch.setattr(sera_cli.backends.logps.batched, "sequences_logps", forbidden)
    monkeypatch.setattr(sera_cli.backends.models, "load_model", forbidden)
    r = sera(*args, "-o", str(tmp_path / "b.parquet"))
    assert r.exit_code == 0, r.stderr
    assert "0 sequences computed, 24 from cache" in r.stderr
    assert scored(tmp_path / "a.parquet").to_pydict() == scored(tmp_path / "b.parquet").to_pydict()


def test_resume_after_killed_run(tmp_path, tiny_policy, tiny_ref):
    big = pa.concat_tables([standard_table()] * 40)  # 240 rows, ids repeat: fine for scoring
    src = tmp_path / "big.parquet"
    pq.write_table(big, src)
    out = tmp_path / "out.parquet"
    args = [str(src), "--policy", tiny_policy, "--ref", tiny_ref, "--chunk-rows", "4", "-q", "-o", str(out)]
    proc = subprocess.Popen(SERA + ["score", *args], stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        done = list(tmp_path.glob(".out.parquet.*.sera-partial/ref-*.npz"))
        if len(done) >= 3:
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "a killed run must leave no output"
    partial = next(tmp_path.glob(".out.parquet.*.sera-partial"))
    finished = len(list(partial.glob("*.npz")))
    assert finished >= 3
    r = sera("score", *args, "--resume")
    assert r.exit_code == 0, r.stderr
    resumed = int(r.stderr.split(" resumed")[0].rsplit(", ", 1)[1].replace(",", ""))
    assert resumed >= finished * 4 * 2 - 8  # chunks x rows x (chosen, rejected), minus a half-written chunk
    assert not partial.exists()
    fresh = tmp_path / "fresh.parquet"
    assert sera("score", *args[:-1], str(fresh)).exit_code == 0
    assert scored(out).to_pydict() == scored(fresh).to_pydict()


def test_ensemble_with_previous_iteration(tmp_path, pairs_file, tiny_policy, tiny_ref):
    first, second = tmp_path / "it1.parquet", tmp_path / "it2.parquet"
    assert sera("score", pairs_file, "--policy", tiny_policy, "--ref", tiny_ref, "-o", str(first), "-q").exit_code == 0
    r = sera("score", pairs_file, "--policy", tiny_ref, "--ref", tiny_policy, "--prev", str(first),
             "--ensemble-lambda", "0.3", "-o", str(second), "-q")
    assert r.exit_code == 0, r.stderr
    prev, now = scored(first).to_pydict(), scored(second).to_pydict()
    np.testing.assert_allclose(now["irm_prev"], prev["irm"])
    np.testing.assert_allclose(now["irm_now"], -np.array(prev["irm"]), atol=1e-6)  # roles swapped
    np.testing.assert_allclose(now["irm"], 0.3 * np.array(now["irm_prev"]) + 0.7 * np.array(now["irm_now"]))


def test_ensemble_missing_rows(tmp_path, pairs_file, tiny_policy, tiny_ref):
    first = tmp_path / "it1.parquet"
    assert sera("score", pairs_file, "--policy", tiny_policy, "--ref", tiny_ref, "-o", str(first), "-q").exit_code == 0
    pq.write_table(scored(first).slice(0, 4), tmp_path / "part.parquet")
    args = ["score", pairs_file, "--policy", tiny_policy, "--ref", tiny_ref, "--prev", str(tmp_path / "part.parquet"),
            "-q", "-o", str(tmp_path / "it2.parquet")]
    r = sera(*args)
    assert r.exit_code == 1
    missing_id = scored(first).column("id")[4].as_py()
    assert r.stderr == (f"error: {tmp_path / 'part.parquet'}, column 'id': has no row with id '{missing_id}' "
                        "(row 4 of the input) (pass --prev-missing current to use the current IRM for new rows)\n")
    assert not (tmp_path / "it2.parquet").exists()
    assert sera(*args, "--prev-missing", "current").exit_code == 0
    now = scored(tmp_path / "it2.parquet").to_pydict()
    np.testing.assert_allclose(now["irm_prev"][4:], now["irm_now"][4:])


def test_candidates_get_one_reward_per_response(tmp_path, pairs_file, tiny_policy, tiny_ref):
    t = standard_table()
    cands = pa.table({"prompt_id": ["a", "a", "b"], "prompt": [t["prompt"][0].as_py()] * 2 + [t["prompt"][1].as_py()],
                      "response": [t["chosen"][0].as_py(), t["rejected"][0].as_py(), t["chosen"][1].as_py()],
                      "sample_idx": [0, 1, 0]})
    pq.write_table(cands, tmp_path / "cands.parquet")
    common = ["--policy", tiny_policy, "--ref", tiny_ref, "-q"]
    assert sera("score", str(tmp_path / "cands.parquet"), *common, "-o", str(tmp_path / "cs.parquet")).exit_code == 0
    assert sera("score", pairs_file, *common, "-o", str(tmp_path / "ps.parquet")).exit_code == 0
    c, p = scored(tmp_path / "cs.parquet").to_pydict(), scored(tmp_path / "ps.parquet").to_pydict()
    for col in ("logp_policy", "logp_ref", "ntok", "reward", "truncated"):
        assert col in c
    assert c["logp_policy"][0] == pytest.approx(p["logp_policy_chosen"][0], abs=1e-5)
    assert c["logp_policy"][1] == pytest.approx(p["logp_policy_rejected"][0], abs=1e-5)
    assert c["reward"][2] == pytest.approx(p["reward_chosen"][1], abs=1e-6)


def test_truncation_is_counted_and_flagged(tmp_path, pairs_file, tiny_policy, tiny_ref):
    out = tmp_path / "t.parquet"
    r = sera("score", pairs_file, "--policy", tiny_policy, "--ref", tiny_ref, "--max-length", "12",
             "--max-prompt-length", "8", "-o", str(out), "-q")
    assert r.exit_code == 0
    d = scored(out).to_pydict()
    n = sum(d["truncated"])
    assert 0 < n <= 6 and f"; {n} truncated" in r.stderr
    assert all(c <= 12 - 1 for c in d["ntok_chosen"])


# ---- bad input: exact line, exit code 1, no output file ----

def _bad(tmp_path, table_or_bytes, *extra, policy=None, ref=None):
    src = tmp_path / "bad.parquet"
    if isinstance(table_or_bytes, bytes):
        src.write_bytes(table_or_bytes)
    else:
        pq.write_table(table_or_bytes, src)
    out = tmp_path / "out.parquet"
    r = sera("score", str(src), "--policy", policy, "--ref", ref, "-o", str(out), "-q", *extra)
    assert r.exit_code == 1
    assert not out.exists()
    assert not list(tmp_path.glob(".out.parquet*"))
    return r.stderr, str(src)


def test_bad_missing_column(tmp_path, tiny_policy):
    err, src = _bad(tmp_path, standard_table().drop_columns(["rejected"]), policy=tiny_policy, ref=tiny_policy)
    assert err == (f"error: {src}: missing column 'rejected' for preference pairs (has: prompt, chosen) "
                   "('sera convert' turns common layouts into prompt/chosen/rejected)\n")


def test_bad_null_and_empty_text(tmp_path, tiny_policy):
    d = standard_table().to_pydict()
    d["chosen"][2] = None
    err, src = _bad(tmp_path, pa.table(d), policy=tiny_policy, ref=tiny_policy)
    assert err == f"error: {src}, row 2, column 'chosen': is null (fix or drop that row)\n"
    d["chosen"][2] = "x"
    d["rejected"][4] = "   "
    err, src = _bad(tmp_path, pa.table(d), policy=tiny_policy, ref=tiny_policy)
    assert err == f"error: {src}, row 4, column 'rejected': is empty (fix or drop that row)\n"


def test_bad_wrong_type(tmp_path, tiny_policy):
    d = standard_table().to_pydict()
    d["chosen"] = list(range(6))
    err, src = _bad(tmp_path, pa.table(d), policy=tiny_policy, ref=tiny_policy)
    assert err == (f"error: {src}, row 0, column 'chosen': has type int64; expected a string or a list of "
                   "{role, content} messages\n")


def test_bad_empty_and_truncated_files(tmp_path, tiny_policy):
    err, src = _bad(tmp_path, standard_table().slice(0, 0), policy=tiny_policy, ref=tiny_policy)
    assert err == f"error: {src}: has no rows\n"
    err, src = _bad(tmp_path, b"", policy=tiny_policy, ref=tiny_policy)
    assert err == f"error: {src}: is empty (0 bytes) (was it written completely?)\n"
    buf = io.BytesIO()
    pq.write_table(standard_table(), buf)
    err, src = _bad(tmp_path, buf.getvalue()[: len(buf.getvalue()) // 2], policy=tiny_policy, ref=tiny_policy)
    assert err.startswith(f"error: {src}: not a readable Parquet file: ") and err.count("\n") == 1


def test_bad_missing_model(tmp_path, tiny_policy):
    missing = str(tmp_path / "no-such-model")
    err, _ = _bad(tmp_path, standard_table(), policy=tiny_policy, ref=missing)
    assert err == (f"error: {missing}: no such model folder or file (give a Hugging Face folder or Hub id, a "
                   ".gguf file, a PEFT adapter folder or 'smollm2-135m')\n")


def test_bad_tokenizer_mismatch(tmp_path, tiny_policy, tiny_ref):
    import shutil

    other = tmp_path / "other-ref"
    shutil.copytree(tiny_ref, other)
    cfg = other / "tokenizer_config.json"
    cfg.write_text(cfg.read_text().replace("<|im_end|>", "<|im_end|>", 1))
    (other / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    err, _ = _bad(tmp_path, standard_table(), policy=tiny_policy, ref=str(other))
    assert err == (f"error: the tokenizers of {tiny_policy} and {other} differ (vocabulary, special tokens or chat "
                   "template); implicit rewards need one tokenizer: use a reference from the same family\n")


def test_bad_nan_logps(tmp_path, tiny_policy):
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    broken = tmp_path / "nan-model"
    shutil.copytree(tiny_policy, broken)
    model = AutoModelForCausalLM.from_pretrained(broken)
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    model.save_pretrained(broken)
    err, src = _bad(tmp_path, standard_table(), policy=str(broken), ref=tiny_policy)
    assert err.startswith(f"error: {src}, row 0, column 'logp_policy_chosen': logp_policy_chosen is not finite (nan)")


def test_bad_glob_matches_nothing(tmp_path, tiny_policy):
    pattern = str(tmp_path / "nothing-*.parquet")
    r = sera("score", pattern, "--policy", tiny_policy, "--ref", tiny_policy, "-o", str(tmp_path / "o.parquet"))
    assert r.exit_code == 1 and r.stderr == f"error: {pattern}: no file has this name, and read as a glob pattern it matches no file\n"


def test_several_inputs_and_globs(tmp_path, tiny_policy, tiny_ref):
    for i in range(2):
        pq.write_table(standard_table().slice(i * 3, 3), tmp_path / f"part-{i}.parquet")
    out = tmp_path / "o.parquet"
    r = sera("score", str(tmp_path / "part-*.parquet"), "--policy", tiny_policy, "--ref", tiny_ref, "-o", str(out), "-q")
    assert r.exit_code == 0, r.stderr
    assert scored(out).column("chosen").to_pylist() == standard_table().column("chosen").to_pylist()


def test_error_names_row_within_its_own_file(tmp_path, tiny_policy):
    pq.write_table(standard_table(), tmp_path / "a.parquet")
    d = standard_table().to_pydict()
    d["prompt"][1] = ""
    pq.write_table(pa.table(d), tmp_path / "b.parquet")
    r = sera("score", str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet"), "--policy", tiny_policy,
             "--ref", tiny_policy, "-o", str(tmp_path / "o.parquet"))
    assert r.stderr == f"error: {tmp_path / 'b.parquet'}, row 1, column 'prompt': is empty (fix or drop that row)\n"
    assert not Path(tmp_path / "o.parquet").exists()
