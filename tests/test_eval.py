"""`sera eval`: prompt formats, the MT-bench protocol, win-rate arithmetic, caching, resuming, bad input."""

from __future__ import annotations

import http.server
import json
import math
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from sera_cli.commands.app import app
from sera_cli.data.errors import ConfigError, InputError, ModelError
from sera_cli.stages.eval import protocol, stats
from sera_cli.stages.eval.api import evaluate
from sera_cli.stages.eval.cache import JudgmentCache
from sera_cli.stages.eval.config import EvalConfig
from sera_cli.stages.eval.judging import plan
from sera_cli.stages.eval.questions import read_questions
from tests.conftest import FIXTURES, SHARED, _tiny_llama, needs_shared

MT_FIXTURE = FIXTURES / "eval-prompts" / "mt_bench_question.jsonl"  # FastChat's question format, own text

QUESTIONS = [{"question_id": i, "category": "generic", "turns": [t]} for i, t in enumerate(
    ["Name a colour.", "What is 2+2?", "Say hi.", "Capital of France?"], start=1)]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def questions_file(tmp_path) -> str:
    return write_jsonl(tmp_path / "question.jsonl", QUESTIONS)


def answers_file(tmp_path: Path, models: dict[str, list[str]]) -> str:
    rows = [{"prompt_id": str(q["question_id"]), "model": m, "response": a[i]}
            for m, a in models.items() for i, q in enumerate(QUESTIONS)]
    path = tmp_path / "answers.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


# --- prompt formats ---------------------------------------------------------------------------------------------

def test_fastchat_first_turn_and_all_turns():
    mt = str(MT_FIXTURE)
    first = read_questions(mt)
    both = read_questions(mt, "all")
    assert len(first) == len(both) == 6
    assert first[0].question_id == "201" and len(first[0].turns) == 1 and len(both[0].turns) == 2
    assert both[0].turns[1] == "Rewrite the note as a four-line poem."
    assert (first[0].category, first[0].reference, first[0].text) == (
        "writing", None, "Write a short note inviting your neighbours to a street clean-up on Saturday morning.")
    refs = [q for q in both if q.reference]
    assert [q.question_id for q in refs] == ["203", "204", "205"]
    assert {q.category for q in refs} == {"math", "reasoning", "coding"}
    assert both[2].reference[1] == "Each pencil costs 15 cents, so 300 / 15 = 20 pencils."
    assert first[2].reference == ("12 pencils are 4 groups of 3, so they cost 4 x 45 = 180 cents, or 1.80 dollars.",)


def test_fastchat_mt_bench_shared():
    mt = str(needs_shared(SHARED / "eval-prompts" / "mt_bench" / "question.jsonl"))
    first = read_questions(mt)
    both = read_questions(mt, "all")
    assert len(first) == len(both) == 80
    assert first[0].question_id == "81" and len(first[0].turns) == 1 and len(both[0].turns) == 2
    assert both[0].turns[1] == "Rewrite your previous response. Start every sentence with the letter A."
    refs = [q for q in both if q.reference]
    assert len(refs) == 39 and {q.category for q in refs} >= {"math", "reasoning"}


def test_prompt_table_alpaca_and_wizardlm(tmp_path):
    table = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": [[{"role": "user", "content": "Hi?"}]], "id": ["x1"]}), table)
    q = read_questions(str(table))[0]
    assert (q.question_id, q.turns, q.raw) == ("x1", ("Hi?",), [{"role": "user", "content": "Hi?"}])
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": "Add 2 and 3.", "output": "5", "dataset": "helpful"}]))
    q = read_questions(str(alpaca))[0]
    assert q.turns == ("Add 2 and 3.",) and q.reference == ("5",) and len(q.question_id) == 16
    wiz = read_questions(str(FIXTURES / "eval-prompts" / "wizardlm_testset.jsonl"))
    assert [(q.question_id, q.category) for q in wiz] == [("1", "Math"), ("2", "Writing"), ("3", "Common-Sense")]
    assert wiz[1].turns == ("Write a two-sentence story about a lost umbrella.",) and wiz[1].reference is None
    alpaca = read_questions(str(FIXTURES / "eval-prompts" / "alpaca_eval.json"))
    assert [(q.turns, q.reference) for q in alpaca] == [(("List three colours of a rainbow.",), ("Red, green and blue.",)),
                                                        (("Translate 'good morning' into French.",), ("Bonjour.",))]
    assert len({q.question_id for q in alpaca}) == 2 and {q.category for q in alpaca} == {"sera-fixture"}


def test_wizardlm_shared():
    wiz = read_questions(str(needs_shared(SHARED / "eval-prompts" / "wizardlm_evol_instruct" / "WizardLM_testset.jsonl")))
    assert len(wiz) == 218 and wiz[0].question_id == "1" and wiz[0].category == "Math"


def test_unknown_prompt_format_is_one_line(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "hi", "answer": "x"}])
    with pytest.raises(InputError) as err:
        read_questions(bad)
    assert str(err.value) == (
        f"{bad}, row 0: unknown prompt format: columns answer, question (give a 'prompt' column, FastChat "
        "questions ('question_id', 'turns'), AlpacaEval ('instruction') or WizardLM ('Instruction'))")
    r = CliRunner().invoke(app, ["eval", "--policy", "a", "--baseline", "b", "--prompts", bad, "--judge",
                                 "smollm2-135m", "-o", str(tmp_path / "out")])
    assert r.exit_code == 1 and r.stderr == f"error: {err.value}\n"


# --- the protocol -------------------------------------------------------------------------------------------------

def test_parse_pairwise_and_rating():
    assert protocol.parse_pairwise("A is clearly better. [[A]]") == ("A", None)
    assert protocol.parse_pairwise("Verdict: [[C]]") == ("tie", None)
    assert protocol.parse_pairwise("I think B") == (None, "no verdict [[A]], [[B]] or [[C]] in the judge's text")
    assert protocol.parse_pairwise('"[[A]]" if A is better, "[[B]]" if B') == (
        None, "several verdicts in the judge's text: [[A]], [[B]]")
    assert protocol.parse_rating("Good answer. Rating: [[7]]") == (7.0, None)
    assert protocol.parse_rating("Rating: [[8.5]] and again [[8.5]]") == (8.5, None)
    assert protocol.parse_rating("Rating: [[11]]") == (None, "rating 11 is outside 1-10")
    assert protocol.parse_rating("[[3]] or [[4]]") == (None, "several ratings in the judge's text: 3, 4")
    assert protocol.parse_rating("Rating: 7") == (None, "no [[rating]] in the judge's text")


def test_both_orders_logic():
    win_ab, win_ba = protocol.model_point("AB", "A"), protocol.model_point("BA", "B")
    assert (win_ab, win_ba) == (1.0, 1.0) and protocol.combine(win_ab, win_ba) == 1.0  # agree: win
    # The judge picks position A both times: the orders disagree, so it is a tie.
    assert protocol.combine(protocol.model_point("AB", "A"), protocol.model_point("BA", "A")) == 0.5
    assert protocol.combine(protocol.model_point("AB", "B"), protocol.model_point("BA", "A")) == 0.0
    assert protocol.combine(protocol.model_point("AB", "tie"), protocol.model_point("BA", "B")) == 0.5
    assert protocol.combine(protocol.model_point("AB", None), 1.0) is None


def test_templates_follow_fastchat():
    mt = read_questions(str(MT_FIXTURE), "all")
    math_q = next(q for q in mt if q.category == "math")
    writing = mt[0]
    assert protocol.template_for("pairwise", writing, 1).name == "pair-v2"
    assert protocol.template_for("pairwise", writing, 2).name == "pair-v2-multi-turn"
    assert protocol.template_for("pairwise", math_q, 1).name == "pair-math-v1"
    assert protocol.template_for("single", math_q, 2).name == "single-math-v1-multi-turn"
    assert protocol.template_for("single", writing, 1).name == "single-v1"
    name, msgs = protocol.judge_messages("pairwise", writing, 1, ["mine"], ["theirs"])
    assert msgs[0]["role"] == "system" and "[[C]]" in msgs[0]["content"]
    assert msgs[1]["content"] == ("[User Question]\n" + writing.turns[0] + "\n\n[The Start of Assistant A's Answer]\n"
                                  "mine\n[The End of Assistant A's Answer]\n\n[The Start of Assistant B's Answer]\n"
                                  "theirs\n[The End of Assistant B's Answer]")


def test_judge_prompt_file_in_fastchat_format():
    """FastChat's judge-prompt layout read from a file the tests ship (own text), and the bundled file holds every
    template the protocol picks."""
    got = protocol.read_templates(FIXTURES / "eval-prompts" / "judge_prompts.jsonl")
    assert sorted(got) == ["pair-short", "single-short"]
    pair = got["pair-short"]
    assert pair.system.endswith("then end with [[A]], [[B]] or [[C]] for a tie.")
    assert pair.user.format(question="2+2?", answer_a="4", answer_b="5") == (
        "[Question]\n2+2?\n\n[Answer A]\n4\n\n[Answer B]\n5")
    bundled = protocol.templates()
    assert {f"{m}{ref}-v{v}{turn}" for m, ref, v in (("pair", "", 2), ("pair", "-math", 1), ("single", "", 1),
                                                      ("single", "-math", 1)) for turn in ("", "-multi-turn")} \
        <= set(bundled)


# --- statistics -------------------------------------------------------------------------------------------------

def test_win_rate_and_bootstrap_interval():
    points = np.array([1, 1, 0.5, 0, 1, 0.5, 0, 1])
    assert stats.win_rate(points) == pytest.approx((4 + 2 * 0.5) / 8)
    assert stats.bootstrap_ci(np.full(10, 0.5)) == (0.5, 0.5)
    # The same resamples drawn by hand: percentile interval of the resampled means.
    rng = np.random.default_rng(3)
    means = [points[rng.integers(0, 8, size=8)].mean() for _ in range(200)]
    lo, hi = stats.bootstrap_ci(points, resamples=200, seed=3)
    assert (lo, hi) == pytest.approx(tuple(np.quantile(means, [0.025, 0.975])))
    # Large n: close to the normal interval p +- 1.96 sqrt(p (1 - p) / n) = 0.6 +- 0.0480.
    big = np.array([1.0] * 240 + [0.0] * 160)
    lo, hi = stats.bootstrap_ci(big, resamples=4000, seed=0)
    assert lo == pytest.approx(0.6 - 0.0480, abs=0.006) and hi == pytest.approx(0.6 + 0.0480, abs=0.006)


def test_length_controlled_win_rate_by_hand():
    # Longer answers (x = +1 after tanh scaling) win 3 of 4, shorter ones 2 of 4. Two distinct x values make the
    # logistic model saturated: sigmoid(a + b c) = 3/4 and sigmoid(a - b c) = 1/2, so a = ln(3) / 2 and the
    # win rate at equal length is sigmoid(ln(3) / 2) = sqrt(3) / (1 + sqrt(3)) = 0.6340, against 5/8 raw.
    points = np.array([1, 1, 1, 0, 1, 1, 0, 0], float)
    len_model = np.array([20, 20, 20, 20, 10, 10, 10, 10])
    len_base = np.full(8, 15)
    lc = stats.length_controlled_win_rate(points, len_model, len_base, penalty=0.0)
    assert lc == pytest.approx(math.sqrt(3) / (1 + math.sqrt(3)), abs=1e-8)
    # Equal lengths: nothing to correct, the rate is the plain one.
    assert stats.length_controlled_win_rate(points, len_base, len_base) == pytest.approx(5 / 8, abs=1e-8)


# --- the whole flow -----------------------------------------------------------------------------------------------

def seed_cache(folder: Path, config: EvalConfig, texts: dict[tuple[str, str, str], str]) -> None:
    """Put hand-made judge texts into the judgments cache, for the judgments this config plans."""
    from sera_cli.stages.eval.answers import given_answers
    from sera_cli.stages.eval.judging import make_judge

    qs = read_questions(config.prompts)
    answers = given_answers(config.answers, ["pol", "sft"], qs)
    jobs = plan(config, qs, answers, make_judge(config).identity())
    cache = JudgmentCache(folder)
    for j in jobs:
        cache.put(j.key, "hand", j.template, texts[(j.model, j.question_id, j.order)])
    cache.close()


def test_pairwise_summary_from_hand_made_judgments(tmp_path, questions_file, tiny_policy):
    answers = answers_file(tmp_path, {"pol": ["Blue, a colour of the sky.", "4", "Hi there!", "Paris."],
                                      "sft": ["Red.", "It is 4, since 2+2=4.", "Hello.", "Paris, France."]})
    config = EvalConfig(policies=("pol",), baseline="sft", prompts=questions_file, output_dir=str(tmp_path / "out"),
                        answers=answers, judge=tiny_policy, progress=False)
    texts = {("pol", "1", "AB"): "[[A]]", ("pol", "1", "BA"): "[[B]]",       # both orders agree: win
             ("pol", "2", "AB"): "[[A]]", ("pol", "2", "BA"): "[[A]]",       # position A both times: tie
             ("pol", "3", "AB"): "B is better [[B]]", ("pol", "3", "BA"): "[[A]]",  # loss
             ("pol", "4", "AB"): "no idea", ("pol", "4", "BA"): "[[C]]"}     # unparseable: counted, left out
    seed_cache(tmp_path / "out", config, texts)
    result = evaluate(config)
    assert result.judged == 0 and result.cached == 8 and result.generated == {"pol": 0, "sft": 0}
    j = pq.read_table(result.judgments)
    assert j.column_names == ["question_id", "model", "baseline", "order", "judge", "verdict", "score",
                              "judge_text", "error"]
    assert j.column("verdict").to_pylist() == ["A", "B", "A", "A", "B", "A", None, "tie"]
    assert j.column("score").to_pylist() == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, None, 0.5]
    assert j.column("error").to_pylist()[6] == "no verdict [[A]], [[B]] or [[C]] in the judge's text"
    s = pq.read_table(result.summary_path).to_pylist()[0]
    assert (s["wins"], s["ties"], s["losses"], s["parse_failures"], s["questions"]) == (1, 1, 1, 1, 4)
    assert s["win_rate"] == pytest.approx(0.5)
    assert s["mean_length"] == pytest.approx(np.mean([26, 1, 9, 6]))
    assert s["baseline_mean_length"] == pytest.approx(np.mean([4, 21, 6, 14]))
    assert 0 <= s["ci_low"] <= 0.5 <= s["ci_high"] <= 1
    prov = json.loads(pq.read_schema(result.summary_path).metadata[b"sera"])
    assert prov["stage"] == "eval" and prov["judge"]["kind"] == "local" and prov["templates"] == ["pair-v2"]


def test_single_grades_from_hand_made_judgments(tmp_path, questions_file, tiny_policy):
    answers = answers_file(tmp_path, {"pol": ["a", "b", "c", "d"], "sft": ["e", "f", "g", "h"]})
    config = EvalConfig(policies=("pol",), baseline="sft", prompts=questions_file, output_dir=str(tmp_path / "out"),
                        answers=answers, judge=tiny_policy, mode="single", progress=False)
    grades = {"pol": ["Rating: [[8]]", "[[6]]", "[[7]]", "Rating: 9"], "sft": ["[[2]]", "[[4]]", "[[3]]", "[[5]]"]}
    seed_cache(tmp_path / "out", config, {(m, str(i + 1), "single"): t for m, ts in grades.items()
                                          for i, t in enumerate(ts)})
    summary = {r["model"]: r for r in evaluate(config).summary}
    assert summary["pol"]["mean_grade"] == pytest.approx(7.0) and summary["pol"]["parse_failures"] == 1
    assert summary["sft"]["mean_grade"] == pytest.approx(3.5) and summary["sft"]["win_rate"] is None


def test_whole_flow_with_tiny_models_caches_answers_and_judgments(tmp_path, questions_file, tiny_policy, tiny_ref,
                                                                  smol):
    out = tmp_path / "eval"
    args = ["eval", "--policy", tiny_policy, "--baseline", tiny_ref, "--prompts", questions_file, "--judge",
            tiny_policy, "--max-new-tokens", "6", "--judge-max-tokens", "6", "-o", str(out), "--json"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.stderr
    first = json.loads(r.stdout)
    assert first["judged"] == 8 and first["generated"] == {tiny_policy: 4, tiny_ref: 4}
    j = pq.read_table(out / "judgments.parquet")
    assert j.num_rows == 8 and set(j.column("order").to_pylist()) == {"AB", "BA"}
    s = first["summary"][0]
    # A random tiny judge writes no verdicts: every judgment is counted as a parse failure, none is guessed.
    failures = sum(e is not None for e in j.column("error").to_pylist())
    assert s["parse_failures"] == failures and s["wins"] + s["ties"] + s["losses"] <= 4
    r = CliRunner().invoke(app, args)
    again = json.loads(r.stdout)
    assert again["judged"] == 0 and again["cached"] == 8 and again["generated"] == {tiny_policy: 0, tiny_ref: 0}
    assert again["summary"] == first["summary"]
    # A second policy later: only its own answers are generated, the baseline's come from the cache.
    other = _tiny_llama(tmp_path / "other-policy", smol.path, seed=3)
    r = CliRunner().invoke(app, args[:3] + ["--policy", str(other)] + args[3:])
    third = json.loads(r.stdout)
    assert third["generated"] == {tiny_policy: 0, str(other): 4, tiny_ref: 0} and third["judged"] == 8


def no_template_judge(tmp_path: Path, tiny_policy: str) -> str:
    folder = tmp_path / "no-template"
    shutil.copytree(tiny_policy, folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    return str(folder)


def test_judge_without_chat_template(tmp_path, questions_file, tiny_policy):
    judge = no_template_judge(tmp_path, tiny_policy)
    answers = answers_file(tmp_path, {"pol": ["a", "b", "c", "d"], "sft": ["e", "f", "g", "h"]})
    config = EvalConfig(policies=("pol",), baseline="sft", prompts=questions_file, output_dir=str(tmp_path / "o"),
                        answers=answers, judge=judge, progress=False)
    with pytest.raises(ModelError) as err:
        evaluate(config)
    assert str(err.value) == (f"judge {judge}: its tokenizer has no chat template; a judge must be a chat "
                              "(instruct) model, or serve one behind --judge-url")


def test_config_problems_reported_at_once(tmp_path):
    with pytest.raises(ConfigError) as err:
        EvalConfig(policies=("a/",), prompts="q.jsonl", output_dir="o", judge_url="localhost:8000").check()
    assert str(err.value) == (
        "--mode pairwise needs --baseline (the model every policy is compared with, e.g. the SFT model); "
        "--judge-url needs --judge-model (the model name the endpoint serves); --judge-url localhost:8000: "
        "expected http://host:port/v1 or https://...")


# --- the endpoint judge: failures (the real-server test is tests/test_eval_vllm_server.py) ------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_config(tmp_path: Path, questions_file: str, url: str, **kw) -> EvalConfig:
    answers = answers_file(tmp_path, {"pol": ["a", "b", "c", "d"], "sft": ["e", "f", "g", "h"]})
    return EvalConfig(policies=("pol",), baseline="sft", prompts=questions_file, output_dir=str(tmp_path / "o"),
                      answers=answers, judge_url=url, judge_model="judge", judge_retries=1, judge_backoff=0.01,
                      progress=False, **kw)


def test_refused_endpoint_retries_then_one_line(tmp_path, questions_file):
    url = f"http://127.0.0.1:{free_port()}/v1"
    t0 = time.perf_counter()
    with pytest.raises(ModelError) as err:
        evaluate(http_config(tmp_path, questions_file, url, judge_concurrency=1))
    assert str(err.value) == (f"judge endpoint {url}: [Errno 111] Connection refused (after 2 tries); 0 of 8 new "
                              "judgments finished and were kept, rerun the same command to resume")
    assert time.perf_counter() - t0 < 10


def test_endpoint_that_times_out(tmp_path, questions_file):
    with socket.socket() as listener:  # accepts connections (the kernel's backlog) and never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
        with pytest.raises(ModelError) as err:
            evaluate(http_config(tmp_path, questions_file, url, judge_timeout=0.3, judge_concurrency=2))
    assert str(err.value).startswith(f"judge endpoint {url}: timed out") and "(after 2 tries); 0 of 8" in str(err.value)


class _FlakyChat(http.server.BaseHTTPRequestHandler):
    """Plumbing only (a fake): answers the first `budget` chat requests with a verdict, then HTTP 503."""

    budget = 3
    served = 0

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        cls = type(self)
        if cls.served >= cls.budget:
            self.send_response(503)
            self.end_headers()
            self.wfile.write(b"overloaded")
            return
        cls.served += 1
        text = "[[A]]" if "Assistant A" in body["messages"][1]["content"] else "?"
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_failing_endpoint_keeps_finished_judgments_and_resumes(tmp_path, questions_file):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FlakyChat)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    try:
        config = http_config(tmp_path, questions_file, url, judge_concurrency=1)
        with pytest.raises(ModelError) as err:
            evaluate(config)
        assert str(err.value) == (f"judge endpoint {url}: HTTP 503 Service Unavailable: overloaded (after 2 "
                                  "tries); 3 of 8 new judgments finished and were kept, rerun the same command to "
                                  "resume")
        with sqlite3.connect(tmp_path / "o" / "judgments.sqlite") as db:
            assert db.execute("SELECT count(*) FROM judgments").fetchone()[0] == 3
        _FlakyChat.budget = 100
        result = evaluate(config)
        assert (result.judged, result.cached) == (5, 3) and _FlakyChat.served == 8
    finally:
        server.shutdown()


# --- resume after a killed eval -------------------------------------------------------------------------------------

def test_resume_after_killed_eval(tmp_path, questions_file, smol):
    answers = answers_file(tmp_path, {"pol": ["Blue.", "4", "Hi!", "Paris."], "sft": ["Red.", "5", "Yo.", "Rome."]})
    out = tmp_path / "out"
    args = [sys.executable, "-m", "sera_cli", "eval", "--policy", "pol", "--baseline", "sft", "--prompts",
            questions_file, "--answers", answers, "--judge", "smollm2-135m", "--judge-max-tokens", "16", "--judge-batch-size", "1", "-q",
            "-o", str(out)]
    proc = subprocess.Popen(args + ["--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    db = out / "judgments.sqlite"
    deadline = time.time() + 600
    done_before = 0
    while time.time() < deadline and proc.poll() is None:
        if db.exists():
            try:
                with sqlite3.connect(db) as con:
                    done_before = con.execute("SELECT count(*) FROM judgments").fetchone()[0]
            except sqlite3.OperationalError:  # the file exists a moment before its table does
                time.sleep(0.05)
                continue
            if done_before >= 1:
                proc.kill()
                break
        time.sleep(0.05)
    proc.wait()
    assert 1 <= done_before < 8 and not (out / "summary.parquet").exists()
    with sqlite3.connect(db) as con:
        kept = con.execute("SELECT count(*) FROM judgments").fetchone()[0]
    done = subprocess.run(args + ["--json"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["judged"] == 8 - kept and result["cached"] == kept
    # The same as a run that was never interrupted (greedy judge; each judgment is its own batch of one).
    fresh = subprocess.run(args[:-2] + ["-o", str(tmp_path / "fresh"), "--json"], capture_output=True, text=True,
                           timeout=900)
    assert json.loads(fresh.stdout)["summary"] == result["summary"]


# --- sera report and sera run --eval ---------------------------------------------------------------------------

def test_report_shows_an_eval_folder(tmp_path, questions_file, tiny_policy):
    answers = answers_file(tmp_path, {"pol": ["a", "bb", "c", "d"], "sft": ["e", "f", "g", "h"]})
    config = EvalConfig(policies=("pol",), baseline="sft", prompts=questions_file, output_dir=str(tmp_path / "out"),
                        answers=answers, judge=tiny_policy, progress=False)
    seed_cache(tmp_path / "out", config, {("pol", str(q), o): "[[A]]" if o == "AB" else "[[B]]"
                                          for q in range(1, 5) for o in ("AB", "BA")})
    evaluate(config)
    r = CliRunner().invoke(app, ["report", str(tmp_path / "out")], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.stderr
    lines = [line for line in r.stdout.splitlines() if "│ pol" in line]
    assert len(lines) == 1 and "100.0%" in lines[0] and "4/0/0" in lines[0] and "sera eval" in r.stdout


def test_run_with_eval_judges_each_iteration_and_skips_when_up_to_date(tmp_path, questions_file, tiny_policy):
    from sera_cli.stages.run.api import run
    from sera_cli.stages.run.config import build
    from sera_cli.stages.run.data import DEMO_DATA

    wd = tmp_path / "wd"
    config = build(None, {"data": (str(DEMO_DATA),), "policy": tiny_policy, "workdir": str(wd), "method": "dpo",
                          "rows": 8, "max_length": 80, "max_prompt_length": 40, "batch_size": 4, "heldout": 0.0,
                          "eval": questions_file, "judge": tiny_policy, "eval_max_new_tokens": 4,
                          "judge_max_tokens": 4})
    first = run(config)
    assert first.ran[-1] == "iter-1/eval"
    ledger = json.loads((wd / "run.json").read_text())
    # 8 judgments; 4 distinct judge prompts when pi_1 still answers as pi_0 does (then AB and BA read alike)
    assert ledger["stages"]["iter-1/eval"]["summary"]["judged"] in (4, 8)
    assert pq.read_table(wd / "iter-1" / "eval" / "judgments.parquet").num_rows == 8
    summary = pq.read_table(wd / "iter-1" / "eval" / "summary.parquet").to_pylist()[0]
    assert summary["model"] == str(wd / "iter-1" / "model") and summary["baseline"] == tiny_policy
    assert len(list((wd / "eval-cache" / "answers").glob("*.parquet"))) == 2
    again = run(config)
    assert "iter-1/eval" in again.skipped and not again.ran
    with pytest.raises(ConfigError, match="eval needs a judge"):
        build(None, {"data": (str(DEMO_DATA),), "eval": questions_file})


def test_eval_help_has_an_example():
    r = CliRunner().invoke(app, ["eval", "--help"])
    assert r.exit_code == 0 and "Example: sera eval " in r.stdout


def test_prefilled_local_judge_completes_parseable_verdicts(tmp_path, questions_file, smol):
    """SmolLM2-135M as judge: with its reply prefilled with '[[' every judgment is text the parser reads (the
    prefill is part of it), and the prefill is part of the judge's identity (no cached judgment is reused)."""
    answers = answers_file(tmp_path, {"pol": ["Paris is the capital of France.", "4", "Blue.", "Yes."],
                                      "sft": ["I don't know.", "five", "Red, maybe.", "No idea."]})
    base = dict(policies=("pol",), baseline="sft", prompts=questions_file, answers=answers, judge="smollm2-135m",
                judge_max_tokens=4, progress=False)
    evaluate(EvalConfig(**base, output_dir=str(tmp_path / "out"), judge_prefill="[["))
    rows = pq.read_table(tmp_path / "out" / "judgments.parquet").to_pylist()
    assert len(rows) == 2 * len(QUESTIONS) and all(r["judge_text"].startswith("[[") for r in rows)
    parsed = [r for r in rows if r["verdict"] is not None]
    assert len(parsed) >= len(rows) // 2, [r["judge_text"] for r in rows]  # measured: 6 of 8, all "[[A]]"
    assert all(r["error"] for r in rows if r["verdict"] is None)  # counted as unparseable, never guessed
    assert all("prefilled '[['" in r["judge"] for r in rows)
