"""`sera eval --judge-reward` / `--judge-rm`: verdicts from rewards, with the LLM judge's table and intervals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from sera_cli.commands.app import app
from sera_cli.data import provenance
from sera_cli.stages.eval import stats
from sera_cli.stages.eval.reward_judge import Unit, summary_rows, verdicts

runner = CliRunner()
QUESTIONS = ["Name a colour.", "What is 2+2?", "Say hi.", "Capital of France?"]
ANSWERS = {"pol": ["Blue.", "4.", "Hi there, how are you?", "Paris."],
           "base": ["I do not know.", "5, or maybe 4.", "No.", "Paris is the capital of France."]}


def sera(*args: str):
    return runner.invoke(app, list(args))


def files(tmp_path: Path) -> tuple[str, str]:
    q = tmp_path / "question.jsonl"
    q.write_text("".join(json.dumps({"question_id": i, "turns": [t]}) + "\n" for i, t in enumerate(QUESTIONS, 1)))
    rows = [{"prompt_id": str(i), "model": m, "response": a[i - 1]} for m, a in ANSWERS.items()
            for i in range(1, len(QUESTIONS) + 1)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "answers.parquet")
    return str(q), str(tmp_path / "answers.parquet")


def test_points_and_summary_from_hand_made_rewards():
    units = [Unit(str(i), m, "q", "x" * n) for m, lens in (("pol", (1, 2, 3, 4)), ("base", (2, 2, 2, 2)))
             for i, n in enumerate(lens)]
    rewards = np.array([1.0, 2.0, 3.0, 0.0, 0.0, 2.0, 1.0, 5.0])  # pol's, then base's
    rows = verdicts(units, rewards, "base", "rm")
    assert [r["score"] for r in rows] == [1.0, 0.5, 1.0, 0.0]
    assert [r["verdict"] for r in rows] == ["model", "tie", "model", "baseline"]
    assert rows[3]["judge_text"] == "reward 0 vs baseline 5" and {r["order"] for r in rows} == {"reward"}
    lengths = {(u.model, u.question_id): len(u.answer) for u in units}
    (s,) = summary_rows(rows, lengths, "base", "rm", 200, 0)
    assert (s["wins"], s["ties"], s["losses"], s["questions"]) == (2, 1, 1, 4)
    assert s["win_rate"] == pytest.approx(0.625) and s["parse_failures"] == 0
    # the interval: the percentile bootstrap of the points, resampled independently here
    idx = np.random.default_rng(0).integers(0, 4, size=(200, 4))
    means = np.array([1.0, 0.5, 1.0, 0.0])[idx].mean(axis=1)
    assert (s["ci_low"], s["ci_high"]) == pytest.approx(tuple(np.quantile(means, [0.025, 0.975])))
    assert s["mean_length"] == 2.5 and s["baseline_mean_length"] == 2.0
    assert s["lc_win_rate"] == stats.length_controlled_win_rate(np.array([1.0, 0.5, 1.0, 0.0]), [1, 2, 3, 4],
                                                               [2, 2, 2, 2])


def test_implicit_reward_judge_agrees_with_score_on_the_same_answers(tmp_path, tiny_policy, tiny_ref):
    questions, answers = files(tmp_path)
    r = sera("eval", "--policy", "pol", "--baseline", "base", "--prompts", questions, "--answers", answers,
             "--judge-reward", tiny_policy, "--judge-reward-ref", tiny_ref, "-o", str(tmp_path / "ev"), "-q")
    assert r.exit_code == 0, r.stderr
    summary = pq.read_table(tmp_path / "ev" / "summary.parquet").to_pylist()[0]
    judged = pq.read_table(tmp_path / "ev" / "judgments.parquet")
    prov = provenance.read(judged)
    assert prov["judge"]["kind"] == "implicit-reward" and prov["judge"]["ref"] == tiny_ref
    # independently: `sera score` of (question, policy's answer, baseline's answer) pairs with beta 1
    user = [[{"role": "user", "content": q}] for q in QUESTIONS]
    said = lambda texts: [[{"role": "assistant", "content": t}] for t in texts]  # noqa: E731
    pq.write_table(pa.table({"prompt": user, "chosen": said(ANSWERS["pol"]), "rejected": said(ANSWERS["base"])}),
                   tmp_path / "pairs.parquet")
    s = sera("score", str(tmp_path / "pairs.parquet"), "--policy", tiny_policy, "--ref", tiny_ref, "--beta", "1",
             "-q", "-o", str(tmp_path / "scored.parquet"))
    assert s.exit_code == 0, s.stderr
    scored = pq.read_table(tmp_path / "scored.parquet")
    got = np.array([prov["rewards"][f"pol|{i}"] for i in range(1, 5)])
    base = np.array([prov["rewards"][f"base|{i}"] for i in range(1, 5)])
    np.testing.assert_allclose(got, scored.column("reward_chosen").to_numpy(), atol=1e-4)
    np.testing.assert_allclose(base, scored.column("reward_rejected").to_numpy(), atol=1e-4)
    points = np.where(got > base, 1.0, np.where(got == base, 0.5, 0.0))
    assert judged.column("score").to_pylist() == points.tolist()
    assert summary["win_rate"] == pytest.approx(points.mean()) and summary["wins"] == int((points == 1).sum())
    assert summary["judge"] == f"implicit reward of {tiny_policy} (reference {tiny_ref})"
    assert "a win is the larger reward" in r.stderr + r.stdout


@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory, smol) -> str:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    path = tmp_path_factory.mktemp("tiny-rm")
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=2,
                         bos_token_id=1, eos_token_id=2, initializer_range=0.2)
    torch.manual_seed(5)
    LlamaForSequenceClassification(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(smol.path).save_pretrained(path)
    return str(path)


def test_reward_model_judge_scores_each_conversation(tmp_path, tiny_rm):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    questions, answers = files(tmp_path)
    r = sera("eval", "--policy", "pol", "--baseline", "base", "--prompts", questions, "--answers", answers,
             "--judge-rm", tiny_rm, "-o", str(tmp_path / "ev"), "-q")
    assert r.exit_code == 0, r.stderr
    prov = provenance.read(pq.read_table(tmp_path / "ev" / "judgments.parquet"))
    assert prov["judge"]["kind"] == "reward-model"
    # independently: the model's single logit on each chat-templated conversation
    tok = AutoTokenizer.from_pretrained(tiny_rm)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_rm, dtype=torch.float32).eval()
    for m, texts in ANSWERS.items():
        for i, (q, a) in enumerate(zip(QUESTIONS, texts, strict=True), 1):
            text = tok.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                           tokenize=False)
            with torch.no_grad():
                want = model(**tok(text, return_tensors="pt", add_special_tokens=False)).logits[0, 0].item()
            assert prov["rewards"][f"{m}|{i}"] == pytest.approx(want, abs=1e-5)
    summary = pq.read_table(tmp_path / "ev" / "summary.parquet").to_pylist()[0]
    points = [1.0 if prov["rewards"][f"pol|{i}"] > prov["rewards"][f"base|{i}"] else 0.0 for i in range(1, 5)]
    assert summary["win_rate"] == pytest.approx(np.mean(points)) and summary["judge"] == f"reward model {tiny_rm}"


def test_reward_judge_settings_are_checked_together(tmp_path, tiny_rm):
    questions, answers = files(tmp_path)
    common = ("eval", "--policy", "pol", "--baseline", "base", "--prompts", questions, "--answers", answers,
              "-o", str(tmp_path / "ev"))
    r = sera(*common, "--judge-reward", tiny_rm)
    assert r.exit_code == 1 and r.stderr == ("error: --judge-reward needs --judge-reward-ref (the reference the DPO "
                                             "model was trained from)\n")
    r = sera(*common, "--judge-rm", tiny_rm, "--judge", "smollm2-135m")
    assert r.exit_code == 1 and "give one judge" in r.stderr and len(r.stderr.splitlines()) == 1
    r = sera(*common, "--judge-rm", str(tmp_path / "nothing"))
    assert r.exit_code == 1 and len(r.stderr.splitlines()) == 1


def test_a_judges_held_out_accuracy_is_reported_beside_its_verdicts(tmp_path, tiny_rm):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    questions, answers = files(tmp_path)
    pq.write_table(pa.table({"prompt": QUESTIONS, "chosen": ANSWERS["pol"], "rejected": ANSWERS["base"]}),
                   tmp_path / "heldout.parquet")
    r = sera("eval", "--policy", "pol", "--baseline", "base", "--prompts", questions, "--answers", answers,
             "--judge-rm", tiny_rm, "--judge-heldout", str(tmp_path / "heldout.parquet"), "-o", str(tmp_path / "ev"))
    assert r.exit_code == 0, r.stderr
    tok = AutoTokenizer.from_pretrained(tiny_rm)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_rm, dtype=torch.float32).eval()

    def reward(q: str, a: str) -> float:
        text = tok.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                       tokenize=False)
        with torch.no_grad():
            return model(**tok(text, return_tensors="pt", add_special_tokens=False)).logits[0, 0].item()

    right = sum(reward(q, c) > reward(q, j) for q, c, j in zip(QUESTIONS, ANSWERS["pol"], ANSWERS["base"],
                                                                 strict=True))
    prov = provenance.read(pq.read_table(tmp_path / "ev" / "summary.parquet"))
    assert prov["judge_heldout"]["pairs"] == 4 and prov["judge_heldout"]["accuracy"] == right / 4
    assert (f"judge's held-out accuracy: {right / 4:.1%} of 4 pairs of {tmp_path / 'heldout.parquet'} (chosen "
            "rewarded above rejected)") in " ".join((r.stdout + r.stderr).split())
