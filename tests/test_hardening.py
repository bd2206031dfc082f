"""Hardening: resume never unpickles code, the judge client never leaks its key, input names are literal, every
input is counted against every output, failed writes are one line, and locks do not block forever."""

from __future__ import annotations

import errno
import http.server
import os
import pickle
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from sera_cli.commands.app import app
from sera_cli.data import tables as sio
from sera_cli.data.errors import InputError

runner = CliRunner()


def sera(*args, **kw):
    return runner.invoke(app, [str(a) for a in args], **kw)


def scored_table(n: int = 4) -> pa.Table:
    return pa.table({"id": [f"r{i}" for i in range(n)], "irm": [float(i) for i in range(n)],
                     "prompt": ["p"] * n, "chosen": ["c"] * n, "rejected": ["r"] * n})


@pytest.fixture
def scored_file(tmp_path) -> Path:
    path = tmp_path / "s.parquet"
    pq.write_table(scored_table(), path)
    return path


# ---- 1. resume never unpickles --------------------------------------------------------------------------


class _Payload:
    """Unpickling this runs `touch MARKER` (what a planted checkpoint file would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, scored, tiny_policy):
    """A `sera train` run stopped after its checkpoint at step 2: (config, partial folder)."""
    from sera_cli.stages.train.api import train
    from trainers import TrainConfig

    root = tmp_path_factory.mktemp("interrupted")
    cfg = TrainConfig(inputs=(scored,), output=str(root / "model"), policy=tiny_policy, lr=1e-3, batch_size=1,
                      micro_batch=1, max_steps=3, save_steps=2, progress=False, dtype="float32")

    def stop(record):
        if record["step"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, on_step=stop)
    return cfg, root / "model.partial"


def _resume_with(interrupted, tmp_path, plant):
    """Resume a copy of the interrupted run after `plant(checkpoint folder, marker)`; return the error."""
    import shutil

    from sera_cli.stages.train.api import train

    cfg, partial = interrupted
    out = tmp_path / "model"
    shutil.copytree(partial, tmp_path / "model.partial")
    marker = tmp_path / "code-ran"
    plant(tmp_path / "model.partial" / "checkpoint", marker)
    with pytest.raises(InputError) as err:
        train(replace(cfg, output=str(out), resume=True))
    assert not marker.exists(), "the planted pickle ran"
    assert not out.exists()
    return str(err.value)


def test_resume_refuses_a_planted_custom_state_pickle(interrupted, tmp_path):
    def plant(ckpt: Path, marker: Path):
        (ckpt / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(_Payload(marker)))

    line = _resume_with(interrupted, tmp_path, plant)
    assert line == (f"{tmp_path}/model.partial/checkpoint/custom_checkpoint_0.pkl: is not a file of a sera "
                    "checkpoint, and a checkpoint is never unpickled beyond plain tensors (remove it, or rerun "
                    "without --resume to start over)")


@pytest.mark.parametrize("name", ["random_states_0.pkl", "optimizer.bin", "pytorch_model.bin"])
def test_resume_refuses_a_state_file_that_holds_code(interrupted, tmp_path, name):
    def plant(ckpt: Path, marker: Path):
        assert (ckpt / name).exists() or name == "pytorch_model.bin"
        (ckpt / name).write_bytes(pickle.dumps(_Payload(marker), protocol=2))

    line = _resume_with(interrupted, tmp_path, plant)
    assert line.startswith(f"{tmp_path}/model.partial/checkpoint/{name}: holds code or objects, not plain tensors")
    assert "unsupported GLOBAL posix.system" in line  # the weights-only unpickler's reason
    assert line.endswith("it was not loaded (rerun without --resume to start over)")


def test_the_scheduler_state_is_json_in_the_checkpoint(interrupted):
    import json

    _, partial = interrupted
    ckpt = partial / "checkpoint"
    assert not list(ckpt.glob("custom_checkpoint_*"))
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == 2 and state["scheduler"]["last_epoch"] == 2


# ---- 1. the judge's key -----------------------------------------------------------------------------------


class _Recorder(http.server.BaseHTTPRequestHandler):
    seen: list[tuple[str, str | None]] = []
    reply: tuple[int, dict[str, str], bytes] = (200, {}, b"")

    def do_POST(self):
        self.seen.append((self.path, self.headers.get("Authorization")))
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        code, headers, body = self.reply
        self.send_response(code)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST

    def log_message(self, *a):
        pass


def _server(reply):
    handler = type("H", (_Recorder,), {"seen": [], "reply": reply})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, handler


def _judge(url, monkeypatch, key="sk-secret-123456"):
    from sera_cli.backends.judges.http import HTTPJudge

    monkeypatch.setenv("SERA_TEST_KEY", key)
    return HTTPJudge(url, "judge", max_tokens=8, api_key_env="SERA_TEST_KEY", retries=0, backoff=0.01)


def test_a_redirect_to_another_origin_is_not_followed_and_gets_no_key(monkeypatch):
    from sera_cli.backends.judges.http import JudgeRequestError

    other, seen_other = _server((200, {}, b'{"choices": [{"message": {"content": "[[A]]"}}]}'))
    # 127.0.0.1 and localhost are different origins (another host), as another port would be
    target = f"http://localhost:{other.server_port}/steal"
    first, seen_first = _server((307, {"Location": target}, b""))
    try:
        judge = _judge(f"http://127.0.0.1:{first.server_port}/v1", monkeypatch)
        with pytest.raises(JudgeRequestError) as err:
            judge.complete([{"role": "user", "content": "q"}])
    finally:
        first.shutdown()
        other.shutdown()
    assert seen_first.seen == [("/v1/chat/completions", "Bearer sk-secret-123456")]
    assert seen_other.seen == []  # never contacted, so never given the key
    assert str(err.value) == (f"HTTP 307: redirected to another origin (http://localhost:{other.server_port}), "
                              "not followed so that the API key is not sent there; give the final URL as "
                              "--judge-url if you trust it")


def test_a_server_body_is_printed_with_the_key_redacted(monkeypatch):
    from sera_cli.backends.judges.http import JudgeRequestError

    body = b'{"error": "bad key sk-secret-123456", "echo": "Authorization: Bearer sk-secret-123456\\nX"}'
    server, _ = _server((401, {}, body))
    try:
        judge = _judge(f"http://127.0.0.1:{server.server_port}/v1", monkeypatch)
        with pytest.raises(JudgeRequestError) as err:
            judge.complete([{"role": "user", "content": "q"}])
    finally:
        server.shutdown()
    line = str(err.value)
    assert "sk-secret" not in line and "\n" not in line
    assert line == 'HTTP 401 Unauthorized: {"error": "bad key ***", "echo": "Authorization: Bearer ***"}'


def test_redact_replaces_the_exact_key_and_any_bearer_token(monkeypatch):
    judge = _judge("http://127.0.0.1:9/v1", monkeypatch, key="k3y")
    assert judge.redact("k3y and Bearer abc.def and bearer\tXYZ;") == "*** and Bearer *** and Bearer ***;"


# ---- 1. input names are literal; sql reads every format through one locked path ---------------------------


def test_a_name_with_glob_characters_is_that_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pq.write_table(scored_table(2), "s1.parquet")
    pq.write_table(scored_table(3), "s[1].parquet")
    assert sio.expand(["s[1].parquet"]) == ["s[1].parquet"]  # the literal file, not the pattern's s1.parquet
    assert sio.read_inputs(["s[1].parquet"]).table.num_rows == 3
    assert sio.expand(["s?.parquet"]) == ["s1.parquet"]  # no file is named 's?.parquet': a pattern
    with pytest.raises(InputError) as err:
        sio.expand(["t[1].parquet"])
    assert str(err.value) == "t[1].parquet: no file has this name, and read as a glob pattern it matches no file"


@pytest.mark.parametrize("suffix,write", [
    (".csv", lambda p, v: p.write_text(f"x\n{v}\n")),
    (".jsonl", lambda p, v: p.write_text(f'{{"x": {v}}}\n')),
    (".parquet", lambda p, v: pq.write_table(pa.table({"x": [v]}), p)),
])
def test_sql_reads_the_literal_file_of_every_format(tmp_path, monkeypatch, suffix, write):
    monkeypatch.chdir(tmp_path)
    write(Path(f"a1{suffix}"), 1)
    write(Path(f"a[1]{suffix}"), 2)
    r = sera("sql", "SELECT x FROM a_1_", f"a[1]{suffix}", "--json")
    assert r.exit_code == 0, r.stderr
    assert r.stdout.strip() == '[{"x": 2}]'


def test_sql_csv_reader_is_locked_to_its_file(tmp_path):
    from sera_cli.stages.sql import _read_text_table

    (tmp_path / "a.csv").write_text("x\n1\n")
    assert _read_text_table(str(tmp_path / "a.csv"), "read_csv_auto").to_pydict() == {"x": [1]}


# ---- 2. every input counted ---------------------------------------------------------------------------------


def test_inputs_of_lists_every_input_field_and_the_config_file():
    from sera_cli.stages.eval.config import EvalConfig

    cfg = EvalConfig(policies=("pol/",), prompts="q.jsonl", output_dir="ev", answers="a.parquet",
                     baseline="sft/", judge="j/")
    sio.note_input("cfg.toml")
    try:
        assert sio.inputs_of(cfg) == ["a.parquet", "q.jsonl", "pol/", "sft/", "j/", "cfg.toml"]
    finally:
        sio.forget_noted_inputs()
    assert sio.inputs_of(cfg, "x") == ["a.parquet", "q.jsonl", "pol/", "sft/", "j/", "x"]


def test_output_same_as_stdin_is_refused(tmp_path, scored_file):
    before = scored_file.read_bytes()
    with open(scored_file, "rb") as f:
        done = subprocess.run([sys.executable, "-m", "sera_cli", "select", "-", "--top", "0.5", "-o",
                               str(scored_file)], stdin=f, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr == (f"error: {scored_file}: is the file given on standard input (outputs never replace "
                           "inputs: choose another output path)\n")
    assert scored_file.read_bytes() == before


def test_config_file_is_an_input(tmp_path, scored_file):
    cfg = tmp_path / "c.toml"
    cfg.write_text("top = 0.5\n")
    r = sera("select", scored_file, "--config", cfg, "-o", f"{tmp_path}/./c.toml")
    assert r.exit_code == 1
    assert r.stderr == (f"error: {tmp_path}/./c.toml: is the input {cfg} (outputs never replace inputs: choose "
                        "another output path)\n")
    assert cfg.read_text() == "top = 0.5\n"
    assert sio._noted == []  # the next command starts with no noted inputs


def test_output_by_another_spelling_or_hard_link_is_refused(tmp_path, scored_file):
    os.link(scored_file, tmp_path / "link.parquet")
    for out in (tmp_path / "sub" / ".." / "s.parquet", tmp_path / "link.parquet"):
        (tmp_path / "sub").mkdir(exist_ok=True)
        r = sera("select", scored_file, "--top", "0.5", "-o", out)
        assert r.exit_code == 1 and "outputs never replace inputs" in r.stderr, r.stderr


@pytest.mark.parametrize("option", ["--prompts", "--answers"])
def test_eval_outputs_never_replace_its_inputs(tmp_path, option):
    ev = tmp_path / "ev"
    ev.mkdir()
    (ev / "judgments.parquet").write_bytes(b"precious")
    q = tmp_path / "q.jsonl"
    q.write_text('{"prompt": "hi"}\n')
    given = {"--prompts": q, "--answers": None}
    given[option] = ev / "judgments.parquet"
    args = ["eval", "--policy", "m", "--baseline", "b", "--prompts", given["--prompts"], "--judge", "j", "-o", ev]
    if given["--answers"]:
        args += ["--answers", given["--answers"]]
    r = sera(*args)
    assert r.exit_code == 1
    assert r.stderr == (f"error: {ev}/judgments.parquet: is the input {ev}/judgments.parquet (outputs never "
                        "replace inputs: choose another output path)\n")
    assert (ev / "judgments.parquet").read_bytes() == b"precious"


def test_score_cache_is_an_input(tmp_path, scored_file):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "entry.parquet").write_bytes(b"cached")
    r = sera("score", scored_file, "--policy", "p", "--ref", "r", "--cache", cache, "-o", cache / "entry.parquet")
    assert r.exit_code == 1
    assert r.stderr == (f"error: {cache}/entry.parquet: is a file of the input folder {cache} (outputs never "
                        "replace inputs: choose another output path)\n")


# ---- 2. train takes the output lock ----------------------------------------------------------------------------


def test_a_second_trainer_of_the_same_output_stops(tmp_path, scored_file):
    from sera_cli.stages.train.api import output_lock
    from trainers import TrainConfig

    cfg = TrainConfig(inputs=(str(scored_file),), output=str(tmp_path / "model"), policy="p")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = tmp_path / ".model.train-lock"
        lock.write_text(str(holder.pid))
        os.utime(lock, (time.time() + 5, time.time() + 5))  # written after the holder started
        r = sera("train", scored_file, "--policy", "p", "-o", tmp_path / "model")
        assert r.exit_code == 1
        assert r.stderr == (f"error: {tmp_path}/model: another sera process (pid {holder.pid}) is training into "
                            f"this output (its lock {lock} is held); wait for it to finish or choose another "
                            "--output\n")
        assert lock.read_text() == str(holder.pid) and not (tmp_path / "model").exists()
        # a lock written before its pid's process started names a reused pid: taken over
        os.utime(lock, (time.time() - 3600, time.time() - 3600))
        with output_lock(cfg):
            assert lock.read_text() == str(os.getpid())
        assert not lock.exists()
    finally:
        holder.kill()
        holder.wait()
    foreign = subprocess.Popen(["sleep", "60"])  # alive, but not a Python (sera) process: not a holder
    try:
        while not Path(f"/proc/{foreign.pid}/cmdline").read_bytes().startswith(b"sleep"):  # exec'd yet?
            time.sleep(0.01)
        lock.write_text(str(foreign.pid))
        with output_lock(cfg):
            assert lock.read_text() == str(os.getpid())
    finally:
        foreign.kill()
        foreign.wait()


# ---- 3. failures are one line --------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES, errno.ENOTDIR, errno.ENAMETOOLONG, errno.EROFS,
                                  errno.EIO])
def test_every_failed_write_is_one_line_and_leaves_nothing(tmp_path, scored_file, monkeypatch, code):
    real = pq.write_table

    def failing(table, where, *a, **kw):
        real(table, where, *a, **kw)  # half a file written, then the failure
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(pq, "write_table", failing)
    out = tmp_path / "out.parquet"
    r = sera("select", scored_file, "--top", "0.5", "-o", out)
    assert r.exit_code == 1
    assert r.stderr == f"error: {out}: cannot be written: {os.strerror(code)}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.parquet"]


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path, scored_file):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".out.parquet.tmp-{dead.stdout.strip()}"
    stale.write_bytes(b"half")
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # a live Python writer
    try:
        live = tmp_path / f".out.parquet.tmp-{writer.pid}"  # a live process's temporary stays
        live.write_bytes(b"writing")
        os.utime(live, (time.time() + 5, time.time() + 5))
        r = sera("select", scored_file, "--top", "0.5", "-o", tmp_path / "out.parquet")
    finally:
        writer.kill()
        writer.wait()
    assert r.exit_code == 0, r.stderr
    assert not stale.exists() and live.exists()


@pytest.mark.parametrize("output,line", [
    ("/dev/null", "/dev/null: is not a regular file (a device, pipe or socket); give a file name for the output, "
                  "or '-' for standard output"),
    ("newdir/", "newdir/: is a folder; give a file name for the output"),
    ("s.parquet/x.parquet", "s.parquet/x.parquet: cannot be written: s.parquet is a file, not a folder"),
])
def test_misleading_output_messages(tmp_path, scored_file, monkeypatch, output, line):
    monkeypatch.chdir(tmp_path)
    r = sera("select", "s.parquet", "--top", "0.5", "-o", output)
    assert (r.exit_code, r.stderr) == (1, f"error: {line}\n")
    assert not (tmp_path / "newdir").exists()


def test_a_cache_dir_that_is_a_file_is_named(tmp_path, monkeypatch, scored_file):
    monkeypatch.setenv("SERA_CACHE_DIR", str(scored_file))
    from sera_cli.data.cache_folder import cache_dir

    with pytest.raises(Exception) as err:
        cache_dir()
    assert str(err.value) == (f"sera's cache folder {scored_file} (from SERA_CACHE_DIR) cannot be used: "
                              f"{scored_file} is a file, not a folder; point SERA_CACHE_DIR at a folder")


def test_interrupted_hint_names_resume_only_where_the_command_has_it(capsys):
    from sera_cli.commands.edge import guarded

    def with_resume(resume: bool = False):
        raise KeyboardInterrupt

    def without():
        raise KeyboardInterrupt

    import typer

    for fn, hint in ((with_resume, "rerun with --resume to keep finished work"), (without, "rerun the same command")):
        with pytest.raises(typer.Exit):
            guarded(fn)()
        assert capsys.readouterr().err == f"interrupted: no output was written; {hint}\n"
