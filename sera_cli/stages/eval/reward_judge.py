"""Reward judges: a verdict from a reward instead of an LLM's reply (`sera eval --judge-reward` / `--judge-rm`).

- `--judge-reward MODEL --judge-reward-ref REF`: a DPO-trained model's implicit reward of an answer,
  log pi(y|x) - log pi_ref(y|x) summed over the answer's tokens (Eq. 5 with beta = 1: beta scales every reward
  alike, so no verdict depends on it), computed by the log-prob function `score` and `train` use
  (`batched_logps.sequences_logps` over `trainers.logps`), with score's tokenization and lengths.
- `--judge-rm PATH`: any `AutoModelForSequenceClassification` with one output (a reward model): the score of the
  conversation (question, then the answer) through the tokenizer's chat template, one sequence at a time (no
  padding, so no pad-token convention of the model can move a score).

Each question (and, with `--turns all`, its second turn) gives one point per policy: 1 when the policy's answer
has the larger reward than the baseline's, 0.5 on an exact tie, 0 otherwise. The points are summarised with the
LLM judge's table and intervals (`run.SUMMARY`, `stats`). With a judge trained on data disjoint from the policies'
(the synthetic-gold setup of Gao et al. 2023), its verdicts have a known ground truth and no LLM is needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from sera_cli.stages.eval.config import EvalConfig
from sera_cli.stages.eval.questions import Question, messages_for
from trainers.encode import MAX_LENGTH, MAX_PROMPT_LENGTH


@dataclass(frozen=True)
class Unit:
    """One answer to reward: a question turn of one model, with the conversation before it."""

    question_id: str  # <id>, or <id>:turn2
    model: str
    prompt: Any  # a string, or messages (the user turns with this model's earlier answers)
    answer: str


def units(questions: list[Question], answers: dict[str, dict[str, list[str]]], models: list[str]) -> list[Unit]:
    """Every answer the verdicts need, model by model, in question order."""
    out = []
    for m in models:
        for q in questions:
            for turn in range(1, min(len(q.turns), 2) + 1):
                qid = q.question_id if turn == 1 else f"{q.question_id}:turn2"
                mine = answers[m][q.question_id]
                out.append(Unit(qid, m, messages_for(q, mine[:turn - 1]), mine[turn - 1]))
    return out


class ImplicitRewardJudge:
    """beta = 1 implicit reward of a DPO-trained `spec` against its reference `ref_spec`."""

    kind = "implicit-reward"

    def __init__(self, spec: str, ref_spec: str, dtype: str = "auto", device: str = "auto",
                 trust_remote_code: bool = False, batch_tokens: int = 1024):
        from sera_cli.backends.models import resolve

        self.spec, self.ref_spec = spec, ref_spec
        self.refs = {"policy": resolve(spec), "ref": resolve(ref_spec)}
        self.dtype, self.device, self.trust_remote_code, self.batch_tokens = dtype, device, trust_remote_code, \
            batch_tokens
        self.name = f"implicit reward of {spec} (reference {ref_spec})"

    def identity(self) -> dict[str, Any]:
        from sera_cli.backends.models import resolved_dtype

        return {"kind": self.kind, "model": self.spec, "fingerprint": self.refs["policy"].fingerprint,
                "ref": self.ref_spec, "ref_fingerprint": self.refs["ref"].fingerprint, "beta": 1.0,
                "dtype": resolved_dtype(self.dtype, self.device), "max_length": MAX_LENGTH,
                "max_prompt_length": MAX_PROMPT_LENGTH}

    def rewards(self, prompts: list[Any], answers: list[str]) -> np.ndarray:
        import gc

        from sera_cli.backends.logps.batched import encode_rows, flat_sequences, sequences_logps
        from sera_cli.backends.models import check_same_tokenizer, load_model, load_tokenizer

        toks = {role: load_tokenizer(ref, self.trust_remote_code) for role, ref in self.refs.items()}
        check_same_tokenizer(toks["policy"], toks["ref"], self.spec, self.ref_spec)
        responses = [[_response(p, a)] for p, a in zip(prompts, answers, strict=True)]
        seqs = flat_sequences(encode_rows(toks["policy"], prompts, responses, MAX_LENGTH, MAX_PROMPT_LENGTH))
        logps = {}
        for role, ref in self.refs.items():
            model = load_model(ref, self.dtype, self.device, self.trust_remote_code)
            logps[role], _ = sequences_logps(model, seqs, toks[role].pad_token_id, self.batch_tokens)
            del model
            gc.collect()
        return logps["policy"] - logps["ref"]


class RewardModelJudge:
    """The single output of an `AutoModelForSequenceClassification` reward model."""

    kind = "reward-model"

    def __init__(self, spec: str, dtype: str = "auto", device: str = "auto", trust_remote_code: bool = False):
        from sera_cli.backends.models import resolve

        self.spec, self.ref = spec, resolve(spec)
        self.dtype, self.device, self.trust_remote_code = dtype, device, trust_remote_code
        self.name = f"reward model {spec}"

    def identity(self) -> dict[str, Any]:
        from sera_cli.backends.models import resolved_dtype

        return {"kind": self.kind, "model": self.spec, "fingerprint": self.ref.fingerprint,
                "dtype": resolved_dtype(self.dtype, self.device)}

    def rewards(self, prompts: list[Any], answers: list[str]) -> np.ndarray:
        import torch
        from transformers import AutoModelForSequenceClassification

        from sera_cli.backends.models import load_tokenizer, quiet_transformers, resolve_device, resolve_dtype
        from sera_cli.data.errors import ModelError, first_line

        quiet_transformers()
        dev = resolve_device(self.device)
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                self.ref.path, dtype=resolve_dtype(self.dtype, dev), trust_remote_code=self.trust_remote_code)
        except Exception as err:  # transformers raises many types here
            raise ModelError(f"{self.spec}: cannot load it as a sequence-classification (reward) model: "
                             f"{first_line(err)}") from None
        if model.config.num_labels != 1:
            raise ModelError(f"{self.spec}: a reward model has one output; this one has {model.config.num_labels} "
                             "labels (num_labels)")
        model.to(dev).eval()
        tok = load_tokenizer(self.ref, self.trust_remote_code)
        out = np.zeros(len(answers))
        with torch.inference_mode():
            for i, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
                ids = tok(conversation_text(tok, prompt, answer), add_special_tokens=False,
                          return_tensors="pt")["input_ids"].to(dev)
                out[i] = float(model(input_ids=ids).logits[0, 0].float())
        return out


def conversation_text(tok, prompt: Any, answer: str) -> str:
    """The question and the answer as the reward model reads them: through the chat template when the tokenizer
    has one (a string prompt as one user turn), else the prompt followed by the answer."""
    reply = answer if isinstance(answer, list) else [{"role": "assistant", "content": answer}]
    if tok.chat_template:
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        return tok.apply_chat_template([*messages, *reply], tokenize=False)
    text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
    return text + "\n".join(m["content"] for m in reply) if isinstance(answer, list) else text + answer


def _response(prompt: Any, answer: Any) -> Any:
    """An answer in the form its prompt asks (messages for a conversational prompt)."""
    if isinstance(prompt, list) and isinstance(answer, str):
        return [{"role": "assistant", "content": answer}]
    return answer


def heldout_accuracy(judge, path: str) -> dict[str, Any]:
    """The judge's own accuracy on held-out preference pairs (prompt, chosen, rejected): the share of pairs whose
    chosen response gets the larger reward (an exact tie counts half), as a gold judge's credential."""
    from sera_cli.data.contract import check_pairs
    from sera_cli.data.tables import read_inputs

    inputs = read_inputs([path])
    check_pairs(inputs)
    t = inputs.table
    prompts = t.column("prompt").to_pylist()
    r = judge.rewards(prompts + prompts, t.column("chosen").to_pylist() + t.column("rejected").to_pylist())
    n = len(prompts)
    points = np.where(r[:n] > r[n:], 1.0, np.where(r[:n] == r[n:], 0.5, 0.0))
    return {"file": path, "pairs": n, "accuracy": float(points.mean()) if n else None}


def make_reward_judge(config: EvalConfig):
    if config.judge_rm:
        return RewardModelJudge(config.judge_rm, config.dtype, config.device, config.trust_remote_code)
    return ImplicitRewardJudge(config.judge_reward, config.judge_reward_ref, config.dtype, config.device,
                               config.trust_remote_code)


def verdicts(units_: list[Unit], rewards: np.ndarray, baseline: str, judge_name: str) -> list[dict[str, Any]]:
    """One judgment row per (policy, question turn): point 1 / 0.5 / 0 as the policy's reward is above, equal to
    or below the baseline's (pure)."""
    base = {u.question_id: r for u, r in zip(units_, rewards, strict=True) if u.model == baseline}
    rows = []
    for u, r in zip(units_, rewards, strict=True):
        if u.model == baseline:
            continue
        b = base[u.question_id]
        point = 1.0 if r > b else 0.5 if r == b else 0.0
        verdict = "model" if point == 1 else "tie" if point == 0.5 else "baseline"
        rows.append({"question_id": u.question_id, "model": u.model, "baseline": baseline, "order": "reward",
                     "judge": judge_name, "verdict": verdict, "score": point,
                     "judge_text": f"reward {r:.6g} vs baseline {b:.6g}", "error": None})
    return rows


def summary_rows(rows: list[dict[str, Any]], lengths: dict[tuple[str, str], int], baseline: str, judge_name: str,
                 resamples: int, seed: int = 0) -> list[dict[str, Any]]:
    """The LLM judge's summary (`run.SUMMARY` columns) from reward verdicts: win rate, bootstrap interval, W/T/L
    and the length-controlled win rate (pure; `lengths[(model, question_id)]` in characters)."""
    from sera_cli.stages.eval import stats
    from sera_cli.stages.eval.judging import SUMMARY

    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        points = np.array([r["score"] for r in mine], float)
        lm = [lengths[(model, r["question_id"])] for r in mine]
        lb = [lengths[(baseline, r["question_id"])] for r in mine]
        lo, hi = stats.bootstrap_ci(points, resamples, seed)
        rec = {"model": model, "baseline": baseline, "judge": judge_name, "mode": "pairwise",
               "questions": len(mine), "wins": int((points == 1).sum()), "ties": int((points == 0.5).sum()),
               "losses": int((points == 0).sum()), "win_rate": stats.win_rate(points), "ci_low": lo, "ci_high": hi,
               "lc_win_rate": stats.length_controlled_win_rate(points, lm, lb),
               "mean_length": float(np.mean(lm)), "baseline_mean_length": float(np.mean(lb)), "parse_failures": 0}
        out.append({name: rec.get(name) for name in SUMMARY.names})
    return out


def evaluate_by_reward(config: EvalConfig):
    """`sera eval` with a reward judge: answers as for the LLM judge, one reward per answer, the same outputs."""
    from sera_cli.data import provenance
    from sera_cli.data.hashing import file_digest
    from sera_cli.data.tables import write_parquet
    from sera_cli.stages.eval.answers import label
    from sera_cli.stages.eval.judging import JUDGMENTS, SUMMARY, EvalResult, check_outputs, collect_answers
    from sera_cli.stages.eval.questions import read_questions

    config.check()
    check_outputs(config)
    questions = read_questions(config.prompts, config.turns)
    out = Path(config.output_dir)
    answers, made, model_ids = collect_answers(config, questions, Path(config.cache_dir) if config.cache_dir else out)
    judge = make_reward_judge(config)
    base = label(config.baseline)
    todo = units(questions, answers, [*(label(s) for s in config.policies), base])
    from sera_cli.data.console import console

    with console.status(f"Rewarding {len(todo):,} answers ({judge.name})"):
        rewards = judge.rewards([u.prompt for u in todo], [u.answer for u in todo])
    accuracy = heldout_accuracy(judge, config.judge_heldout) if config.judge_heldout else None
    rows = verdicts(todo, rewards, base, judge.name)
    lengths = {(u.model, u.question_id): len(u.answer) for u in todo}
    summary = summary_rows(rows, lengths, base, judge.name, config.bootstrap, config.seed)
    prov = provenance.record(
        "eval", {k: v for k, v in config.as_dict().items() if k != "progress"}, models=model_ids,
        judge=judge.identity(), prompts={"file": config.prompts, "digest": file_digest(config.prompts),
                                         "questions": len(questions)},
        rewards={f"{u.model}|{u.question_id}": float(r) for u, r in zip(todo, rewards, strict=True)},
        generated=made, **({"judge_heldout": accuracy} if accuracy else {}))
    write_parquet(provenance.attach(pa.Table.from_pylist(rows, schema=JUDGMENTS), prov),
                  str(out / "judgments.parquet"))
    write_parquet(provenance.attach(pa.Table.from_pylist(summary, schema=SUMMARY), prov), str(out / "summary.parquet"))
    result = EvalResult(summary, out / "judgments.parquet", out / "summary.parquet", made, len(rows), 0, 0.0)
    result.judge_heldout = accuracy
    return result
