"""Numbers are finite or refused, and malformed things are one line: the cases of issue #31 that are not rows of
`tests/test_bad_input.py` (which runs the end-to-end ones).

The option cases are generated from the app itself: every float option of every command, given NaN or +/-inf as
a flag or in a `--config` TOML file, is a usage error naming the option, so a new command or option is covered
without editing this file.
"""

from __future__ import annotations

import gzip
import json
import math
import re
import shutil
import socket
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from sera_cli.data.errors import ConfigError, InputError, ModelError
from sera_cli.data.numbers import INT_MAX, NON_FINITE_OK, SEED_MAX, number_problem

# ------------------------------------------------------------------------------- the one validator, generated


def _commands():
    import typer.main

    from sera_cli.commands.app import app

    group = typer.main.get_command(app)
    return {name: cmd for name, cmd in group.commands.items()}


def _annotation(param):
    return getattr(getattr(param, "type_descriptor", None), "annotation", None)


def _dummy_args(cmd, skip: str) -> list[str]:
    """Values for the required parameters of `cmd` (never read: the numbers are checked at parse time)."""
    args: list[str] = []
    for p in cmd.params:
        if not p.required or p.name == skip:
            continue
        value = "1" if _annotation(p) in (int, float) else "x.parquet"
        args += [value] if p.param_type_name == "argument" else [p.opts[0], value]
    return args


def _usage_error(argv: list[str]) -> str:
    """The one line `sera` prints for `argv` (as `app.main` formats it), which must be a usage error (exit 2)."""
    from sera_cli.commands.app import app

    result = CliRunner().invoke(app, argv, standalone_mode=False)
    err = result.exception
    assert err is not None and getattr(err, "exit_code", None) == 2, (argv, result.output, err)
    return err.format_message()


FLOAT_OPTIONS = [(name, p.name, max(p.opts, key=len)) for name, cmd in _commands().items() for p in cmd.params
                 if _annotation(p) is float and p.param_type_name == "option" and p.name not in NON_FINITE_OK]


def test_every_float_option_of_every_command_is_found():
    """The generator sees the options the issue names (a check that it finds anything at all)."""
    found = {(c, f) for c, _, f in FLOAT_OPTIONS}
    assert {("train", "--beta"), ("train", "--max-grad-norm"), ("select", "--min-irm"), ("eval", "--judge-timeout"),
            ("generate", "--top-p"), ("train", "--lr"), ("score", "--ensemble-lambda")} <= found
    assert len(FLOAT_OPTIONS) >= 25, len(FLOAT_OPTIONS)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN", "1e999"])
def test_every_float_option_refuses_non_finite_values(value, capsys):
    """Each (command, float option) given `value` exits 2 before the command runs, naming the option."""
    cmds, tried = _commands(), 0
    for command, param, flag in FLOAT_OPTIONS:
        message = _usage_error([command, *_dummy_args(cmds[command], param), f"{flag}={value}"])
        shown = {"NaN": "nan", "1e999": "inf"}.get(value, value)
        assert message == f"Invalid value: {flag}: {shown} is not a finite number", message
        tried += 1
    with capsys.disabled():
        print(f"\n{tried} (command, float option) cases refused {value!r}")


def test_every_config_file_value_is_checked_like_its_flag(tmp_path):
    """A `--config` TOML file's NaN/inf (TOML has both) is refused naming the option and the file."""
    cmds, tried = _commands(), 0
    for command, param, flag in FLOAT_OPTIONS:
        if "config_file" not in {p.name for p in cmds[command].params}:
            continue
        toml = tmp_path / f"{command}-{param}.toml"
        toml.write_text(f"{flag.lstrip('-')} = nan\n")
        message = _usage_error([command, *_dummy_args(cmds[command], param), "--config", str(toml)])
        assert message == f"Invalid value: {flag}: nan is not a finite number (from {toml})", message
        tried += 1
    assert tried >= 15


def test_all_problems_are_reported_at_once():
    message = _usage_error(["train", "x.parquet", "-o", "out", "--beta", "inf", "--lr", "nan", "--seed", "-1",
                            "--batch-size", str(2**64)])
    assert message == ("Invalid value: --beta: inf is not a finite number; --lr: nan is not a finite number; "
                       "--seed: -1 is not a seed in [0, 2^53]; --batch-size: 18446744073709551616 is beyond 2^53, the "
                       "largest integer held exactly everywhere")


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_float_values_pass_exactly_when_finite(x):
    problem = number_problem("beta", x)
    assert (problem is None) == math.isfinite(x)
    if problem is not None:
        assert problem == f"{x} is not a finite number"


@given(st.integers(min_value=-(2**70), max_value=2**70))
def test_integers_pass_exactly_when_within_2_to_the_53(n):
    assert (number_problem("batch_size", n) is None) == (-INT_MAX <= n <= INT_MAX)
    assert (number_problem("seed", n) is None) == (0 <= n <= SEED_MAX)


@given(st.lists(st.floats(), max_size=5))
def test_lists_are_checked_element_by_element(xs):
    assert (number_problem("x", xs) is None) == all(math.isfinite(x) for x in xs)


def test_bools_and_texts_are_not_numbers():
    assert number_problem("seed", True) is None and number_problem("beta", "nan") is None


def test_run_config_reports_every_non_finite_setting(tmp_path):
    from sera_cli.stages.run.config import build

    toml = tmp_path / "run.toml"
    toml.write_text('data = ["x.parquet"]\nbeta = nan\nlr = inf\ntemperature = -inf\nseed = -3\n'
                    "rows = 99999999999999999999\n")
    with pytest.raises(ConfigError) as err:
        build(toml)
    assert str(err.value) == (
        f"invalid run settings (5 problems): beta: nan is not a finite number (from {toml}); lr: inf is not a "
        f"finite number (from {toml}); temperature: -inf is not a finite number (from {toml}); seed: -3 is not a "
        f"seed in [0, 2^53] (from {toml}); rows: 99999999999999999999 is beyond 2^53, the largest integer held "
        f"exactly everywhere (from {toml})")


def test_stage_configs_given_through_the_python_api_refuse_non_finite_numbers():
    """The library's own configs check too (no option parsing stands before them), every problem at once."""
    from sera_cli.stages.generate.config import GenerateConfig
    from sera_cli.stages.score.config import ScoreConfig
    from sera_cli.stages.select.api import SelectConfig
    from trainers import TrainConfig

    nan, inf = float("nan"), float("inf")
    cases = [(TrainConfig(inputs=("x",), output="o", policy="p", max_grad_norm=nan, beta=inf),
              "--beta must be a finite number (got inf); --max-grad-norm must be a finite number (got nan)"),
             (SelectConfig(inputs=("x",), output="o", min_irm=nan), "--min-irm: nan is not a finite number"),
             (ScoreConfig(inputs=("x",), output="o", policy="p", ref="r", ensemble_lambda=-inf),
              "--ensemble-lambda: -inf is not a finite number"),
             (GenerateConfig(inputs=("x",), output="o", policy="p", seed=-1), "--seed: -1 is not a seed in [0, 2^53]")]
    for config, message in cases:
        with pytest.raises(ConfigError) as err:
            config.check()
        assert str(err.value).startswith(message), str(err.value)


# ---------------------------------------------------------------------------------------- ids and columns


def _inputs(table: pa.Table, name: str = "in.parquet"):
    from sera_cli.data.tables import Inputs, Source

    return Inputs(table, [Source(name, 0, table.num_rows, None)])


def test_two_nan_ids_are_not_unique():
    """NaN != NaN: without its own check, two NaN ids pass a uniqueness check made of equality."""
    from sera_cli.data.contract import check_ids

    with pytest.raises(InputError) as err:
        check_ids(_inputs(pa.table({"id": [1.0, float("nan"), float("nan")]})))
    assert str(err.value).startswith("in.parquet, row 1, column 'id': is NaN")


def test_flipped_labels_null_or_nan_are_refused_not_counted_clean():
    from sera_cli.stages.inspect.column_values import flags

    assert flags(pa.table({"f": [True, False]}), "f", "x").tolist() == [True, False]
    assert flags(pa.table({"f": [1, 0, 1]}), "f", "x").tolist() == [True, False, True]
    for values, problem in (([True, None], "row 1, column 'f': is null"),
                            ([0.0, float("nan")], "row 1, column 'f': is NaN"),
                            ([0, 2], "row 1, column 'f': is 2")):
        with pytest.raises(InputError, match=re.escape(f"x, {problem}; expected true/false or 0/1")):
            flags(pa.table({"f": values}), "f", "x")


def test_report_refuses_null_flipped(tmp_path):
    from sera_cli.stages.report.api import _flipped

    with pytest.raises(InputError, match=r"s\.parquet, row 2, column 'flipped': is null"):
        _flipped({"flipped": [False, True, None]}, tmp_path / "s.parquet")


def test_prev_with_a_nan_id_is_refused(tmp_path):
    import numpy as np

    from sera_cli.stages.score.config import ScoreConfig
    from sera_cli.stages.score.scoring import _read_prev

    pq.write_table(pa.table({"id": [0.0, float("nan")], "irm": [0.1, 0.2]}), tmp_path / "prev.parquet")
    config = ScoreConfig(inputs=("x",), output="o", policy="p", prev=str(tmp_path / "prev.parquet"))
    with pytest.raises(InputError, match=r"prev\.parquet, row 1, column 'id': is NaN"):
        _read_prev(config, pa.table({"id": [0.0, 1.0]}))
    assert np.isnan(float("nan"))


# --------------------------------------------------------------------------------------- eval --answers


def _answers(tmp_path: Path, rows: list[dict]) -> str:
    path = tmp_path / "answers.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def _questions():
    from sera_cli.stages.eval.questions import Question

    return [Question("q1", ("Hi?",), None, None, {}), Question("q2", ("Bye?",), None, None, {})]


@pytest.mark.parametrize("rows, message", [
    ([{"prompt_id": "q1", "model": "m", "response": "a"}, {"prompt_id": "q2", "model": "m", "response": "b"},
      {"prompt_id": "q1", "model": "m", "response": "c"}],
     "row 2, column 'prompt_id': answers question 'q1' (turn 1) of model 'm' again (also row 0)"),
    ([{"prompt_id": "q1", "model": "m", "response": "a"}, {"prompt_id": "q2", "model": "m", "response": None}],
     "row 1, column 'response': is null"),
    ([{"prompt_id": "q1", "model": "m", "response": "a"}, {"prompt_id": None, "model": "m", "response": "b"}],
     "row 1, column 'prompt_id': is null, NaN or empty"),
    ([{"prompt_id": "q1", "model": "m", "response": "a", "turn": 1.0},
      {"prompt_id": "q2", "model": "m", "response": "b", "turn": float("nan")}],
     "row 1, column 'turn': is nan; expected a turn number"),
])
def test_answers_duplicate_or_null_are_refused(tmp_path, rows, message):
    from sera_cli.stages.eval.answers import given_answers

    path = _answers(tmp_path, rows)
    with pytest.raises(InputError) as err:
        given_answers(path, ["m"], _questions())
    assert str(err.value).startswith(f"{path}, {message}"), str(err.value)


def test_answers_of_other_models_are_not_checked_and_good_ones_pass(tmp_path):
    from sera_cli.stages.eval.answers import given_answers

    path = _answers(tmp_path, [{"prompt_id": "q1", "model": "m", "response": "a"},
                               {"prompt_id": "q2", "model": "m", "response": ""},
                               {"prompt_id": "q1", "model": "other", "response": None}])
    assert given_answers(path, ["m"], _questions()) == {"m": {"q1": ["a"], "q2": [""]}}


# ---------------------------------------------------------------------------------- select --pairs, merge


def test_select_pairs_refuses_a_prompt_id_shared_by_two_prompts():
    from sera_cli.stages.select.candidate_pairs import build_pairs

    table = pa.table({"prompt_id": ["p0", "p0", "p1", "p1"], "prompt": ["a", "a", "b", "c"],
                      "response": ["x", "y", "z", "w"], "reward": [0.1, 0.2, 0.3, 0.4]})
    with pytest.raises(InputError) as err:
        build_pairs(_inputs(table))
    assert str(err.value) == ("in.parquet, row 3, column 'prompt_id': prompt_id 'p1' is also the id of in.parquet "
                              "row 2, another prompt (give each prompt its own prompt_id)")
    fixed = table.set_column(1, "prompt", pa.array(["a", "a", "b", "b"]))
    pairs, stats = build_pairs(_inputs(fixed))
    assert (stats.pairs, pairs.column("chosen").to_pylist(), pairs.column("rejected").to_pylist()) == \
        (2, ["y", "w"], ["x", "z"])


def _shards(tmp_path: Path, with_own_digest: bool = True) -> list[Path]:
    """Two shards of a fake 6-row `score --shard i/2` job (3 rows each), as `score` records them."""
    from sera_cli.data import provenance
    from sera_cli.data.chunk_store import shard_record, with_rows

    ids = [f"r{i}" for i in range(6)]
    out = []
    for i in range(2):
        shard = shard_record(ids, 3, (i, 2))
        rows = ids[shard["start"]:shard["stop"]]
        table = pa.table({"id": rows, "irm": [float(r[1:]) for r in rows]})
        shard = with_rows(shard, table) if with_own_digest else shard
        path = tmp_path / f"shard{i}.parquet"
        pq.write_table(provenance.attach(table, provenance.record("score", {"beta": 0.1}, rows=3, shard=shard)),
                       path)
        out.append(path)
    return out


def _reorder(path: Path) -> None:
    table = pq.read_table(path)
    pq.write_table(table.take([2, 0, 1]).replace_schema_metadata(table.schema.metadata), path)


@pytest.mark.parametrize("own_digest", [True, False])
def test_merge_refuses_a_reordered_shard(tmp_path, own_digest):
    from sera_cli.stages.merge import merged

    paths = _shards(tmp_path, own_digest)
    table, _ = merged([str(p) for p in reversed(paths)])  # files in any order: shard order is restored
    assert table.column("id").to_pylist() == [f"r{i}" for i in range(6)]
    _reorder(paths[1])
    if not own_digest:  # written before shards recorded their rows: not checked
        assert merged([str(p) for p in paths])[0].column("id").to_pylist()[3:] == ["r5", "r3", "r4"]
        return
    with pytest.raises(InputError) as err:
        merged([str(p) for p in paths])
    assert str(err.value) == (f"{paths[1]}: rows are not those of shard 1/2 in their order (reordered, filtered or "
                              "edited since it was written?) (rerun that shard)")


def test_merge_refuses_a_reordered_shard_of_a_real_score_job(tmp_path, tiny_policy, tiny_ref, pairs_file):
    from sera_cli.stages.merge import merged
    from sera_cli.stages.score.api import score
    from sera_cli.stages.score.config import ScoreConfig

    paths = [tmp_path / f"s{i}.parquet" for i in range(2)]
    for i, path in enumerate(paths):
        score(ScoreConfig(inputs=(pairs_file,), output=str(path), policy=tiny_policy, ref=tiny_ref, max_length=64,
                          max_prompt_length=32, chunk_rows=3, shard=(i, 2), progress=False))
    assert merged([str(p) for p in paths])[0].num_rows == 6
    _reorder(paths[0])
    with pytest.raises(InputError, match=re.escape(f"{paths[0]}: rows are not those of shard 0/2 in their order")):
        merged([str(p) for p in paths])


# -------------------------------------------------------------------------------------------- sql outputs


def test_sql_json_has_no_infinity_or_nan_at_any_depth():
    from sera_cli.stages.sql import as_json

    table = pa.table({"x": [float("inf")], "m": pa.array([[("a", float("-inf"))]], pa.map_(pa.string(), pa.float64())),
                      "l": [[1.0, float("nan")]], "s": [{"v": float("nan")}]})

    def refuse(name):
        raise AssertionError(f"{name} in JSON output")

    assert json.loads(as_json(table), parse_constant=refuse) == [{"x": None, "m": [["a", None]], "l": [1.0, None],
                                                                  "s": {"v": None}}]


# --------------------------------------------------------------------------- provenance, caches, prompts


@pytest.mark.parametrize("raw, problem", [(b"{not json", "is not JSON (JSONDecodeError)"),
                                          (b"[1, 2]", "is a JSON list, not an object"),
                                          (b"\xff\xfe", "is not JSON"),
                                          (b"[" * 100_000 + b"]" * 100_000, "is not JSON (RecursionError)")])
def test_malformed_provenance_is_one_line(tmp_path, raw, problem):
    from sera_cli.data import lineage
    from sera_cli.data.tables import read_inputs

    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"x": [1]}).replace_schema_metadata({b"sera": raw}), path)
    for read in (lambda: read_inputs([str(path)]), lambda: lineage.of_file(str(path))):
        with pytest.raises(InputError, match=re.escape(f"{path}: its 'sera' provenance metadata {problem}")):
            read()


def test_corrupt_cache_databases_are_one_line(tmp_path):
    from sera_cli.backends.logps.cache import LogpCache
    from sera_cli.stages.eval.cache import JudgmentCache

    (tmp_path / "judgments.sqlite").write_bytes(b"SQLite format 3\x00" + b"\x01" * 200)
    (tmp_path / "logps.sqlite").write_bytes(b"not a database" * 50)
    for make, name in ((lambda: JudgmentCache(tmp_path), "judgments"), (lambda: LogpCache(tmp_path, {}), "logps")):
        with pytest.raises(InputError) as err:
            make()
        assert str(err.value) == (f"{tmp_path / name}.sqlite: is not a usable cache database: file is not a database "
                                  "(delete it to start the cache afresh; it only saves work, so nothing else is "
                                  "lost)")


def test_a_cached_log_prob_that_is_not_finite_is_computed_again(tmp_path):
    from sera_cli.backends.logps.cache import LogpCache

    cache = LogpCache(tmp_path, {"model": "m"})
    keys = cache.keys([([1, 2, 3], 1), ([4, 5], 1), ([6], 0)])
    cache.put(keys, [-1.5, float("nan"), float("-inf")], [2, 1, 1])
    assert cache.get(keys) == {keys[0]: (-1.5, 2)}
    cache.close()


def test_prompt_files_gzipped_are_read_and_broken_ones_are_one_line(tmp_path):
    from sera_cli.stages.eval.questions import read_questions

    (tmp_path / "q.jsonl.gz").write_bytes(gzip.compress(b'{"prompt": "Hi?"}\n'))
    assert [q.turns for q in read_questions(str(tmp_path / "q.jsonl.gz"))] == [("Hi?",)]
    (tmp_path / "cut.jsonl").write_bytes(gzip.compress(b'{"prompt": "Hi?"}\n' * 50)[:20])
    with pytest.raises(InputError, match=r"cut\.jsonl: cannot be read"):
        read_questions(str(tmp_path / "cut.jsonl"))
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(InputError, match=r"deep\.json: its JSON is nested too deep"):
        read_questions(str(tmp_path / "deep.json"))


# ------------------------------------------------------------------------------------------------ adapters


def test_adapter_chains_that_loop_are_refused(tmp_path, monkeypatch):
    from sera_cli.backends.models import resolve

    monkeypatch.chdir(tmp_path)
    for name, base in (("a", "b"), ("b", "a")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": base}))
    with pytest.raises(ModelError, match="leads back to this adapter"):
        resolve("a")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "adapter_config.json").write_text("[1]")
    with pytest.raises(ModelError, match="c: adapter_config.json names no base_model_name_or_path"):
        resolve("c")


def test_an_adapter_on_an_adapter_is_refused_not_silently_dropped(tmp_path, tiny_policy, monkeypatch):
    from sera_cli.backends.models import resolve

    monkeypatch.chdir(tmp_path)
    for name, base in (("inner", tiny_policy), ("outer", "inner")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": base}))
    assert resolve("inner").adapter == "inner"
    with pytest.raises(ModelError, match="outer: its base model 'inner' is itself an adapter"):
        resolve("outer")


def test_a_config_vocab_smaller_than_the_tokenizer_fails_before_work(tmp_path, tiny_policy, pairs_file):
    from sera_cli.stages.score.api import score
    from sera_cli.stages.score.config import ScoreConfig

    small = tmp_path / "small-vocab"
    shutil.copytree(tiny_policy, small)
    cfg = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({**cfg, "vocab_size": 100}))
    out = tmp_path / "out.parquet"
    with pytest.raises(InputError) as err:
        score(ScoreConfig(inputs=(pairs_file,), output=str(out), policy=str(small), ref=str(small), max_length=64,
                          max_prompt_length=32, progress=False))  # one model: no policy/ref vocabulary mismatch
    assert re.fullmatch(rf"{re.escape(pairs_file)}, row 0: token id [\d,]+ of its text has no embedding in "
                        rf"{re.escape(str(small))} \(vocab_size 100 in its config\.json\) \(.*\)", str(err.value))
    assert not out.exists()


# -------------------------------------------------------------------------------- judge endpoint replies


def test_reply_content_as_a_list_of_text_parts_is_joined():
    from sera_cli.backends.judges.reply import MalformedReply, reply_text

    def reply(content):
        return {"choices": [{"message": {"content": content}}]}

    assert reply_text(reply([{"type": "text", "text": "[[A]]"}, {"type": "text", "text": " because"}])) == \
        "[[A]] because"
    assert reply_text(reply(None)) == ""
    with pytest.raises(MalformedReply, match="part 1 is 'image_url', not text"):
        reply_text(reply([{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {}}]))
    with pytest.raises(MalformedReply, match="content is a int"):
        reply_text(reply(3))


GOOD = json.dumps({"choices": [{"message": {"content": [{"type": "text", "text": "[[A]]"}]}}]}).encode()
REPLIES = {  # what a hostile or broken endpoint sends back, as raw bytes on the socket
    "truncated": b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n" + GOOD[:20],
    "bad-status": b"HTTP/1.1 2x0 NOPE\r\n\r\n",
    "not-utf8": b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n\xff\xfe\xfd\xfc",
    "deep": b"HTTP/1.1 200 OK\r\nContent-Length: 200000\r\n\r\n" + b"[" * 100_000 + b"]" * 100_000,
    "list-content": b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(GOOD), GOOD),
}


def _serve(raw: bytes) -> tuple[str, socket.socket]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)

    def loop():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head, _, body = data.partition(b"\r\n\r\n")
                length = int(next((ln.split(b":")[1] for ln in head.split(b"\r\n")
                                   if ln.lower().startswith(b"content-length")), b"0"))
                while len(body) < length:
                    body += conn.recv(65536)
                conn.sendall(raw)

    threading.Thread(target=loop, daemon=True).start()
    return f"http://127.0.0.1:{listener.getsockname()[1]}/v1", listener


@pytest.mark.parametrize("case", sorted(REPLIES))
def test_malformed_endpoint_replies_are_one_line(case):
    from sera_cli.backends.judges.http import HTTPJudge

    url, listener = _serve(REPLIES[case])
    try:
        judge = HTTPJudge(url, "judge", max_tokens=8, retries=1, backoff=0.01, timeout=5, concurrency=1)
        got: dict[int, str] = {}
        if case == "list-content":
            judge.run([[{"role": "user", "content": "x"}]], got.__setitem__)
            assert got == {0: "[[A]]"}
            return
        with pytest.raises(ModelError) as err:
            judge.run([[{"role": "user", "content": "x"}]], got.__setitem__)
    finally:
        listener.close()
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"judge endpoint {url}: "), text
    assert {"truncated": "IncompleteRead", "bad-status": "BadStatusLine", "not-utf8": "reply is not UTF-8",
            "deep": "nested more than 64 deep"}[case] in text, text


# ------------------------------------------------------------------------------------- train --resume state


def test_a_truncated_checkpoint_is_one_line(tmp_path):
    import torch

    from trainers.checkpoint import check_no_code, saved_step

    folder = tmp_path / "partial" / "checkpoint"
    folder.mkdir(parents=True)
    torch.save({"state": {0: {"exp_avg": torch.zeros(64)}}, "param_groups": []}, folder / "optimizer.bin")
    data = (folder / "optimizer.bin").read_bytes()
    (folder / "optimizer.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError) as err:
        check_no_code(folder)
    assert str(err.value) == (f"{folder / 'optimizer.bin'}: is truncated or damaged (PytorchStreamReader failed "
                              "reading zip archive: failed finding central directory); it was not loaded (rerun "
                              "without --resume to start over)")
    (folder / "state.json").write_text('{"step": 3, "key"')
    with pytest.raises(InputError, match=r"state\.json: cannot be read \(JSONDecodeError\): the checkpoint is "
                                         r"damaged"):
        saved_step(tmp_path / "partial")

